"""Several browser sessions at once on one app and one worker, on SQLite and on PostgreSQL.

Every session uploads and stores its own file, then queues a diagnosis and a training run.
Afterwards every job is recorded exactly once, every session got every page, and the app's log
has no "database is locked" and no traceback. Latency figures are scripts/bench_load.py's.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import pytest

from dpo_engine.data import DatasetStore
from dpo_engine.jobs import JobStateError, JobStore
from dpo_engine.workspace import Workspace
from tests.browser import CHROMIUM, running_app
from tests.jobs_db import backend, fresh_db_url, postgres_server  # noqa: F401 - fixtures
from tests.load import run_sessions, session_files

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)"),
]

N_SESSIONS = 3


def test_concurrent_sessions_lose_and_duplicate_nothing(tmp_path, backend, request, monkeypatch, hh_sample_path):
    if backend == "postgresql":
        monkeypatch.setenv("DPO_KERNELS_DB_URL", request.getfixturevalue("fresh_db_url"))
    ws_root = tmp_path / "ws"
    uploads = session_files(hh_sample_path, tmp_path / "uploads", N_SESSIONS)
    log_path = tmp_path / "app.log"
    with running_app(ws_root, log_path) as url:
        logs = run_sessions(url, uploads)
        jobs = JobStore.for_workspace(Workspace.resolve(ws_root))
        recorded = jobs.list(limit=1000)
        for job in recorded:  # nobody waits for these to finish
            if job.status in ("queued", "running"):
                with contextlib.suppress(JobStateError):  # it may have finished since the list was read
                    jobs.request_cancel(job.id)

    assert [log.errors for log in logs] == [[] for _ in logs]
    for log in logs:
        assert set(log.latencies) == {"datasets", "diagnose", "train", "jobs"}
    kinds = Counter((j.kind, j.params.get("step")) for j in recorded)
    assert kinds == {
        ("ingest", "validate"): N_SESSIONS,
        ("ingest", "store"): N_SESSIONS,
        ("diagnose", None): N_SESSIONS,
        ("train", None): N_SESSIONS,
    }
    assert len({j.run_id for j in recorded}) == len(recorded)
    ingest = [j for j in recorded if j.kind == "ingest"]
    assert all(j.status == "succeeded" for j in ingest), [(j.title, j.status, j.error) for j in ingest]
    names = sorted(i.name for i in DatasetStore(Workspace.resolve(ws_root)).list())
    assert [n for n in names if n.startswith("load-")] == [f"load-{i}" for i in range(N_SESSIONS)]
    app_log = log_path.read_text(errors="replace")
    assert "database is locked" not in app_log
    # Streamlit's own server may log a race when a browser tab closes its websocket; anything else
    # that raised in the app or the worker is a failure.
    tracebacks = app_log.split("Traceback (most recent call last):")[1:]
    ours = [t for t in tracebacks if not ("starlette" in t[:4000] and "WebSocketDisconnected" in t[:4000])]
    assert not ours, ours[0][:3000]
