"""What only a GPU can show: the training paths on a CUDA device (`make test-gpu`; skipped elsewhere).

The same checks as the CPU suite's, moved to the device where kernels, autocast and TF32 differ:
the chunked LM head's bf16 gradient against float64, the speed paths (packed rows with a block
mask through SDPA, the reference cache) against the plain layout, flex_attention's block mask
against SDPA's dense one in training, a bf16 run, an fp16 run whose gradient scaler skips steps,
and the job's memory check against the GPU's free memory.
`DPO_TEST_DEVICE=cpu` runs the ones that do not need CUDA itself on the CPU, which is how they are
checked on a machine without a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dpo_engine import rundir
from dpo_engine.lm_head import head_token_logps
from dpo_engine.losses import token_logps
from dpo_engine.train.trainer import train
from tests.test_train import assert_full_fine_tunes_reference_is_the_policy, make_config
from tests.test_train_speed_paths import varied_pairs

DEVICE = os.environ.get("DPO_TEST_DEVICE") or ("cuda:0" if torch.cuda.is_available() else None)
CUDA = DEVICE is not None and DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (make test-gpu) or DPO_TEST_DEVICE=cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA itself")


def test_bf16_head_gradient_on_the_device_matches_the_plain_path():
    """Confident tokens (p_y > 0.99): the chunked head's bf16 gradient is as close to float64 as
    autograd's plain bf16 path on the same device."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(4096, 64, generator=gen, dtype=torch.float64)
    labels = (hidden @ weight.T).argmax(-1)
    hidden = hidden * 6
    h64 = hidden.clone().requires_grad_()
    (exact,) = torch.autograd.grad(token_logps(h64 @ weight.T, labels).sum(), [h64])

    def error(fn) -> float:
        h = hidden.to(DEVICE, torch.bfloat16).requires_grad_()
        (g,) = torch.autograd.grad(fn(h, weight.to(DEVICE, torch.bfloat16), labels.to(DEVICE)).sum(), [h])
        return float(((g.double().cpu() - exact).norm(dim=-1) / exact.norm(dim=-1)).median())

    plain = error(lambda h, w, y: token_logps(h @ w.T, y))
    chunked = error(lambda h, w, y: head_token_logps(h, w, y, chunk_rows=64))
    assert chunked < max(1.5 * plain, 0.02), (chunked, plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speed_paths_on_the_device_equal_the_plain_layout(workspace, tmp_path, dtype):
    """Packed rows (block mask) and the reference cache against one row per sequence without a
    cache, on the device: the same losses and held-out values, to the precision's rounding."""

    def run(name: str, fast: bool):
        cfg = make_config(
            model={"lora": True, "lora_dropout": 0.0, "dtype": dtype},
            method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5}},
            optimisation={"max_steps": 4, "pack_pairs": fast, "reference_cache": fast},
            monitoring={"eval_every": 2, "snapshot_every": 2, "eval_divergences": True, "divergence_pairs": 4},
        )
        summary = train(cfg, tmp_path / name, workspace=workspace, pairs=varied_pairs(40), device=DEVICE)
        assert summary["status"] == "succeeded", summary["error"]
        assert summary["device"].startswith(DEVICE.split(":")[0])
        return rundir.read_metrics(tmp_path / name), rundir.read_eval(tmp_path / name)

    slow_m, slow_e = run("slow", False)
    fast_m, fast_e = run("fast", True)
    tol = {"float32": 2e-3, "bfloat16": 3e-2}[dtype]  # TF32 products on Ampere and later; bf16 rounding
    for col in ("loss", "loss_pref", "margin"):
        np.testing.assert_allclose(fast_m[col], slow_m[col], rtol=tol, atol=tol)
    for col in ("loss_pref", "reward_chosen", "reward_rejected", "div_kl"):
        np.testing.assert_allclose(fast_e[col], slow_e[col], rtol=tol, atol=tol)
    assert np.isfinite(fast_m["grad_norm"]).all()


@needs_cuda
@pytest.mark.parametrize(("dtype", "checkpointing"), [("float32", "off"), ("bfloat16", "on")])
def test_flex_attention_trains_as_sdpa_does(workspace, tmp_path, dtype, checkpointing):
    """Packed rows through flex_attention's block mask against the same rows through SDPA's dense
    mask: the same losses, gradient norms and held-out values, to the precision's rounding. No
    reference cache, so each run's reference passes and calibration go through its own attention."""

    def run(name: str, attention: str):
        cfg = make_config(
            model={
                "lora": True,
                "lora_dropout": 0.0,
                "dtype": dtype,
                "attn_implementation": attention,
                "gradient_checkpointing": checkpointing,
            },
            method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5}},
            optimisation={"max_steps": 4, "pack_pairs": True, "reference_cache": False},
            monitoring={"eval_every": 2},
        )
        summary = train(cfg, tmp_path / name, workspace=workspace, pairs=varied_pairs(40), device=DEVICE)
        assert summary["status"] == "succeeded", summary["error"]
        return rundir.read_metrics(tmp_path / name), rundir.read_eval(tmp_path / name)

    sdpa_m, sdpa_e = run("sdpa", "sdpa")
    flex_m, flex_e = run("flex", "flex_attention")
    tol = {"float32": 2e-3, "bfloat16": 3e-2}[dtype]
    for col in ("loss", "loss_pref", "margin", "grad_norm"):
        np.testing.assert_allclose(flex_m[col], sdpa_m[col], rtol=tol, atol=tol)
    for col in ("loss_pref", "reward_chosen", "reward_rejected"):
        np.testing.assert_allclose(flex_e[col], sdpa_e[col], rtol=tol, atol=tol)


@needs_cuda
def test_fp16_run_survives_skipped_steps_and_its_schedule_waits(workspace, tmp_path):
    """fp16 with a learning rate that overflows the first scaled steps: the scaler skips them, the run
    goes on, and the schedule advances only on steps that updated."""
    cfg = make_config(
        model={"lora": True, "dtype": "float16"},
        optimisation={"max_steps": 6, "scheduler": "linear", "lr": 1e-3},
    )
    summary = train(cfg, tmp_path / "fp16", workspace=workspace, pairs=varied_pairs(40), device=DEVICE)
    assert summary["status"] == "succeeded", summary["error"]
    metrics = rundir.read_metrics(tmp_path / "fp16")
    skipped = ~np.isfinite(metrics["grad_norm"].to_numpy())
    lrs = metrics["lr"].to_numpy()
    for i in np.flatnonzero(skipped[:-1]):  # the lr logged at the step after a skipped one is unchanged
        assert lrs[i + 1] == lrs[i]


@needs_cuda
def test_the_jobs_memory_check_reads_free_gpu_memory(workspace):
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.inputs import check_memory
    from tests.conftest import HH_SAMPLE

    cfg = TrainConfig.model_validate({"data": {"dataset": str(HH_SAMPLE)}, "model": {"name": "tiny-random"}})
    free = check_memory(cfg, workspace, DEVICE, free=True)
    total = check_memory(cfg, workspace, DEVICE)
    assert free.free and not total.free and free.available <= total.available
    assert "free on cuda" in free.summary()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_full_fine_tunes_reference_computes_what_the_policy_does_on_the_device(workspace, tmp_path, dtype):
    assert_full_fine_tunes_reference_is_the_policy(workspace, tmp_path, dtype, DEVICE)
