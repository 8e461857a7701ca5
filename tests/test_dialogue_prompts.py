"""Multi-turn prompts reach the chat template turn by turn, as the model will be prompted after
training: HH dialogues and multi-message conversational prompts are read back into turns
(`layouts.dialogue_turns`); other text stays one user turn; a template that refuses the turns gets
one user turn; a tokenizer without a template reads the text as it is."""

from __future__ import annotations

import copy
import json

import pytest

from dpo_engine.data.layouts import dialogue_turns, render_messages
from dpo_engine.data.preflight import load_tokenizer
from dpo_engine.data.tokenize import render_prompt, tokenize_pair, tokenize_pairs
from tests.conftest import HH_SAMPLE

HH_PROMPT = "\n\nHuman: what are some pranks?\n\nAssistant: Are you looking for jokes?\n\nHuman: yep\n\nAssistant:"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from dpo_engine.workspace import Workspace

    return load_tokenizer("tiny-random", Workspace.resolve(tmp_path_factory.mktemp("ws")))


def _chat(tokenizer, turns) -> str:
    messages = [{"role": r, "content": c} for r, c in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_an_hh_prompt_is_read_as_its_turns():
    assert dialogue_turns(HH_PROMPT) == [
        ("user", "what are some pranks?"),
        ("assistant", "Are you looking for jokes?"),
        ("user", "yep"),
    ]
    assert dialogue_turns("\n\nHuman: hi\n\nAssistant:") == [("user", "hi")]
    # paragraphs inside a turn stay in it
    assert dialogue_turns("Human: a\n\nb\n\nAssistant: c") == [("user", "a\n\nb"), ("assistant", "c")]


def test_rendered_messages_read_back_as_the_messages():
    messages = [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Red."), ("user", "Another?")]
    assert dialogue_turns(render_messages(messages, expected_role="user")) == messages
    # other names of the same roles (ShareGPT's human/gpt, Gemma's model, OpenAI's developer)
    aliased = [("developer", "Be brief."), ("human", "a"), ("gpt", "b"), ("model", "c"), ("user", "d")]
    assert dialogue_turns(render_messages(aliased, expected_role="user")) == [
        ("system", "Be brief."),
        ("user", "a"),
        ("assistant", "b"),
        ("assistant", "c"),
        ("user", "d"),
    ]
    assert render_messages([("human", "hello")], expected_role="user") == "hello"  # as flat data gives it


@pytest.mark.parametrize(
    "text",
    [
        "User: hi",  # one label: the user's own words
        "Summarise this chat:\n\nHuman: a\n\nAssistant: b",  # does not start with a label
        "User: a\n\nTool: x\n\nAssistant: y",  # a tool turn is not text a template takes as a turn
        "Note: x\n\nAssistant: y",  # not a role
        "",
        "Human:x\n\nAssistant: y",  # a label needs a space or a line end after it
    ],
)
def test_other_text_is_not_a_dialogue(text):
    assert dialogue_turns(text) is None


def test_the_chat_template_renders_the_turns(smol):
    assert render_prompt(smol, HH_PROMPT) == _chat(smol, dialogue_turns(HH_PROMPT))
    assert "Human:" not in render_prompt(smol, HH_PROMPT)
    assert render_prompt(smol, "User: hi") == _chat(smol, [("user", "User: hi")])


def test_a_dialogue_ending_with_the_assistant_is_continued_as_trl_does(smol):
    turns = [("user", "Write a haiku."), ("assistant", "Autumn moonlight")]
    prompt = render_messages(turns, expected_role="user")
    messages = [{"role": r, "content": c} for r, c in turns]
    continued = smol.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert render_prompt(smol, prompt) == continued and continued.endswith("Autumn moonlight")


def test_a_conversational_file_reaches_the_template_as_its_messages(smol, tmp_path, workspace):
    from dpo_engine.data import open_dataset

    prompt = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Green."}],
        "rejected": [{"role": "assistant", "content": "Purple."}],
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": [{"role": "assistant", "content": "No."}]}))
    table = open_dataset(workspace, str(path)).table
    expected = smol.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert render_prompt(smol, table["prompt"].iloc[0]) == expected
    assert table["chosen"].iloc[0] == "Green."


def test_a_template_that_refuses_the_turns_gets_one_user_turn(smol):
    strict = copy.deepcopy(smol)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with_system = "System: Be brief.\n\nUser: hi"
    assert render_prompt(strict, with_system) == f"<user>{with_system}</user><assistant>"
    assert render_prompt(strict, HH_PROMPT).startswith("<user>what are some pranks?</user><assistant>Are")


def test_without_a_template_the_text_is_kept(smol):
    base = copy.deepcopy(smol)
    base.chat_template = None
    assert render_prompt(base, HH_PROMPT) == HH_PROMPT


def test_the_list_and_table_rules_agree_on_dialogues(smol, workspace):
    """tokenize_pairs (chunks of texts) and tokenize_pair (one pair) on the HH sample's dialogues."""
    import pandas as pd

    from dpo_engine.data import open_dataset

    table = open_dataset(workspace, str(HH_SAMPLE)).table.head(40)
    assert sum(dialogue_turns(p) is not None for p in table["prompt"]) > 30
    frame = pd.DataFrame(table[["pair_id", "prompt", "chosen", "rejected"]])
    many = tokenize_pairs(smol, frame, max_length=256, max_prompt_length=128, chunk=16)
    for pair, row in zip(many, frame.itertuples()):
        one = tokenize_pair(
            smol, row.pair_id, row.prompt, row.chosen, row.rejected, max_length=256, max_prompt_length=128
        )
        assert pair == one
