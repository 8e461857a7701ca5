"""A training job whose worker is SIGKILLed mid-run is requeued and resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dpo_engine import rundir
from dpo_engine.jobs import JobStore
from tests.test_train import make_config, toy_pairs

MAX_STEPS = 60


def _worker(workspace, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dpo_engine.cli",
        "worker",
        "--device",
        "cpu",
        "--workspace",
        str(workspace.root),
        "--heartbeat-s",
        "0.5",
        "--poll-s",
        "0.2",
        *extra,
    ]


def test_killed_worker_train_job_resumes_on_next_worker(workspace, tmp_path):
    data = tmp_path / "toy.jsonl"
    toy_pairs(40).drop(columns="pair_id").to_json(data, orient="records", lines=True)
    cfg = make_config(
        data={"dataset": str(data)},
        optimisation={"max_steps": MAX_STEPS},
        monitoring={"checkpoint_every": 2, "eval_every": 1000, "snapshot_every": 1000},
    )
    store = JobStore.for_workspace(workspace)
    job = store.submit("train", cfg.model_dump(mode="json"), title="resume me")
    run_dir = Path(job.run_dir)

    first = subprocess.Popen(_worker(workspace), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (rundir.latest_checkpoint(run_dir) and rundir.read_metrics(run_dir).shape[0] >= 3):
            assert first.poll() is None, "the worker exited early"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)  # the worker dies without a word; its child follows it
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = int(rundir.read_metrics(run_dir)["step"].max())
    assert killed_at < MAX_STEPS, "the run finished before the worker could be killed"
    assert store.get(job.id).status == "running"  # nobody has noticed yet

    time.sleep(2.5)  # let the heartbeat go stale
    subprocess.run(
        _worker(workspace, "--once", "--lost-timeout", "2"),
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert "resumed from checkpoints" in (run_dir / "log.txt").read_text()
    steps = rundir.read_metrics(run_dir)["step"].tolist()
    assert steps == list(range(1, MAX_STEPS + 1))  # every step logged exactly once across both attempts


def test_a_resume_restores_only_its_own_gpus_generator():
    """Checkpoints hold the CUDA generator of the saving process's GPU; ones of earlier versions held
    one per visible GPU, of which rank 0's is the first. A CPU run restores none."""
    import torch

    from dpo_engine.train.checkpoint import _own_cuda_rng

    state = torch.arange(8, dtype=torch.uint8)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert _own_cuda_rng(state, gpu) is state
    assert _own_cuda_rng([state, state + 1], gpu) is state  # the earlier list form: rank 0's GPU
    assert _own_cuda_rng(state, cpu) is None and _own_cuda_rng(None, gpu) is None and _own_cuda_rng([], gpu) is None
