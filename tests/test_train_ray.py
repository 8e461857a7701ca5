"""Multi-process training on a Ray cluster: two Ray Train workers on CPU (gloo) on the local Ray head.

The same checks as torch.distributed.run's (tests/test_train_multiprocess.py): one run directory,
metrics averaged over both workers' batches, resume; plus cancel, Ray Train's storage kept inside
the run directory, and train jobs with two processes sent through `worker --backend ray`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from dpo_engine import rundir
from dpo_engine.jobs import CANCELLED, SUCCEEDED, Job
from dpo_engine.jobs.ray_backend import job_resources
from dpo_engine.train.ray_train import launch_training_on_ray
from tests.helpers import assert_step_2_is_the_mean_of_both_shards
from tests.test_jobs_ray import _wait_finished, dispatcher, ray_address, ray_head, ray_ws, rstore  # noqa: F401 - fixtures
from tests.test_jobs_worker import pid_gone, wait_until
from tests.test_train_multiprocess import multiprocess_config, varied_pairs


def _pairs(tmp_path: Path) -> Path:
    data = tmp_path / "pairs.jsonl"
    varied_pairs().to_json(data, orient="records", lines=True)
    return data


def _ray_train_workers() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_a_multi_process_train_job_leaves_the_resources_to_its_ray_train_workers():
    def job(processes):
        return Job(
            id=1,
            kind="train",
            executor="m:f",
            run_id="r",
            run_dir="/tmp/r",
            created_at="2026-01-01T00:00:00Z",
            params={"optimisation": {"processes": processes}},
        )

    assert job_resources(job(2), cluster_gpus=2) == {"num_cpus": 0.0, "num_gpus": 0.0}
    assert job_resources(job(1), cluster_gpus=2) == {"num_cpus": 1.0, "num_gpus": 1.0}


@pytest.mark.timeout(1200)
def test_two_ray_train_workers_log_the_mean_over_both_batches_resume_and_cancel(ray_address, workspace, tmp_path):
    data = _pairs(tmp_path)
    run_dir = workspace.runs_dir / "ray"
    ray_results = Path.home() / "ray_results"  # where Ray Train would store runs by default
    before = sorted(ray_results.iterdir()) if ray_results.is_dir() else None

    lines: list[str] = []
    first = launch_training_on_ray(
        multiprocess_config(data, 1), run_dir, workspace=workspace, address=ray_address, log=lines.append
    )
    assert first["status"] == "succeeded", first["error"]
    after_step_1 = tmp_path / "weights_step1.pt"
    shutil.copy(rundir.latest_checkpoint(run_dir) / "weights.pt", after_step_1)

    second = launch_training_on_ray(
        multiprocess_config(data, 2), run_dir, workspace=workspace, address=ray_address, log=lines.append
    )
    assert second["status"] == "succeeded", second["error"]
    assert any("resumed from checkpoints/step_1" in line for line in lines)  # rank 0's log reaches the caller
    assert [p.name for p in workspace.runs_dir.iterdir()] == ["ray"]  # one run directory
    metrics = rundir.read_metrics(run_dir)
    assert metrics["step"].tolist() == [1, 2]  # each step once, written by one process
    assert metrics["epoch"].tolist() == [1 / 8, 2 / 8]  # 32 training pairs, 2 workers x 2 per step
    assert_step_2_is_the_mean_of_both_shards(
        metrics, multiprocess_config(data, 2, processes=1), after_step_1, workspace, tmp_path / "check"
    )
    assert (run_dir / "ray_train" / "fit").is_dir()  # Ray Train's storage, inside the run directory
    assert (sorted(ray_results.iterdir()) if ray_results.is_dir() else None) == before  # and nowhere else

    third = launch_training_on_ray(
        multiprocess_config(data, 200),
        run_dir,
        workspace=workspace,
        address=ray_address,
        should_stop=lambda: rundir.read_metrics(run_dir)["step"].max() >= 3,
        log=lines.append,
    )
    assert third["status"] == "cancelled" and 3 <= third["steps_completed"] < 200, third
    assert rundir.read_summary(run_dir)["status"] == "cancelled"  # both workers stopped at one step; rank 0 wrote it


@pytest.mark.timeout(1200)
def test_train_job_with_two_processes_runs_on_ray_train(rstore, ray_ws, tmp_path):
    job = rstore.submit("train", multiprocess_config(_pairs(tmp_path), 2).model_dump(mode="json"), title="two workers")
    done = _wait_finished(rstore, job.id, 600)
    assert done.status == SUCCEEDED, done.error
    assert done.result["steps_completed"] == 2
    assert rundir.read_metrics(done.run_dir)["epoch"].tolist() == [1 / 8, 2 / 8]  # two processes: 8 steps an epoch
    log = done.log_path.read_text()
    assert "on cpu by worker ray-" in log and "eval step 2" in log  # rank 0's lines in the job's log
    assert (Path(done.run_dir) / "ray_train" / "fit").is_dir()
    dispatched = (ray_ws.root / "dispatcher.log").read_text().splitlines()
    sent = [line for line in dispatched if f"job {job.id} (train) sent" in line]
    assert sent and sent[0].endswith("asking for {'num_cpus': 0.0, 'num_gpus': 0.0}"), sent


@pytest.mark.timeout(1200)
def test_cancel_a_train_job_on_ray_train(rstore, tmp_path):
    job = rstore.submit("train", multiprocess_config(_pairs(tmp_path), 500).model_dump(mode="json"), title="cancelled")
    # Two Ray Train workers start beside the rest of the suite on two cores: allow for a slow start.
    wait_until(lambda: (Path(job.run_dir) / rundir.METRICS).exists(), 300, "the first step")
    workers = _ray_train_workers()
    assert len(workers) >= 2
    rstore.request_cancel(job.id)
    done = _wait_finished(rstore, job.id, 60)
    assert done.status == CANCELLED, done.error
    log = done.log_path.read_text()
    # the job's own cancel path: the worker's SIGTERM, or the job seeing the request first and stopping its workers
    own_stop = (f"[job {job.id}] stopped by SIGTERM", f"[job {job.id}] training cancelled on request")
    assert any(line in log for line in own_stop) and "Traceback" not in log, log[-2000:]
    assert rundir.read_summary(done.run_dir)["status"] == "cancelled"
    wait_until(lambda: all(pid_gone(pid) for pid in workers), 30, "the Ray Train workers to end")
