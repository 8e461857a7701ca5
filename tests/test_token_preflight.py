"""Token pre-flight: lengths and cuts agree with what training's own tokenization keeps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpo_engine.data import load_preferences
from dpo_engine.data.preflight import SIDES, load_tokenizer, token_preflight
from dpo_engine.data.tokenize import tokenize_pair
from tests.conftest import HH_SAMPLE


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dpo_engine.workspace import Workspace

    # tiny-random shares SmolLM2's tokenizer and chat template
    return load_tokenizer("tiny-random", Workspace.resolve(tmp_path_factory.mktemp("ws")))


@pytest.fixture(scope="module")
def table(request) -> pd.DataFrame:
    frame, _ = load_preferences(HH_SAMPLE).finalize(drop_flagged=True)
    return frame.head(80).reset_index(drop=True)


def test_lengths_and_cuts_match_training_tokenization(tokenizer, table):
    report = token_preflight(table, tokenizer, model="tiny-random", max_length=128, max_prompt_length=64)
    assert report.chat_template and report.n_pairs == 80
    full, kept = {s: [] for s in SIDES}, {s: [] for s in SIDES}
    for row in table.itertuples(index=False):
        whole = tokenize_pair(
            tokenizer, row.pair_id, row.prompt, row.chosen, row.rejected, max_length=10**6, max_prompt_length=10**6 - 1
        )
        cut = tokenize_pair(
            tokenizer, row.pair_id, row.prompt, row.chosen, row.rejected, max_length=128, max_prompt_length=64
        )
        for side, a, b in zip(
            SIDES,
            (whole.prompt_ids, whole.chosen_ids, whole.rejected_ids),
            (cut.prompt_ids, cut.chosen_ids, cut.rejected_ids),
        ):
            full[side].append(len(a))
            kept[side].append(len(b))
    any_cut = np.zeros(80, dtype=bool)
    for side in SIDES:
        n_full, n_kept = np.array(full[side]), np.array(kept[side])
        lost = n_full - n_kept
        assert report.lengths[side].max == n_full.max()
        assert report.lengths[side].mean == pytest.approx(n_full.mean())
        assert report.lengths[side].quantiles["p50"] == pytest.approx(np.percentile(n_full, 50))
        assert report.cut[side].pairs_cut == int((lost > 0).sum())
        assert report.cut[side].max_tokens_lost == int(lost.max())
        any_cut |= lost > 0
    assert report.pairs_cut == int(any_cut.sum()) > 0  # HH prompts are long: some are cut at 64 tokens


def test_suggestion_cuts_fewer_pairs_and_examples_show_the_template(tokenizer, table):
    report = token_preflight(table, tokenizer, model="tiny-random", max_length=128)
    assert report.max_prompt_length == 64  # training's default: half of max_length
    sg = report.suggestion
    assert sg.max_prompt_length < sg.max_length and sg.pairs_cut < report.pairs_cut
    again = token_preflight(
        table, tokenizer, model="tiny-random", max_length=sg.max_length, max_prompt_length=sg.max_prompt_length
    )
    assert again.pairs_cut == sg.pairs_cut
    frame = report.examples_frame()
    assert list(frame["side"][:3]) == ["prompt", "chosen", "rejected"]
    assert (
        frame["as the model sees it"][0].startswith("<|im_start|>")
        or "<|im_start|>" in frame["as the model sees it"][0]
    )
    assert all(frame["kept"] + frame["lost"] == frame["tokens"])
    assert any("pairs cut now" in line for line in report.summary_lines())


def test_bad_limits_are_one_line_errors(tokenizer, table):
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        token_preflight(table, tokenizer, model="tiny-random", max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="lacks column"):
        token_preflight(table.drop(columns=["chosen"]), tokenizer, model="tiny-random", max_length=64)


@pytest.mark.real_model
def test_the_bundled_tokenizer_read_once_from_gguf_equals_the_converted_model_s(tmp_path, monkeypatch, hh_sample_path):
    """A fresh model cache reads SmolLM2's tokenizer from its GGUF file once and keeps it: the kept
    tokenizer splits text and applies the chat template exactly as the converted model's does."""
    from dpo_engine.models.loading import DEFAULT_MODEL, SMOLLM2_TOKENIZER, model_directory
    from dpo_engine.workspace import Workspace

    shared = Workspace.resolve(tmp_path / "shared")  # the suite's model cache: the converted model
    model_directory(DEFAULT_MODEL, workspace=shared)  # converted once per model cache
    converted = load_tokenizer(DEFAULT_MODEL, shared)
    monkeypatch.setenv("DPO_KERNELS_MODEL_CACHE", str(tmp_path / "fresh-cache"))
    fresh = Workspace.resolve(tmp_path / "fresh")
    first = load_tokenizer(DEFAULT_MODEL, fresh)
    assert (fresh.models_dir / SMOLLM2_TOKENIZER / "tokenizer_config.json").is_file()
    assert not (fresh.models_dir / DEFAULT_MODEL).exists()  # no whole-model conversion for a tokenizer
    again = load_tokenizer(DEFAULT_MODEL, fresh)
    import gzip
    import json

    with gzip.open(hh_sample_path, "rt", encoding="utf-8") as fh:
        texts = [json.loads(next(fh))["chosen"] for _ in range(20)]
    texts += ["<|im_start|>user\nhi<|im_end|>", "  spaces\tand\nnewlines  "]
    for tok in (first, again):
        assert [tok.encode(t) for t in texts] == [converted.encode(t) for t in texts]
        chat = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
        assert tok.apply_chat_template(chat, tokenize=False) == converted.apply_chat_template(chat, tokenize=False)
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
            converted.pad_token_id,
            converted.eos_token_id,
            converted.bos_token_id,
        )
