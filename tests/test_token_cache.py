"""Tokenised pairs as flat arrays and their workspace cache: the same token ids, batches and reference
keys as the list form, read back instead of tokenised again, and rebuilt when the file is damaged."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from dpo_engine.data import DatasetStore, load_preferences
from dpo_engine.data.preflight import load_tokenizer
from dpo_engine.data.token_arrays import ArrayPairs, Ragged, tokenize_arrays
from dpo_engine.data.token_cache import CACHE_DIR, cached_token_arrays, table_hash, tokenizer_hash
from dpo_engine.data.tokenize import pair_length, tokenize_pair, tokenize_pairs
from dpo_engine.train.data import collate, collate_packed
from dpo_engine.train.reference import pair_key
from dpo_engine.train.trainer import DPOTrainer
from tests.conftest import HH_SAMPLE
from tests.test_train import make_config, toy_pairs


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """tiny-random's tokenizer (SmolLM2's, with its chat template) and the same without a template."""
    from dpo_engine.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    chat, plain = load_tokenizer("tiny-random", ws), load_tokenizer("tiny-random", ws)
    plain.chat_template = None
    assert chat.chat_template
    turn_end = load_tokenizer("tiny-random", ws)
    turn_end.chat_template = TURN_END_TEMPLATE
    return {"chat": chat, "plain": plain, "bos": with_bos(load_tokenizer("tiny-random", ws)), "turn_end": turn_end}


# Gemma's shape: an assistant turn ends with "<end_of_turn>" (several ordinary tokens to this tokenizer)
TURN_END_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


def with_bos(tokenizer):
    """The tokenizer made to put its BOS before every text, as a base Llama's does, and without a chat
    template: what a prompt then starts with must come from the prefix rule."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """300 bundled pairs plus edge cases: one-character responses, an empty and a missing prompt, and
    a prompt shared by several pairs."""
    base = load_preferences(HH_SAMPLE).table.iloc[:300]
    extra = pd.DataFrame(
        {
            "pair_id": ["tiny", "empty-prompt", "no-prompt", "shared-1", "shared-2"],
            "prompt": [base["prompt"].iloc[0], "", None, base["prompt"].iloc[5], base["prompt"].iloc[5]],
            "chosen": [" ", "x", "yes", "a", "b"],
            "rejected": ["x", " ", "no", "c", base["chosen"].iloc[7]],
        }
    )
    return pd.concat([base, extra], ignore_index=True)


def as_pairs(tokenizer, table, **lengths):
    return ArrayPairs(tokenize_arrays(tokenizer, table, chunk=64, **lengths), table["pair_id"].to_numpy())


@pytest.mark.parametrize("kind", ["chat", "plain", "bos", "turn_end"])
@pytest.mark.parametrize("lengths", [(96, 48), (256, 128), (40, 4)])
def test_arrays_equal_the_list_form_token_for_token(tokenizers, table, kind, lengths):
    tokenizer = tokenizers[kind]
    max_length, max_prompt_length = lengths
    arrays = as_pairs(tokenizer, table, max_length=max_length, max_prompt_length=max_prompt_length)
    listed = tokenize_pairs(tokenizer, table, max_length=max_length, max_prompt_length=max_prompt_length)
    assert list(arrays) == listed
    sample = [0, 37, 150, *range(300, len(table))]  # and the one-call-per-text rule itself
    for i in sample:
        r = table.iloc[i]
        assert arrays[i] == tokenize_pair(
            tokenizer,
            r.pair_id,
            str(r.prompt),
            r.chosen,
            r.rejected,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
    assert any(len(p.prompt_ids) == max_prompt_length for p in listed)  # some prompts were cut
    np.testing.assert_array_equal(arrays.lengths(), [pair_length(p) for p in listed])


def test_ragged_slices_follow_python_slices():
    lists = [[1, 2, 3, 4, 5], [], [7], [8, 9]]
    ragged = Ragged.from_lists(lists)
    for start, stop in [(None, 3), (-2, None), (0, None), (-10, 2), (1, -1), (None, 0), (3, 1)]:
        got = ragged.slice_each(start, stop)
        assert [got.row(i) for i in range(4)] == [s[start:stop] for s in lists]
    budgets = np.array([2, 0, -1, 5])
    got = ragged.slice_each(None, budgets)
    assert [got.row(i) for i in range(4)] == [s[: int(b)] for s, b in zip(lists, budgets)]
    taken = ragged.take(np.array([3, 0, 3, 1]))
    assert [taken.row(i) for i in range(4)] == [lists[3], lists[0], lists[3], lists[1]]
    appended = ragged.append_each([0])
    assert [appended.row(i) for i in range(4)] == [s + [0] for s in lists]
    appended = ragged.append_each([5, 6])
    assert [appended.row(i) for i in range(4)] == [s + [5, 6] for s in lists]


def test_array_pairs_answer_as_the_list_would(tokenizers, table):
    tokenizer = tokenizers["chat"]
    eager = tokenize_pairs(tokenizer, table, max_length=96, max_prompt_length=48)
    pairs = as_pairs(tokenizer, table, max_length=96, max_prompt_length=48)
    n = len(eager)
    assert len(pairs) == n and pairs[17] == eager[17] and pairs[-1] == eager[-1]
    assert pairs[10:20] == eager[10:20] and pairs[::50] == eager[::50]
    assert pairs.take([150, 3, 150]) == [eager[150], eager[3], eager[150]] and pairs.take([]) == []
    assert isinstance(pairs[0].pair_id, str) and isinstance(pairs[0].prompt_ids[0], int)
    with pytest.raises(IndexError):
        pairs[n]
    index = np.array([5, 2, 99, n - 1])
    subset = pairs.subset(index)
    assert len(subset) == 4 and list(subset) == [eager[i] for i in index] and subset[-1] == eager[-1]
    assert subset.subset([3, 0]).take([0, 1]) == [eager[n - 1], eager[5]]
    np.testing.assert_array_equal(subset.lengths(), [pair_length(eager[i]) for i in index])


def test_batches_and_reference_keys_are_the_same_from_arrays(tokenizers, table):
    tokenizer = tokenizers["chat"]
    eager = tokenize_pairs(tokenizer, table, max_length=96, max_prompt_length=48)
    pairs = as_pairs(tokenizer, table, max_length=96, max_prompt_length=48)
    assert [pair_key(p) for p in pairs] == [pair_key(p) for p in eager]
    pad = tokenizer.pad_token_id
    for index in ([0, 1, 2, 3], [301, 302, 303, 304], [7, 300, 150]):
        for build in (collate, collate_packed):
            a, b = build(pairs.take(index), pad), build([eager[i] for i in index], pad)
            for field in ("input_ids", "attention_mask", "position_ids", "token_rows", "token_cols"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or bool((x == y).all()), field
            assert all(bool((x == y).all()) for x, y in zip(a.pool_masks + a.pool_rows, b.pool_masks + b.pool_rows))
            assert (a.token_labels == b.token_labels).all() and (a.token_seq == b.token_seq).all()
            assert a.pairs == b.pairs and a.n_tokens == b.n_tokens


def test_the_cache_is_read_back_rebuilt_when_damaged_and_keyed_on_everything(tokenizers, table, tmp_path):
    tokenizer, lines = tokenizers["chat"], []
    lengths = {"max_length": 96, "max_prompt_length": 48}
    first = cached_token_arrays(tokenizer, table, tmp_path, **lengths, log=lines.append)
    files = list((tmp_path / CACHE_DIR).iterdir())
    assert len(files) == 1 and "tokenised" in lines[-1]
    again = cached_token_arrays(tokenizer, table, tmp_path, **lengths, log=lines.append)
    assert "read 305" in lines[-1]
    expected = tokenize_pairs(tokenizer, table, **lengths)
    assert list(ArrayPairs(again, table["pair_id"].to_numpy())) == expected
    assert list(ArrayPairs(first, table["pair_id"].to_numpy())) == expected

    files[0].write_bytes(files[0].read_bytes()[:200])  # a torn file
    rebuilt = cached_token_arrays(tokenizer, table, tmp_path, **lengths, log=lines.append)
    assert "unreadable" in lines[-2] and "tokenised" in lines[-1]
    assert list(ArrayPairs(rebuilt, table["pair_id"].to_numpy())) == expected
    cached_token_arrays(tokenizer, table, tmp_path, **lengths, log=lines.append)
    assert "read" in lines[-1]
    assert not [p for p in (tmp_path / CACHE_DIR).iterdir() if p.name.startswith(".")]  # no temporary left

    # another length, tokenizer or table is another file, never the first one's arrays
    cached_token_arrays(tokenizer, table, tmp_path, max_length=64, max_prompt_length=48, log=lines.append)
    cached_token_arrays(tokenizers["plain"], table, tmp_path, **lengths, log=lines.append)
    changed = table.assign(chosen=table["chosen"].where(table.index != 3, "changed"))
    cached_token_arrays(tokenizer, changed, tmp_path, **lengths, log=lines.append)
    assert all("tokenised" in line for line in lines[-3:]) and len(list((tmp_path / CACHE_DIR).iterdir())) == 4
    assert tokenizer_hash(tokenizer) != tokenizer_hash(tokenizers["plain"])
    assert table_hash(table) != table_hash(changed) and table_hash(table) == table_hash(table.copy())
    swapped = table.assign(prompt=table["prompt"].astype(str) + "x", chosen=table["chosen"].str[1:])
    assert table_hash(swapped) != table_hash(table)


def test_a_second_run_on_a_stored_dataset_reads_its_tokens_from_the_cache(workspace, tmp_path):
    info = DatasetStore(workspace).add(load_preferences(HH_SAMPLE), "hh", source="test")
    cfg = make_config(data={"dataset": info.id, "max_pairs": 120}, method={"calibration_pairs": 4})
    runs = []
    for name in ("a", "b"):
        lines: list[str] = []
        trainer = DPOTrainer(cfg, tmp_path / name, workspace=workspace, device="cpu", log=lines.append)
        trainer.setup()
        runs.append((trainer.parts, [line for line in lines if line.startswith("token cache")]))
    (a, log_a), (b, log_b) = runs
    assert "tokenised 120" in log_a[0] and "read 120" in log_b[0]
    assert list(a.train_pairs) == list(b.train_pairs) and a.eval_pairs == b.eval_pairs
    table = DatasetStore(workspace).load(info.id).iloc[:120]
    expected = {p.pair_id: p for p in tokenize_pairs(a.tokenizer, table, max_length=48, max_prompt_length=32)}
    assert all(expected[p.pair_id] == p for p in list(a.train_pairs) + a.eval_pairs)
    assert len(a.train_pairs) + len(a.eval_pairs) == 120


def test_a_table_passed_in_is_keyed_on_its_content(workspace, tmp_path):
    lines: list[str] = []
    cfg = make_config()
    for name in ("a", "b"):
        DPOTrainer(cfg, tmp_path / name, workspace=workspace, pairs=toy_pairs(), device="cpu", log=lines.append).setup()
    cache = [line for line in lines if line.startswith("token cache")]
    assert "tokenised 40" in cache[0] and "read 40" in cache[1]


def test_a_file_is_keyed_on_its_stamp_and_tokenised_again_once_it_changes(workspace, tmp_path):
    """A preference file names its table by path, size and modification time (no hashing of the
    table); rewriting it makes the next run parse and tokenise it again."""
    data = tmp_path / "pairs.jsonl"
    toy_pairs().drop(columns=["pair_id"]).to_json(data, orient="records", lines=True)
    cfg = make_config(data={"dataset": str(data)})
    lines: list[str] = []

    def run(name):
        lines.clear()
        trainer = DPOTrainer(cfg, tmp_path / name, workspace=workspace, device="cpu", log=lines.append)
        trainer.setup()
        return [line for line in lines if line.startswith("token cache")][0], trainer.parts

    first, a = run("a")
    again, b = run("b")
    assert "tokenised 40" in first and "read 40" in again
    assert list(a.train_pairs) == list(b.train_pairs) and a.eval_pairs == b.eval_pairs
    changed = toy_pairs().drop(columns=["pair_id"])
    changed.loc[0, "chosen"] = changed.loc[0, "chosen"] + " (edited)"
    changed.to_json(data, orient="records", lines=True)
    third, c = run("c")
    assert "tokenised 40" in third
    before = {p.pair_id: p for p in list(a.train_pairs) + a.eval_pairs}
    after = {p.pair_id: p for p in list(c.train_pairs) + c.eval_pairs}
    assert before.keys() == after.keys() and sum(before[k] != after[k] for k in before) == 1  # the edited pair


class WithoutBackend:
    """A tokenizer whose Rust backend is out of reach: the arrays come from its own call."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def test_arrays_from_the_tokenizers_own_call_are_the_same(tokenizers, table):
    tokenizer = tokenizers["chat"]
    lengths = {"max_length": 96, "max_prompt_length": 48}
    assert list(as_pairs(WithoutBackend(tokenizer), table, **lengths)) == tokenize_pairs(tokenizer, table, **lengths)


