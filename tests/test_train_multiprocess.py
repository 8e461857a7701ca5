"""Two training processes on CPU (gloo): one run directory, metrics averaged over both processes'
batches, and a resume from the checkpoint the first launch left."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from dpo_engine import rundir
from dpo_engine.names import divergence_metric
from dpo_engine.train.launch import launch_training
from tests.helpers import assert_step_2_is_the_mean_of_both_shards, deep_merge
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


def test_two_processes_share_the_evaluation_and_both_fill_the_reference_cache(workspace, tmp_path):
    """Each process evaluates half of the held-out batches: the gathered step-0 row, per-pair
    margins and probe-set score equal one process's; the reference cache holds the pairs of both
    processes' batches (not only rank 0's)."""
    from dpo_engine.train.reference import ReferenceCache
    from dpo_engine.train.trainer import train

    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    settings = {
        "optimisation": {"batch_size": 2, "scheduler": "constant"},
        "monitoring": {"eval_every": 2, "snapshot_every": 2, "eval_divergences": True, "divergence_pairs": 4},
        "method": {"divergence": {"name": "kl"}},
    }
    two_settings = deep_merge(
        settings, {"optimisation": {"max_steps": 2, "processes": 2}, "monitoring": {"htsr": "on"}}
    )
    two = make_config(data={"dataset": str(data)}, **two_settings)
    lines: list[str] = []
    summary = launch_training(two, workspace.runs_dir / "two", workspace=workspace, device="cpu", log=lines.append)
    assert summary["status"] == "succeeded", summary["error"]
    # the layer analyses wait for the end of training, on rank 0, so no process waits on them
    assert any("HT-SR before and after training both run at the end" in line for line in lines)
    assert summary["weighted_alpha_before"] is not None and summary["weighted_alpha_after"] is not None
    assert all((workspace.runs_dir / "two" / f).is_file() for f in (rundir.HTSR_BEFORE, rundir.HTSR_AFTER))
    caches = list((workspace.root / "reference_cache").glob("*.npz"))
    assert len(caches) == 1
    n_eval, steps, processes, batch = 8, 2, 2, 2
    assert ReferenceCache(workspace.root, caches[0].stem).count() == n_eval + steps * processes * batch

    one = make_config(data={"dataset": str(data)}, **deep_merge(settings, {"optimisation": {"max_steps": 2}}))
    assert train(one, tmp_path / "one", workspace=workspace)["status"] == "succeeded"
    rows = {
        name: rundir.read_eval(d).set_index("step")
        for name, d in (("one", tmp_path / "one"), ("two", workspace.runs_dir / "two"))
    }
    assert rows["two"].index.tolist() == [0, 2]
    pd.testing.assert_series_equal(rows["two"].loc[0], rows["one"].loc[0], rtol=1e-5, atol=1e-6)
    margins_two, margins_one = (
        rundir.read_eval_margins(workspace.runs_dir / "two"),
        rundir.read_eval_margins(tmp_path / "one"),
    )
    assert len(margins_two[0]) == n_eval
    pd.testing.assert_series_equal(margins_two[0], margins_one[0], rtol=1e-5, atol=1e-6)
    assert np.isfinite(rows["two"].loc[2, ["loss_pref", divergence_metric("kl"), "dbs"]].astype(float)).all()


def test_two_processes_evaluate_fewer_batches_than_processes(workspace, tmp_path):
    """One held-out batch for two processes: the second has nothing to evaluate. The policy's
    evaluation passes run outside DDP, whose first forward after a training step would broadcast
    buffers from rank 0 and leave a rank without batches waiting on another collective."""
    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    config = make_config(
        data={"dataset": str(data)},
        optimisation={"max_steps": 2, "processes": 2, "batch_size": 2, "scheduler": "constant"},
        monitoring={"eval_every": 1, "snapshot_every": 1000, "eval_max_pairs": 2, "htsr": "off"},
    )
    summary = launch_training(config, workspace.runs_dir / "few", workspace=workspace, device="cpu", log=print)
    assert summary["status"] == "succeeded", summary["error"]
    evals = rundir.read_eval(workspace.runs_dir / "few")
    assert evals["step"].tolist() == [0, 1, 2] and summary["n_eval_pairs"] == 2
