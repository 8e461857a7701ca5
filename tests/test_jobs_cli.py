"""`dpo-kernels worker` and `dpo-kernels jobs ...` as a user runs them: real processes, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo_engine.jobs import CANCELLED, QUEUED, SUCCEEDED, JobStore
from dpo_engine.workspace import Workspace

CLI = [sys.executable, "-c", "from dpo_engine.cli import main; main()"]


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.delenv("DPO_KERNELS_DB_URL", raising=False)
    monkeypatch.delenv("DPO_KERNELS_WORKSPACE", raising=False)
    return Workspace.resolve(tmp_path / "ws")


def cli(ws: Workspace, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [*CLI, *args, "--workspace", str(ws.root)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_selftest_worker_once_list_show_logs(ws):
    sub = cli(ws, "jobs", "selftest", "--seconds", "0.3", "--steps", "3")
    assert sub.returncode == 0, sub.stderr
    job_id = int(sub.stdout.strip())

    listed = json.loads(cli(ws, "jobs", "list", "--json").stdout)
    assert [(j["id"], j["status"]) for j in listed] == [(job_id, QUEUED)]

    run = cli(ws, "worker", "--once", "--device", "cpu", "--poll-s", "0.1")
    assert run.returncode == 0, run.stderr
    assert f"job {job_id} succeeded" in run.stderr

    shown = cli(ws, "jobs", "show", str(job_id))
    assert shown.returncode == 0
    data = json.loads(shown.stdout)
    assert data["status"] == SUCCEEDED and data["progress"] == 1.0 and data["elapsed_s"] > 0
    assert data["result"]["steps_done"] == 3 and data["log_path"].endswith("log.txt")

    table = cli(ws, "jobs", "list").stdout
    assert f"{job_id}  selftest   succeeded   100%" in table

    tail = cli(ws, "jobs", "logs", str(job_id), "--tail", "2")
    assert tail.stdout.splitlines() == ["selftest step 3/3", f"[job {job_id}] finished"]
    full = cli(ws, "jobs", "logs", str(job_id), "--follow")  # finished job: prints all and returns
    assert full.returncode == 0 and full.stdout.startswith(f"=== job {job_id} (selftest)")


def test_worker_once_with_an_empty_queue_exits_zero(ws):
    run = cli(ws, "worker", "--once", "--device", "cpu")
    assert run.returncode == 0, run.stderr


def test_cancel_queued_then_cancel_again_fails(ws):
    job_id = int(cli(ws, "jobs", "selftest").stdout)
    first = cli(ws, "jobs", "cancel", str(job_id))
    assert first.returncode == 0 and first.stdout.strip() == f"job {job_id}: cancelled"
    again = cli(ws, "jobs", "cancel", str(job_id))
    assert again.returncode == 1 and "already cancelled" in again.stderr
    assert JobStore.for_workspace(ws).get(job_id).status == CANCELLED


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("jobs", "show", "99"), 2, "error: no job with id 99"),
        (("jobs", "logs", "99"), 2, "error: no job with id 99"),
        (("jobs", "cancel", "99"), 2, "error: no job with id 99"),
        (("jobs", "list", "--status", "done"), 2, "error: unknown status 'done'"),
        (("worker", "--device", "tpu", "--once"), 2, "error: unknown device 'tpu'"),
        (("jobs", "selftest", "--device", "gpu"), 2, "error: unknown device 'gpu'"),
    ],
)
def test_bad_input_gives_one_line_errors(ws, args, code, message):
    out = cli(ws, *args)
    assert out.returncode == code
    assert out.stderr.strip() == message or out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr


def test_selftest_wait_reports_failure_with_exit_code(ws):
    worker = subprocess.Popen(
        [*CLI, "worker", "--device", "cpu", "--poll-s", "0.1", "--workspace", str(ws.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ok = cli(ws, "jobs", "selftest", "--seconds", "0.2", "--steps", "2", "--wait", "--timeout", "120")
        bad = cli(ws, "jobs", "selftest", "--seconds", "0.2", "--steps", "2", "--fail", "--wait", "--timeout", "120")
        workers = json.loads(cli(ws, "jobs", "workers", "--json").stdout)
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    assert ok.returncode == 0 and "succeeded" in ok.stderr
    assert bad.returncode == 1 and "failed" in bad.stderr
    assert [w["device"] for w in workers] == ["cpu"] and workers[0]["pid"] == worker.pid
    assert worker.returncode == 0
