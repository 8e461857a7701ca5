"""Packed rows' attention in each form a model takes (model.attn_implementation): the dense boolean
mask for SDPA, the additive one for eager, flex_attention's BlockMask. One rule (`packed_sees`) makes
all three; here they give the same logits on a grouped-query model (forward only: PyTorch has no
flex_attention backward pass on the CPU, so the training equality is in tests/test_gpu.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.losses import sum_by_sequence, token_logps
from dpo_engine.train.data import collate, collate_packed, packed_attention_mask, packed_mask_mod
from dpo_engine.train.passes import ModelPasses

# flex_attention runs compiled: on the CPU, inductor builds its kernel with the C++ compiler
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="flex_attention on the CPU needs g++")


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(1, 250, rng.integers(lo, hi)).tolist()

    return [TokenizedPair(str(i), ids(1, 40), ids(1, 30), ids(1, 30)) for i in range(n)]


def test_flex_mask_mod_allows_exactly_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    batch = collate_packed(_pairs(9), pad_token_id=0)
    rows, width = batch.segment.shape
    dense = packed_attention_mask(batch.segment, batch.owner)
    from_mod = create_mask(packed_mask_mod(batch.segment, batch.owner), rows, 1, width, width, device="cpu")
    assert from_mod.shape == dense.shape
    assert torch.equal(from_mod, dense)


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def _logits(model, batch, attention: str) -> torch.Tensor:
    if attention == "flex_attention":
        # compiled afresh for each shape: inductor's CPU flex kernel fails to build once it turns dynamic
        torch._dynamo.reset()
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            return model(
                input_ids=batch.input_ids,
                attention_mask=ModelPasses.attention_mask(batch, attention),
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attention", ["eager", pytest.param("flex_attention", marks=needs_compiler)])
def test_each_attention_form_gives_the_sdpa_logits_on_packed_rows(gqa_model, attention):
    batch = collate_packed(_pairs(7, seed=1), pad_token_id=0)
    expected = _logits(gqa_model, batch, "sdpa")
    got = _logits(gqa_model, batch, attention)
    real = batch.segment < 3  # padding positions see only themselves: their values are not compared
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


@needs_compiler
def test_packed_flex_log_probs_equal_the_plain_layout(gqa_model):
    """flex_attention on packed rows against one row per sequence with SDPA: each sequence's
    log-probability is the one it has alone."""
    pairs = _pairs(5, seed=2)

    def sequence_logps(batch, attention: str) -> torch.Tensor:
        logits = _logits(gqa_model, batch, attention)[batch.token_rows, batch.token_cols]
        values = token_logps(logits, batch.token_labels)
        return sum_by_sequence(values, batch.token_seq, 2 * batch.n_pairs)

    flex = sequence_logps(collate_packed(pairs, pad_token_id=0), "flex_attention")
    sdpa = sequence_logps(collate(pairs, pad_token_id=0), "sdpa")
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-3)


def test_flex_attention_is_refused_off_a_gpu_in_one_line(workspace):
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.inputs import check_memory
    from dpo_engine.train.setup import requested_attention
    from tests.conftest import HH_SAMPLE

    assert requested_attention("sdpa", "cpu") is None  # transformers' own default
    assert requested_attention("eager", "cpu") == "eager"
    assert requested_attention("flex_attention", "cuda:0") == "flex_attention"
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": str(HH_SAMPLE)},
            "model": {"name": "tiny-random", "attn_implementation": "flex_attention"},
        }
    )
    with pytest.raises(ValueError, match="flex_attention trains only on NVIDIA GPUs") as err:
        check_memory(cfg, workspace, "cpu")
    assert "\n" not in str(err.value)


def test_the_cli_refuses_flex_attention_on_the_cpu_before_estimating(workspace):
    from typer.testing import CliRunner

    from dpo_engine.cli import app
    from tests.conftest import HH_SAMPLE

    base = ["train", str(HH_SAMPLE), "--model", "tiny-random", "-w", str(workspace.root)]
    for extra in (["--dry-run"], ["--foreground", "--max-steps", "1"]):
        result = CliRunner().invoke(app, [*base, "--attn-implementation", "flex_attention", "--device", "cpu", *extra])
        assert result.exit_code != 0, result.output
        assert "flex_attention trains only on NVIDIA GPUs" in result.output and "Traceback" not in result.output
