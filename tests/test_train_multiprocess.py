"""Two training processes on CPU (gloo): one run directory, metrics averaged over both processes'
batches, and a resume from the checkpoint the first launch left."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pandas as pd

from dpo_engine import rundir
from dpo_engine.train.launch import launch_training
from tests.helpers import assert_step_2_is_the_mean_of_both_shards
from tests.test_train import make_config

WORDS = "red blue green sky sea tree stone river cloud fire bird road".split()


def varied_pairs(n: int = 40) -> pd.DataFrame:
    """Pairs whose texts differ, so each process's batch has its own loss."""
    rng = random.Random(0)
    return pd.DataFrame(
        {
            "prompt": [f"Question {i}: " + " ".join(rng.choices(WORDS, k=4)) for i in range(n)],
            "chosen": [" ".join(rng.choices(WORDS, k=5)) for i in range(n)],
            "rejected": [" ".join(rng.choices(WORDS, k=3)) for i in range(n)],
        }
    )


def multiprocess_config(data, max_steps: int, processes: int = 2):
    """Tiny config for N processes: each takes 2 pairs a step, a checkpoint every step."""
    return make_config(
        data={"dataset": str(data)},
        optimisation={"max_steps": max_steps, "processes": processes, "batch_size": 2, "scheduler": "constant"},
        monitoring={"eval_every": 1000, "snapshot_every": 1000, "checkpoint_every": 1},
    )


def test_two_processes_log_the_mean_over_both_batches_and_resume(workspace, tmp_path):
    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    run_dir = workspace.runs_dir / "mp"

    lines: list[str] = []
    first = launch_training(multiprocess_config(data, 1), run_dir, workspace=workspace, device="cpu", log=lines.append)
    assert first["status"] == "succeeded", first["error"]
    after_step_1 = tmp_path / "weights_step1.pt"
    shutil.copy(rundir.latest_checkpoint(run_dir) / "weights.pt", after_step_1)

    second = launch_training(multiprocess_config(data, 3), run_dir, workspace=workspace, device="cpu", log=lines.append)
    assert second["status"] == "succeeded", second["error"]
    assert any("resumed from checkpoints/step_1" in line for line in lines)
    assert [p.name for p in workspace.runs_dir.iterdir()] == ["mp"]  # one run directory
    assert sorted(p.name for p in run_dir.glob("*.jsonl")) == ["eval.jsonl", "eval_margins.jsonl", "metrics.jsonl"]
    metrics = rundir.read_metrics(run_dir)
    assert metrics["step"].tolist() == [1, 2, 3]  # each step once, written by one process

    assert_step_2_is_the_mean_of_both_shards(
        metrics, multiprocess_config(data, 3, processes=1), after_step_1, workspace, tmp_path / "check"
    )


def test_train_job_with_two_processes_runs_through_the_worker(workspace, tmp_path):
    import subprocess
    import sys

    from dpo_engine.jobs import JobStore

    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    store = JobStore.for_workspace(workspace)
    job = store.submit("train", multiprocess_config(data, 2).model_dump(mode="json"), title="two processes")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_engine.cli",
            "worker",
            "--device",
            "cpu",
            "--once",
            "--workspace",
            str(workspace.root),
        ],
        check=True,
        timeout=240,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    metrics = rundir.read_metrics(done.run_dir)
    assert metrics["step"].tolist() == [1, 2]
    assert metrics["epoch"].tolist() == [1 / 8, 2 / 8]  # 32 training pairs, 2 x 2 per step: 8 steps an epoch
    assert "eval step 2" in (Path(done.run_dir) / rundir.LOG).read_text()
