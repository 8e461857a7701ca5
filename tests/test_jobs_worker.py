"""The worker with real child processes: success, failure, cancel, crashes and lost workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dpo_engine.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobStore,
    context,
    executors,
    register_executor,
)
from dpo_engine.jobs.context import JobContext
from dpo_engine.jobs.selftest import write_selftest_checkpoint
from dpo_engine.jobs.worker import Worker
from dpo_engine.workspace import Workspace
from tests.jobs_db import backend, fresh_db_url, postgres_server, store, ws  # noqa: F401 - fixtures

CLI = [sys.executable, "-c", "from dpo_engine.cli import main; main()"]


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_cli_worker(ws: Workspace, *extra: str) -> subprocess.Popen:
    args = ["worker", "--device", "cpu", "--workspace", str(ws.root), "--poll-s", "0.1", "--heartbeat-s", "0.2"]
    return subprocess.Popen([*CLI, *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_pids(store: JobStore, job_id: int, timeout: float = 60.0) -> dict:
    path = Path(store.get(job_id).run_dir) / "selftest_pids.json"
    wait_until(path.exists, timeout, what="the job's pid file")
    return json.loads(path.read_text())


def fast_worker(ws, store, **kw) -> Worker:
    return Worker(
        ws,
        device="cpu",
        poll_s=kw.pop("poll_s", 0.1),
        heartbeat_s=0.2,
        lost_timeout_s=kw.pop("lost_timeout_s", 5.0),
        store=store,
        **kw,
    )


def test_selftest_succeeds_with_progress_and_log(ws, store):
    job = store.submit("selftest", {"seconds": 1.6, "steps": 8})
    worker = fast_worker(ws, store)
    seen: list[float] = []
    thread = threading.Thread(target=lambda: seen.append(worker.run(once=True)))
    thread.start()
    progress = []
    while thread.is_alive():
        progress.append(store.get(job.id).progress)
        time.sleep(0.05)
    thread.join()
    done = store.get(job.id)
    assert seen == [1]
    assert done.status == SUCCEEDED and done.progress == 1.0 and done.error is None
    assert done.result == {"steps_done": 8, "stopped_early": False, "resumed_from": 0}
    assert done.worker_id == worker.worker_id and done.device == "cpu" and done.attempts == 1
    assert any(0.0 < p < 1.0 for p in progress), progress  # progress streamed while running
    assert progress == sorted(progress)
    log = done.log_path.read_text()
    assert f"=== job {job.id} (selftest) attempt 1 on cpu" in log
    assert "selftest step 8/8" in log and f"[job {job.id}] finished" in log
    assert store.alive_workers(60) == []  # the worker signed off


def test_nothing_queued_returns_at_once(ws, store):
    start = time.monotonic()
    assert fast_worker(ws, store, poll_s=60).run(once=True) == 0
    assert time.monotonic() - start < 30  # one poll would take 60 s: it did not wait for one


def test_failing_job_is_failed_with_the_exception(ws, store):
    job = store.submit("selftest", {"seconds": 0.2, "steps": 4, "fail": True})
    fast_worker(ws, store).run(once=True)
    done = store.get(job.id)
    assert done.status == FAILED
    assert done.error.startswith("RuntimeError: selftest failure requested at step 2 (process exited with code 1)")
    assert done.message == done.error.splitlines()[0]
    assert "Traceback (most recent call last)" in done.log_path.read_text()
    assert "last lines of log.txt" in done.error and "selftest step 1/4" in done.error


def test_hard_crash_is_failed_with_the_exit_code(ws, store):
    job = store.submit("selftest", {"seconds": 0.2, "steps": 4, "crash_hard": True})
    fast_worker(ws, store).run(once=True)
    done = store.get(job.id)
    assert done.status == FAILED
    assert done.error.startswith("the job process exited with code 3")
    assert "selftest crashing hard at step 2" in done.error


def test_executor_that_cannot_be_imported_fails_cleanly(ws, store, monkeypatch):
    monkeypatch.setattr(executors, "_REGISTRY", dict(executors._REGISTRY))
    register_executor("broken", "dpo_engine.no_such_module:run")
    # only this process knows the kind; the child runs the target recorded in the job row
    job = store.submit("broken", {})
    assert job.executor == "dpo_engine.no_such_module:run"
    fast_worker(ws, store).run(once=True)
    done = store.get(job.id)
    assert done.status == FAILED
    assert "ExecutorError: cannot import dpo_engine.no_such_module for job kind 'broken'" in done.error


def test_job_for_another_device_is_left_queued(ws, store):
    job = store.submit("selftest", {}, requested_device="cuda:0")
    assert fast_worker(ws, store).run(once=True) == 0
    assert store.get(job.id).status == QUEUED


def test_cancel_kills_the_child_process_group(ws, store):
    job = store.submit("selftest", {"seconds": 60, "steps": 600, "spawn_grandchild": True})
    worker = start_cli_worker(ws, "--once")
    try:
        pids = read_pids(store, job.id)
        assert not pid_gone(pids["child"]) and not pid_gone(pids["grandchild"])
        store.request_cancel(job.id)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    done = store.get(job.id)
    assert done.status == CANCELLED and done.message.startswith("cancelled by request")
    wait_until(lambda: pid_gone(pids["child"]) and pid_gone(pids["grandchild"]), 5, "the job's processes to end")


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_killed_worker_takes_its_child_along_and_the_job_is_reaped(ws, store, with_checkpoint):
    params = {"seconds": 30, "steps": 60, "spawn_grandchild": True, "write_checkpoint": with_checkpoint}
    job = store.submit("selftest", params)
    worker = start_cli_worker(ws, "--once")
    try:
        pids = read_pids(store, job.id)
        wait_until(lambda: store.get(job.id).progress > 0, what="the first step")
        old_worker_id = store.get(job.id).worker_id
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        worker.kill()
    # the kernel's parent-death signal stops the child, which takes its own children along
    wait_until(lambda: pid_gone(pids["child"]) and pid_gone(pids["grandchild"]), 10, "the orphaned job to end")
    assert store.get(job.id).status == RUNNING  # nobody has noticed yet
    if with_checkpoint:  # pretend the run got far, so the resumed attempt is short
        write_selftest_checkpoint(job.run_dir, 58)
    time.sleep(0.6)
    processed = fast_worker(ws, store, lost_timeout_s=0.5).run(once=True)
    done = store.get(job.id)
    if with_checkpoint:
        assert processed == 1 and done.status == SUCCEEDED and done.attempts == 2 and done.resumable
        assert done.result == {"steps_done": 60, "stopped_early": False, "resumed_from": 58}
        assert done.log_path.read_text().count("=== job") == 2
    else:
        assert processed == 0 and done.status == FAILED
        assert done.error.startswith(f"lost: worker {old_worker_id} stopped heartbeating at ")
        assert done.error.endswith("(no checkpoint to resume from)")


def test_sigterm_on_the_worker_stops_its_job_and_exits(ws, store):
    job = store.submit("selftest", {"seconds": 60, "steps": 600})
    worker = start_cli_worker(ws)
    try:
        pids = read_pids(store, job.id)
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, out
    done = store.get(job.id)
    assert done.status == FAILED
    assert done.error.startswith("interrupted: worker ") and "was stopped (SIGTERM) (no checkpoint" in done.error
    assert pid_gone(pids["child"])
    assert store.alive_workers(60) == []


def test_context_throttles_progress_writes(ws, store, monkeypatch):
    monkeypatch.setattr(context, "PROGRESS_INTERVAL_S", 30.0)  # a slow first write must not open the window
    job = store.submit("selftest", {})
    ctx = JobContext(job=store.claim("w", "cpu"), workspace=ws, store=store, device="cpu")
    ctx.progress(0.1, "first")
    ctx.progress(0.2, "second")  # within the throttle window: held back
    assert (store.get(job.id).progress, store.get(job.id).message) == (0.1, "first")
    ctx.flush_progress()
    assert (store.get(job.id).progress, store.get(job.id).message) == (0.2, "second")
    ctx.progress(0.3)
    ctx.progress(1.0, "done")  # completion is never held back
    assert store.get(job.id).progress == 1.0
    with pytest.raises(ValueError, match="fraction"):
        ctx.progress(2.0)
    assert ctx.should_stop() is False
    store.request_cancel(job.id)
    ctx._last_cancel_check = 0.0
    assert ctx.should_stop() is True


def test_worker_rejects_bad_settings(ws, store):
    with pytest.raises(ValueError, match="must exceed heartbeat_s"):
        Worker(ws, device="cpu", heartbeat_s=2.0, lost_timeout_s=1.0, store=store)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Worker(ws, device="tpu", store=store)
    with pytest.raises(ValueError, match="poll_s must be positive"):
        Worker(ws, device="cpu", poll_s=0, store=store)


def test_worker_and_device_detection_do_not_import_torch():
    code = (
        "import sys; from dpo_engine.jobs.worker import Worker; from dpo_engine.jobs.devices import resolve_device;"
        "d = resolve_device('auto'); print(d, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    device, torch_loaded = out.stdout.split()
    assert device in ("cpu", "cuda:0") and torch_loaded == "False"


def report_device(ctx) -> dict:
    """A job that records the device it was given and the GPUs its process may see."""
    seen = {"device": ctx.device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    (ctx.run_dir / "device.json").write_text(json.dumps(seen))
    return seen


@pytest.mark.parametrize(
    ("worker_visible", "expected"), [(None, "1"), ("4,5", "5")], ids=["all-gpus-visible", "worker-sees-two"]
)
def test_a_pinned_worker_binds_its_jobs_and_their_processes_to_its_gpu(
    ws, store, monkeypatch, worker_visible, expected
):
    """A worker started on cuda:1 gives its jobs that GPU alone (CUDA_VISIBLE_DEVICES, inherited by
    every process a job launches), named cuda:0 inside them."""
    monkeypatch.setattr(executors, "_REGISTRY", dict(executors._REGISTRY))
    register_executor("report_device", "tests.test_jobs_worker:report_device")
    if worker_visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", worker_visible)
    job = store.submit("report_device", {})
    worker = Worker(ws, device="cuda:1", poll_s=0.1, heartbeat_s=0.2, lost_timeout_s=5.0, store=store)
    worker.run(once=True)
    assert store.get(job.id).status == SUCCEEDED, store.get(job.id).error
    seen = json.loads((Path(store.get(job.id).run_dir) / "device.json").read_text())
    assert seen == {"device": "cuda:0", "visible": expected}
    assert worker.max_processes == 1  # a job launching two processes waits for a worker that sees two GPUs


def test_a_pin_outside_the_visible_gpus_is_refused(ws, store, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match="cuda:2 is not among the 2 GPU"):
        Worker(ws, device="cuda:2", store=store)
