"""The Ray backend: `dpo-kernels worker --backend ray` runs queued jobs on a real local Ray cluster.

One Ray head (2 CPUs, no dashboard, 127.0.0.1 only, with a token) and one dispatcher serve the whole module;
the job table stays the record: status, progress, logs and cancel are checked there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dpo_engine.jobs import CANCELLED, QUEUED, SUCCEEDED, Job, JobStore
from dpo_engine.jobs.ray_backend import job_resources
from dpo_engine.jobs.ray_cluster import remove_temp_dir, start_head, stop_head, write_token
from dpo_engine.jobs.selftest import write_selftest_checkpoint
from dpo_engine.workspace import Workspace
from tests.listening import beyond_loopback, listeners
from tests.test_jobs_worker import pid_gone, read_pids, wait_until

CLI = [sys.executable, "-m", "dpo_engine.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """The product's loopback Ray head (127.0.0.1 only, token authentication) with 2 CPUs, in a temp
    dir of its own; this process and its children join it with its settings while the module runs."""
    temp = Path(tempfile.mkdtemp(prefix="dpo-ray-"))  # short: Ray's Unix socket paths live under it
    head = start_head(
        temp, token_path=write_token(temp / "auth_token"), num_cpus=2, num_gpus=0, object_store_memory=100_000_000
    )
    saved = {name: os.environ.get(name) for name in head.env}
    os.environ.update(head.env)
    try:
        yield head
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_head(head, grace_s=3)  # a test head has nothing to drain
        remove_temp_dir(head)


@pytest.fixture(scope="module")
def ray_address(ray_head):
    return ray_head.address


@pytest.fixture(scope="module")
def ray_ws(tmp_path_factory):
    return Workspace.resolve(tmp_path_factory.mktemp("ray_ws") / "ws")


@pytest.fixture(scope="module")
def dispatcher(ray_address, ray_ws):
    """`dpo-kernels worker --backend ray` for the module's workspace, stopped with SIGTERM at the end."""
    log = open(ray_ws.root / "dispatcher.log", "w")
    proc = subprocess.Popen(
        [
            *CLI,
            "worker",
            "--backend",
            "ray",
            "--address",
            ray_address,
            "--workspace",
            str(ray_ws.root),
            "--poll-s",
            "0.2",
            "--heartbeat-s",
            "0.5",
            "--lost-timeout",
            "10",
            "--max-jobs",
            "3",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, DPO_KERNELS_WORKSPACE=str(ray_ws.root)),
    )
    yield proc
    _stop_group(proc, grace_s=40)
    log.close()


@pytest.fixture
def rstore(ray_ws, dispatcher):
    s = JobStore.for_workspace(ray_ws)
    yield s
    s.close()


def _wait_finished(store: JobStore, job_id: int, timeout: float = 240) -> Job:
    return wait_until(lambda: (j := store.get(job_id)).is_finished and j, timeout, f"job {job_id} to finish")


