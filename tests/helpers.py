"""Small helpers shared by test modules."""

from __future__ import annotations


def deep_merge(a: dict, b: dict) -> dict:
    """`a` updated by `b`, recursing into nested dicts (for partial config overrides)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def assert_step_2_is_the_mean_of_both_shards(
    metrics, one_process_config, weights_after_step_1, workspace, scratch
) -> None:
    """Logged step 2 of a two-process run (metrics.jsonl as a frame; 2 pairs per process and step, as
    tests/test_train_multiprocess.py's multiprocess_config) is the mean over both processes' batches:
    recomputed here in one process from the saved step-1 weights, on each process's shard."""
    import numpy as np
    import pytest
    import torch

    from dpo_engine.train.trainer import DPOTrainer

    ref = DPOTrainer(one_process_config, scratch, workspace=workspace)
    ref.setup()
    named = dict(ref.passes.unwrapped().named_parameters())
    with torch.no_grad():
        for name, value in torch.load(weights_after_step_1).items():
            named[name].copy_(value)
    ref.parts.model.train()
    train_pairs = ref.parts.train_pairs
    perm = np.random.default_rng([0, 0]).permutation(len(train_pairs))
    per_process = []
    for rank in range(2):  # step 2 is micro-batch 1: pairs (1 * 2 + rank) * 2 ... + 2 of the epoch's order
        start = (1 * 2 + rank) * 2
        batch = ref.passes.collate([train_pairs[i] for i in perm[start : start + 2]])
        with torch.no_grad():
            out = ref.step.compute(batch, beta=0.1, train=True).out
        per_process.append((float(out.loss), float(out.margins.mean())))
    (loss_0, margin_0), (loss_1, margin_1) = per_process
    assert abs(loss_0 - loss_1) > 1e-3  # the two shards disagree, so logging rank 0 alone would fail below
    logged = metrics.set_index("step").loc[2]
    assert logged["loss"] == pytest.approx((loss_0 + loss_1) / 2, abs=1e-5)
    assert logged["margin"] == pytest.approx((margin_0 + margin_1) / 2, abs=1e-5)


def run_worker_once(workspace, timeout: float = 300) -> None:
    """Run the next queued job of `workspace` with a real worker process (`dpo-kernels worker --once`)."""
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_engine.cli",
            "worker",
            "--once",
            "--device",
            "cpu",
            "--workspace",
            str(workspace.root),
        ],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
