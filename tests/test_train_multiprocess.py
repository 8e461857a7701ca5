"""Two training processes on CPU (gloo): one run directory, metrics averaged over both processes'
batches, and a resume from the checkpoint the first launch left."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_engine.train import rundir
from dpo_engine.train.launch import launch_training
from dpo_engine.train.trainer import DPOTrainer
from tests.test_train import make_config

WORDS = "red blue green sky sea tree stone river cloud fire bird road".split()


def varied_pairs(n: int = 40) -> pd.DataFrame:
    """Pairs whose texts differ, so each process's batch has its own loss."""
    rng = random.Random(0)
    return pd.DataFrame({
        "prompt": [f"Question {i}: " + " ".join(rng.choices(WORDS, k=4)) for i in range(n)],
        "chosen": [" ".join(rng.choices(WORDS, k=5)) for i in range(n)],
        "rejected": [" ".join(rng.choices(WORDS, k=3)) for i in range(n)],
    })


def _config(data, max_steps: int, processes: int = 2):
    return make_config(data={"dataset": str(data)},
                       optimisation={"max_steps": max_steps, "processes": processes, "batch_size": 2,
                                     "scheduler": "constant"},
                       monitoring={"eval_every": 1000, "snapshot_every": 1000, "checkpoint_every": 1})


def test_two_processes_log_the_mean_over_both_batches_and_resume(workspace, tmp_path):
    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    run_dir = workspace.runs_dir / "mp"

    lines: list[str] = []
    first = launch_training(_config(data, 1), run_dir, workspace=workspace, device="cpu", log=lines.append)
    assert first["status"] == "succeeded", first["error"]
    after_step_1 = tmp_path / "weights_step1.pt"
    shutil.copy(rundir.latest_checkpoint(run_dir) / "weights.pt", after_step_1)

    second = launch_training(_config(data, 3), run_dir, workspace=workspace, device="cpu", log=lines.append)
    assert second["status"] == "succeeded", second["error"]
    assert any("resumed from checkpoints/step_1" in line for line in lines)
    assert [p.name for p in workspace.runs_dir.iterdir()] == ["mp"]  # one run directory
    assert sorted(p.name for p in run_dir.glob("*.jsonl")) == ["eval.jsonl", "eval_margins.jsonl", "metrics.jsonl"]
    metrics = rundir.read_metrics(run_dir)
    assert metrics["step"].tolist() == [1, 2, 3]  # each step once, written by one process

    # Independently: step 2 from the saved step-1 weights on each process's shard, in one process.
    ref = DPOTrainer(_config(data, 3, processes=1), tmp_path / "check", workspace=workspace)
    ref.setup()
    named = dict(ref._unwrapped().named_parameters())
    with torch.no_grad():
        for name, value in torch.load(after_step_1).items():
            named[name].copy_(value)
    ref.model.train()
    perm = np.random.default_rng([0, 0]).permutation(len(ref.train_pairs))
    per_process = []
    for rank in range(2):  # step 2 is micro-batch 1: pairs (1 * 2 + rank) * 2 ... + 2 of the epoch's order
        start = (1 * 2 + rank) * 2
        batch = ref._collate([ref.train_pairs[i] for i in perm[start : start + 2]])
        with torch.no_grad():
            out = ref._compute(batch, beta=0.1, train=True).out
        per_process.append((float(out.loss), float(out.margins.mean())))
    (loss_0, margin_0), (loss_1, margin_1) = per_process
    assert abs(loss_0 - loss_1) > 1e-3  # the two shards disagree, so logging rank 0 alone would fail below
    logged = metrics.set_index("step").loc[2]
    assert logged["loss"] == pytest.approx((loss_0 + loss_1) / 2, abs=1e-5)
    assert logged["margin"] == pytest.approx((margin_0 + margin_1) / 2, abs=1e-5)


def test_train_job_with_two_processes_runs_through_the_worker(workspace, tmp_path):
    import subprocess
    import sys

    from dpo_engine.jobs import JobStore

    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    store = JobStore.for_workspace(workspace)
    job = store.submit("train", _config(data, 2).model_dump(mode="json"), title="two processes")
    subprocess.run([sys.executable, "-m", "dpo_engine.cli", "worker", "--device", "cpu", "--once",
                    "--workspace", str(workspace.root)], check=True, timeout=240,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    metrics = rundir.read_metrics(done.run_dir)
    assert metrics["step"].tolist() == [1, 2]
    assert metrics["epoch"].tolist() == [1 / 8, 2 / 8]  # 32 training pairs, 2 x 2 per step: 8 steps an epoch
    assert "eval step 2" in (Path(done.run_dir) / rundir.LOG).read_text()