def test_resources_follow_kind_and_device():
    def job(kind, device=None):
        return Job(
            id=1,
            kind=kind,
            executor="m:f",
            run_id="r",
            run_dir="/tmp/r",
            created_at="2026-01-01T00:00:00Z",
            requested_device=device,
        )

    assert job_resources(job("train"), cluster_gpus=2) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert job_resources(job("train"), cluster_gpus=0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert job_resources(job("train", "cpu"), cluster_gpus=2) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert job_resources(job("diagnose"), cluster_gpus=2) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert job_resources(job("diagnose", "cuda:0"), cluster_gpus=2) == {"num_cpus": 2.0, "num_gpus": 1.0}


def test_the_cluster_and_its_driver_listen_on_loopback_only(ray_head, dispatcher, rstore):
    wait_until(lambda: any(w.device == "ray" for w in rstore.alive_workers(30)), 120, "the dispatcher to connect")
    found = listeners(ray_head.pid, dispatcher.pid)
    assert {name for _, _, name in found} >= {"gcs_server", "raylet"}, found
    assert beyond_loopback(found) == [], found


def test_selftests_run_at_once_on_the_cluster(rstore):
    jobs = [rstore.submit("selftest", {"seconds": 3, "steps": 6}) for _ in range(2)]
    done = [_wait_finished(rstore, j.id) for j in jobs]
    assert [d.status for d in done] == [SUCCEEDED, SUCCEEDED], [d.error for d in done]
    assert all(d.result == {"steps_done": 6, "stopped_early": False, "resumed_from": 0} for d in done)
    assert done[0].worker_id != done[1].worker_id and all(d.worker_id.startswith("ray-") for d in done)
    assert done[0].started_at < done[1].finished_at and done[1].started_at < done[0].finished_at  # overlapped
    for d in done:
        log = d.log_path.read_text()
        assert f"=== job {d.id} (selftest) attempt 1 on cpu by worker {d.worker_id}" in log
        assert "selftest step 6/6" in log and f"[job {d.id}] finished" in log
    alive = rstore.alive_workers(30)
    assert any(w.device == "ray" for w in alive)  # the dispatcher announces itself


def test_cancel_running_and_waiting_jobs(rstore):
    params = {"seconds": 600, "steps": 6000, "spawn_grandchild": True}  # long enough to outlast a loaded machine
    running = [rstore.submit("selftest", params) for _ in range(2)]  # both CPUs of the cluster
    waiting = rstore.submit("selftest", {"seconds": 1, "steps": 2})
    pids = read_pids(rstore, running[0].id, timeout=300)
    wait_until(
        lambda: (
            not rstore.get(running[1].id).worker_id.startswith("ray-dispatch-")
            and rstore.get(running[1].id).progress > 0
        ),
        120,
        "the second job to start",
    )
    w = rstore.get(waiting.id)
    assert w.status == "running" and w.message.startswith("waiting for cluster resources")
    rstore.request_cancel(waiting.id)
    assert _wait_finished(rstore, waiting.id, 30).message == "cancelled by request before it started on the cluster"
    assert not waiting.log_path.exists() or "=== job" not in waiting.log_path.read_text()
    rstore.request_cancel(running[0].id)
    first = _wait_finished(rstore, running[0].id, 60)
    assert first.status == CANCELLED and first.message.startswith("cancelled by request")
    wait_until(lambda: pid_gone(pids["child"]) and pid_gone(pids["grandchild"]), 10, "the job's processes to end")
    rstore.request_cancel(running[1].id)
    assert _wait_finished(rstore, running[1].id, 60).status == CANCELLED


def test_diagnose_job_on_the_cluster(rstore, hh_sample_path):
    job = rstore.submit("diagnose", {"dataset": str(hh_sample_path), "max_pairs": 24, "n_bootstrap": 20})
    done = _wait_finished(rstore, job.id)
    assert done.status == SUCCEEDED, done.error
    assert done.worker_id.startswith("ray-") and done.device == "cpu"
    diagnosis = json.loads((Path(done.run_dir) / "diagnosis.json").read_text())
    assert done.result["kernel"] == diagnosis["recommendation"]["kernel"]


def test_tiny_train_job_on_the_cluster(rstore, tmp_path):
    from tests.test_train import make_config, toy_pairs

    data = tmp_path / "toy.jsonl"
    toy_pairs(24).drop(columns="pair_id").to_json(data, orient="records", lines=True)
    cfg = make_config(
        data={"dataset": str(data)},
        optimisation={"max_steps": 4},
        monitoring={"eval_every": 1000, "snapshot_every": 1000},
    )
    job = rstore.submit("train", cfg.model_dump(mode="json"), title="tiny on ray")
    done = _wait_finished(rstore, job.id)
    assert done.status == SUCCEEDED, done.error
    metrics = [json.loads(x) for x in (Path(done.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert "on cpu by worker ray-" in done.log_path.read_text()


def test_gpu_job_stays_queued_on_a_cpu_cluster(rstore):
    queued = rstore.submit("selftest", {}, requested_device="cuda:0")
    time.sleep(1.0)
    assert rstore.get(queued.id).status == QUEUED
    rstore.request_cancel(queued.id)


def test_bad_backend_or_address_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [*CLI, "worker", "--backend", "raay", "--workspace", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip() == "error: unknown backend 'raay'; expected one of: local, ray"
    from dpo_engine.jobs.ray_backend import RayDispatcher, RayUnavailable

    ws = Workspace.resolve(tmp_path / "w")
    port = _free_port()  # nothing listens there
    with pytest.raises(RayUnavailable, match=rf"^cannot reach the Ray cluster at 127.0.0.1:{port}: "):
        RayDispatcher(ws, address=f"127.0.0.1:{port}").connect()
    with pytest.raises(RayUnavailable, match="invalid Ray address 'head-node'"):
        RayDispatcher(ws, address="head-node").connect()


def test_app_starts_the_chosen_backend(tmp_path):
    from dpo_engine.serve import DeploymentError, worker_command

    ws = Workspace.resolve(tmp_path / "ws")
    ray_cmd = worker_command(ws, "ray", address="10.0.0.5:6379")
    assert ray_cmd[ray_cmd.index("--backend") + 1] == "ray" and ray_cmd[-2:] == ["--address", "10.0.0.5:6379"]
    local = worker_command(ws, "local", device="cpu")
    assert local[local.index("--backend") + 1] == "local" and local[-2:] == ["--device", "cpu"]
    with pytest.raises(DeploymentError, match="unknown backend 'slurm'"):
        worker_command(ws, "slurm")


def test_killed_dispatcher_takes_its_jobs_along_and_they_resume(ray_address, tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    store = JobStore.for_workspace(ws)
    job = store.submit("selftest", {"seconds": 60, "steps": 60, "spawn_grandchild": True, "write_checkpoint": True})
    cmd = [
        *CLI,
        "worker",
        "--backend",
        "ray",
        "--address",
        ray_address,
        "--workspace",
        str(ws.root),
        "--poll-s",
        "0.2",
        "--heartbeat-s",
        "0.5",
    ]
    # the first dispatcher must not reap its own job when a loaded machine delays a heartbeat
    first = subprocess.Popen(
        [*cmd, "--lost-timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        pids = read_pids(store, job.id, timeout=300)
        wait_until(lambda: store.get(job.id).progress > 0, 60, "the first step")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        _stop_group(first)
    # Ray ends the tasks of a driver that died; the parent-death signal stops the job's processes
    wait_until(lambda: pid_gone(pids["child"]) and pid_gone(pids["grandchild"]), 120, "the orphaned job to end")
    assert store.get(job.id).status == "running"  # nobody has noticed yet
    write_selftest_checkpoint(job.run_dir, 58)  # resume near the end
    time.sleep(5.5)  # the orphan's heartbeat is now older than the second dispatcher's lost timeout
    second = subprocess.run([*cmd, "--lost-timeout", "5", "--once"], capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-2000:]
    done = store.get(job.id)
    assert done.status == SUCCEEDED and done.attempts == 2, done.error
    assert done.result == {"steps_done": 60, "stopped_early": False, "resumed_from": 58}
    assert done.log_path.read_text().count("=== job") == 2
    store.close()
