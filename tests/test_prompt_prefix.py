"""A prompt starts with what the tokenizer puts before any text (a base Llama's BOS) and keeps it when a
long prompt is cut; a chat template that writes its own BOS is not given a second one."""

from __future__ import annotations

import pandas as pd
import pytest

from dpo_engine.data.preflight import load_tokenizer, token_counts
from dpo_engine.data.tokenize import keep_prompt_end, prompt_prefix, tokenize_pair
from tests.test_token_cache import with_bos


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from dpo_engine.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    return load_tokenizer("tiny-random", ws), with_bos(load_tokenizer("tiny-random", ws))


def test_the_prefix_is_what_the_tokenizer_adds_before_a_text(tokenizers):
    smol, bos = tokenizers
    assert prompt_prefix(smol) == []  # SmolLM2 adds nothing: its pairs are tokenised as before
    assert prompt_prefix(bos) == [bos.bos_token_id]


def test_keep_prompt_end_keeps_the_prefix_and_the_end():
    assert keep_prompt_end([5, 6, 7, 8], [1], 3) == [1, 7, 8]
    assert keep_prompt_end([1, 5, 6, 7, 8], [1], 3) == [1, 7, 8]  # present already: not doubled
    assert keep_prompt_end([5, 6], [1], 8) == [1, 5, 6]
    assert keep_prompt_end([], [1], 8) == [1]  # an empty prompt still has a token to pool
    assert keep_prompt_end([5, 6, 7], [], 2) == [6, 7]  # no prefix: the end, as before
    assert keep_prompt_end([5, 6, 7], [1, 2], 1) == [1]


def test_a_base_model_prompt_starts_with_bos_when_cut_and_when_not(tokenizers):
    _, bos = tokenizers
    long_prompt = " ".join(["word"] * 200)
    cut = tokenize_pair(bos, "p", long_prompt, "yes", "no", max_length=64, max_prompt_length=16)
    whole = tokenize_pair(bos, "p", "hello there", "yes", "no", max_length=64, max_prompt_length=16)
    plain = bos(long_prompt, add_special_tokens=False)["input_ids"]
    assert cut.prompt_ids == [bos.bos_token_id, *plain[-15:]]
    assert whole.prompt_ids == bos("hello there", add_special_tokens=True)["input_ids"]


def test_a_chat_template_that_writes_bos_gets_one(tokenizers):
    _, bos = tokenizers
    bos.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        pair = tokenize_pair(bos, "p", "hello there", "yes", "no", max_length=64, max_prompt_length=16)
    finally:
        bos.chat_template = None
    assert pair.prompt_ids[0] == bos.bos_token_id and pair.prompt_ids[1] != bos.bos_token_id


def test_the_preflight_counts_the_prefix(tokenizers):
    _, bos = tokenizers
    table = pd.DataFrame({"prompt": ["hello there", ""], "chosen": ["a", "b"], "rejected": ["c", "d"]})
    plain = [len(bos(t, add_special_tokens=False)["input_ids"]) for t in table["prompt"]]
    assert list(token_counts(table, bos)["prompt"]) == [n + 1 for n in plain]
