"""Run directories written by the real trainer on tiny-random, in every state the pages must handle.

Built once per test session (a few tiny runs) and shared by the page and report tests:
- ok_hmk     succeeded, hmk + kl, ε-DPO on (β varies), WeightWatcher before/after
- cancelled  stopped on request after two steps
- running    job row running; its files are a real partial run with a half-written last line
- failed     NaN guard (learning rate 1e10): failed summary, error, log
- empty      queued, nothing written yet
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import deep_merge

TINY = {
    "data": {"max_pairs": 24, "min_eval_pairs": 8, "max_length": 40, "max_prompt_length": 20},
    "model": {"name": "tiny-random"},
    "method": {"calibration_pairs": 16},
    "optimisation": {"max_steps": 4, "batch_size": 2, "warmup_ratio": 0.0},
    "monitoring": {"eval_every": 2, "snapshot_every": 2, "probe_pairs": 8, "checkpoint_every": 100, "htsr": False},
}


@dataclass(frozen=True)
class RunWorkspace:
    root: Path
    dataset_id: str
    runs: dict[str, str]  # state -> run_id
    jobs: dict[str, int]  # state -> job id


def _config(dataset: str, **groups):
    from dpo_engine.train.config import TrainConfig

    base = {k: dict(v) for k, v in TINY.items()}
    base["data"]["dataset"] = dataset
    for group, values in groups.items():
        base[group] = deep_merge(base[group], values)
    return TrainConfig.model_validate(base)


def _train_job(store, ws, run_id, config, *, should_stop=None, title=""):
    from dpo_engine.train.trainer import train

    job = store.submit("train", config.model_dump(mode="json"), title=title or run_id, run_id=run_id)
    store.claim("fixture-worker", "cpu")
    log_path = Path(job.run_dir) / "log.txt"

    def log(line: str) -> None:
        with log_path.open("a") as handle:
            handle.write(line + "\n")

    summary = train(config, job.run_dir, workspace=ws, log=log, should_stop=should_stop)
    return job, summary


@functools.lru_cache(maxsize=1)
def build_run_workspace() -> RunWorkspace:
    from dpo_engine.data.store import ensure_sample_dataset
    from dpo_engine.jobs import JobStore
    from dpo_engine.workspace import Workspace

    ws = Workspace.resolve(Path(tempfile.mkdtemp(prefix="ui-runs-")) / "ws")
    dataset = ensure_sample_dataset(ws).id
    store = JobStore.for_workspace(ws)
    runs, jobs = {}, {}

    cfg = _config(
        dataset,
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"epsilon_dpo": 0.05}},
        monitoring={"htsr": True},
    )
    job, summary = _train_job(store, ws, "ok-hmk", cfg)
    assert summary["status"] == "succeeded", summary.get("error")
    store.finish(job.id, "succeeded", result={"status": "succeeded"})
    runs["ok_hmk"], jobs["ok_hmk"] = job.run_id, job.id

    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    cfg = _config(
        dataset, method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}}, optimisation={"max_steps": 5}
    )
    job, summary = _train_job(store, ws, "cancelled", cfg, should_stop=stop_after_two)
    assert summary["status"] == "cancelled", summary
    store.finish(job.id, "cancelled", error="cancelled on request")
    runs["cancelled"], jobs["cancelled"] = job.run_id, job.id

    cfg = _config(
        dataset,
        method={"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}},
        model={"lora": False},
        optimisation={"lr": 1e10, "max_grad_norm": 1e12},
    )
    job, summary = _train_job(store, ws, "failed", cfg)
    assert summary["status"] == "failed", summary
    store.finish(job.id, "failed", error=summary["error"])
    runs["failed"], jobs["failed"] = job.run_id, job.id

    # running: the job is claimed and its directory holds a real partial run (the cancelled one's
    # files, no summary, model or final rows) with a torn last metrics line, as seen mid-write.
    job = store.submit("train", store.get(jobs["cancelled"]).params, title="still running", run_id="running")
    store.claim("fixture-worker", "cpu")
    store.set_progress(job.id, 0.34, "step 2/5")
    source, target = ws.run_dir("cancelled"), Path(job.run_dir)
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "log.txt"):
        shutil.copy(source / name, target / name)
    shutil.copytree(source / "snapshots", target / "snapshots")
    with (target / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.69')
    runs["running"], jobs["running"] = job.run_id, job.id

    job = store.submit("train", store.get(jobs["ok_hmk"]).params, title="waiting", run_id="empty")
    runs["empty"], jobs["empty"] = job.run_id, job.id
    return RunWorkspace(ws.root, dataset, runs, jobs)


@pytest.fixture
def run_workspace(monkeypatch) -> RunWorkspace:
    built = build_run_workspace()
    monkeypatch.setenv("DPO_KERNELS_WORKSPACE", str(built.root))
    monkeypatch.delenv("DPO_KERNELS_DB_URL", raising=False)
    return built


def test_fixture_runs_are_in_the_promised_states(run_workspace):
    from dpo_engine.jobs import JobStore
    from dpo_engine.workspace import Workspace

    store = JobStore.for_workspace(Workspace.resolve(run_workspace.root))
    states = {state: store.get(job_id).status for state, job_id in run_workspace.jobs.items()}
    assert states == {
        "ok_hmk": "succeeded",
        "cancelled": "cancelled",
        "failed": "failed",
        "running": "running",
        "empty": "queued",
    }
    assert not any((run_workspace.root / "runs" / "empty").iterdir())