def test_a_response_ends_as_the_template_ends_an_assistant_turn(tokenizers):
    """The template's end of turn without its trailing whitespace; EOS without a template, or where
    the template writes nothing after the text."""
    from dpo_engine.data.tokenize import response_end

    chat, plain, turn_end = tokenizers["chat"], tokenizers["plain"], tokenizers["turn_end"]
    assert response_end(chat) == [chat.eos_token_id]  # ChatML's <|im_end|> is SmolLM2's EOS: ids unchanged
    assert response_end(plain) == [plain.eos_token_id]
    end = response_end(turn_end)
    assert turn_end.decode(end) == "<end_of_turn>" and end != [turn_end.eos_token_id]
    pair = tokenize_pair(turn_end, "p", "Hi", "Hello there", "Go away", max_length=64, max_prompt_length=32)
    assert pair.chosen_ids[-len(end) :] == end and pair.rejected_ids[-len(end) :] == end
    bare = copy.deepcopy(plain)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert response_end(bare) == [bare.eos_token_id]


@pytest.mark.parametrize("kind", ["chat", "turn_end"])
def test_cut_responses_are_the_ones_longer_than_what_max_length_leaves(tokenizers, table, kind):
    """Counted independently from each text's whole token length: a response is cut when its text and
    the response end do not fit beside the prompt as kept. The run's log line says the same counts."""
    from dpo_engine.data.tokenize import keep_prompt_end, prompt_prefix, render_prompt, response_end
    from dpo_engine.train.setup import truncation_note

    tokenizer = tokenizers[kind]
    max_length, max_prompt_length = 96, 48
    arrays = tokenize_arrays(tokenizer, table, chunk=64, max_length=max_length, max_prompt_length=max_prompt_length)
    end = response_end(tokenizer)

    def whole(text) -> int:
        return len(tokenizer(str(text), add_special_tokens=False)["input_ids"]) + len(end)

    expected = []
    for r in table.itertuples():
        prompt = tokenizer(render_prompt(tokenizer, str(r.prompt)), add_special_tokens=False)["input_ids"]
        budget = max_length - len(keep_prompt_end(prompt, prompt_prefix(tokenizer), max_prompt_length))
        expected.append(whole(r.chosen) > budget or whole(r.rejected) > budget)
    cut = arrays.cut_responses(end)
    np.testing.assert_array_equal(cut, expected)
    assert 0 < cut.sum() < len(table)  # both kinds are in the table
    prompts = int((arrays.prompt.lengths() == max_prompt_length).sum())
    note = truncation_note(arrays, end, max_length, max_prompt_length)
    assert note.startswith(f"truncation: {int(cut.sum())} of {len(table)} pairs") and f"{prompts} prompts" in note
    uncut = tokenize_arrays(tokenizer, table.iloc[300:], chunk=64, max_length=4096, max_prompt_length=2048)
    assert truncation_note(uncut, end, 4096, 2048) is None


def test_ragged_ends_with_a_tail():
    r = Ragged.from_lists([[1, 2, 3], [3], [], [2, 3], [9, 2, 3, 4]])
    assert r.ends_with([2, 3]).tolist() == [True, False, False, True, False]
    assert r.ends_with([]).tolist() == [True] * 5
