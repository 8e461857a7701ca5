"""JobStore against a real SQLite file and a real PostgreSQL server: submit, claim (also under
concurrency), cancel, lost jobs, schema creation and upgrade."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from datetime import timezone

import pytest
from sqlalchemy import text

from dpo_engine import rundir
from dpo_engine.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobNotFound,
    JobStateError,
    JobStore,
    schema,
    wait_for_job,
)
from dpo_engine.jobs import store as store_module
from tests.jobs_db import backend, fresh_db_url, postgres_server, store, ws  # noqa: F401 - fixtures


def test_submit_creates_row_and_run_dir(store, ws):
    job = store.submit("selftest", {"seconds": 0.1}, title="quick")
    assert job.status == QUEUED and job.progress == 0.0 and job.attempts == 0
    assert re.fullmatch(r"selftest-\d{8}-\d{6}-[0-9a-f]{6}", job.run_id)
    assert job.run_dir == str((ws.runs_dir / job.run_id).resolve())
    assert (ws.runs_dir / job.run_id).is_dir()
    assert job.executor == "dpo_engine.jobs.selftest:run_selftest_job"
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset().total_seconds() == 0
    assert job.elapsed_s is None
    assert store.get(job.id) == job


def test_sqlite_uses_wal_and_busy_timeout(store, backend):
    if backend != "sqlite":
        pytest.skip("SQLite settings")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == int(store_module.SQLITE_BUSY_TIMEOUT_S * 1000)


def test_jobs_survive_a_new_store_on_the_same_url(store, ws):
    a = store.submit("selftest", {"steps": 3}, run_id="keep-me")
    claimed = store.claim("w1", "cpu")
    store.set_progress(claimed.id, 0.25, "a quarter")
    store.close()
    again = JobStore(ws.db_url, runs_dir=ws.runs_dir)
    seen = again.get(a.id)
    assert (seen.status, seen.progress, seen.message, seen.run_id, seen.params) == (
        RUNNING,
        0.25,
        "a quarter",
        "keep-me",
        {"steps": 3},
    )
    assert [j.id for j in again.list()] == [a.id]
    again.close()


def test_list_filters_and_orders_newest_first(store):
    ids = [store.submit("selftest", {}).id for _ in range(3)]
    store.request_cancel(ids[1])
    assert [j.id for j in store.list()] == ids[::-1]
    assert [j.id for j in store.list(status=QUEUED)] == [ids[2], ids[0]]
    assert [j.id for j in store.list(status=[CANCELLED])] == [ids[1]]
    assert store.list(kind="train") == []
    assert len(store.list(limit=2)) == 2
    assert store.counts() == {QUEUED: 2, RUNNING: 0, SUCCEEDED: 0, FAILED: 0, CANCELLED: 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "nope"}, "unknown job kind 'nope'"),
        ({"params": {"x": {1, 2}}}, "params must be JSON-serialisable"),
        ({"params": {"x": math.nan}}, "params must be JSON-serialisable"),
        ({"requested_device": "gpu"}, "unknown device 'gpu'"),
        ({"run_id": "../escape"}, "invalid run id"),
    ],
)
def test_submit_rejects_bad_input(store, kwargs, message):
    args = {"kind": "selftest", "params": {}} | kwargs
    kind, params = args.pop("kind"), args.pop("params")
    with pytest.raises(ValueError, match=re.escape(message)):
        store.submit(kind, params, **args)
    assert store.list() == []


def test_submit_rejects_a_used_run_id_or_non_empty_dir(store, ws):
    store.submit("selftest", {}, run_id="r1")
    with pytest.raises(ValueError, match="already used"):
        store.submit("selftest", {}, run_id="r1")
    (ws.runs_dir / "r2").mkdir()
    (ws.runs_dir / "r2" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        store.submit("selftest", {}, run_id="r2")


def test_store_without_runs_dir_cannot_submit(ws):
    bare = JobStore(ws.db_url)
    with pytest.raises(ValueError, match="for_workspace"):
        bare.submit("selftest", {})
    bare.close()


def test_bad_ids_and_values_give_clear_errors(store):
    with pytest.raises(JobNotFound, match="no job with id 42"):
        store.get(42)
    job = store.submit("selftest", {})
    store.claim("w", "cpu")
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="progress must be a fraction"):
            store.set_progress(job.id, bad)
    with pytest.raises(ValueError, match="final status"):
        store.finish(job.id, RUNNING)
    with pytest.raises(ValueError, match="unknown status"):
        store.list(status="done")
    with pytest.raises(TypeError, match="must be a dict"):
        store.record_outcome(job.id, result=[1, 2])


def test_claim_follows_priority_then_age_and_requested_device(store):
    low = store.submit("selftest", {}, priority=5)
    gpu = store.submit("selftest", {}, requested_device="cuda")
    first = store.submit("selftest", {}, priority=-1)
    plain = store.submit("selftest", {})
    assert gpu.requested_device == "cuda:0"
    order = [store.claim("w-cpu", "cpu").id for _ in range(3)]
    assert order == [first.id, plain.id, low.id]
    assert store.claim("w-cpu", "cpu") is None  # the GPU job waits for a GPU worker
    assert store.claim("w-gpu1", "cuda:1") is None
    got = store.claim("w-gpu0", "cuda:0")
    assert got.id == gpu.id and got.device == "cuda:0" and got.worker_id == "w-gpu0"
    assert got.status == RUNNING and got.attempts == 1 and got.started_at is not None


CLAIMER = """
import sys, time
from dpo_engine.jobs.store import JobStore
store = JobStore(sys.argv[1])
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
got = []
while (job := store.claim(sys.argv[2], "cpu")) is not None:
    got.append(job.id)
print(" ".join(map(str, got)))
"""


def test_two_processes_claim_every_job_exactly_once(store, ws):
    ids = {store.submit("selftest", {}).id for _ in range(50)}
    start = time.time() + 1.5  # both start claiming at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, ws.db_url, f"w{i}", str(start)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = [int(x) for out in outs for x in out]
    assert sorted(claimed) == sorted(ids)  # nothing twice, nothing missed
    for worker, out in zip(("w0", "w1"), outs):
        for job_id in map(int, out):
            job = store.get(job_id)
            assert job.worker_id == worker and job.attempts == 1 and job.status == RUNNING


def test_cancel_queued_is_immediate_running_is_requested(store):
    first = store.submit("selftest", {})
    second = store.submit("selftest", {})
    assert store.claim("w", "cpu").id == first.id
    c = store.request_cancel(second.id)
    assert c.status == CANCELLED and c.finished_at is not None
    r = store.request_cancel(first.id)
    assert r.status == RUNNING and r.cancel_requested
    assert store.heartbeat(first.id) is True
    with pytest.raises(JobStateError, match="already cancelled"):
        store.request_cancel(second.id)


def test_finish_sets_status_once(store):
    job = store.submit("selftest", {})
    store.claim("w", "cpu")
    store.record_outcome(job.id, result={"acc": 0.5})
    done = store.finish(job.id, SUCCEEDED)
    assert done.status == SUCCEEDED and done.progress == 1.0 and done.result == {"acc": 0.5}
    assert done.elapsed_s == pytest.approx((done.finished_at - done.started_at).total_seconds())
    with pytest.raises(JobStateError, match="already succeeded"):
        store.finish(job.id, FAILED, error="late")


def _claim_and_age(store, **submit_kwargs):
    job = store.submit("selftest", {}, **submit_kwargs)
    store.claim("w-old", "cpu")
    time.sleep(0.05)
    return job


def test_reap_lost_fails_without_checkpoint(store):
    job = _claim_and_age(store)
    assert store.reap_lost(timeout_s=60) == []  # heartbeat is fresh enough
    (lost,) = store.reap_lost(timeout_s=0.01)
    assert lost.id == job.id and lost.status == FAILED and not lost.resumable
    assert re.match(r"lost: worker w-old stopped heartbeating at \S+ \(no checkpoint to resume from\)$", lost.error)
    assert store.reap_lost(timeout_s=0.01) == []


def test_a_checkpoint_still_being_written_does_not_make_a_job_resumable(store):
    job = _claim_and_age(store)
    ckpt = rundir.checkpoint_dir(store.get(job.id).log_path.parent, 3)
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x")  # the state file, written last, is not there yet
    (lost,) = store.reap_lost(timeout_s=0.01)
    assert lost.status == FAILED and not lost.resumable


def test_reap_lost_requeues_with_checkpoint_and_gives_up_after_max_attempts(store, monkeypatch):
    job = _claim_and_age(store)
    ckpt = rundir.checkpoint_dir(store.get(job.id).log_path.parent, 3)
    ckpt.mkdir(parents=True)
    (ckpt / rundir.CHECKPOINT_STATE).write_bytes(b"x")
    (lost,) = store.reap_lost(timeout_s=0.01)
    assert lost.status == QUEUED and lost.resumable and lost.worker_id is None
    assert lost.message.startswith("lost: worker w-old") and "requeued" in lost.message
    again = store.claim("w-new", "cpu")
    assert again.id == job.id and again.attempts == 2
    monkeypatch.setattr(store_module, "MAX_ATTEMPTS", 2)
    time.sleep(0.05)
    (final,) = store.reap_lost(timeout_s=0.01)
    assert final.status == FAILED and "gave up after 2 attempts" in final.error


def test_reap_lost_honours_a_pending_cancel(store):
    job = _claim_and_age(store)
    store.request_cancel(job.id)
    (lost,) = store.reap_lost(timeout_s=0.01)
    assert lost.status == CANCELLED


def test_alive_workers(store):
    store.register_worker("w1", "host", 123, "cuda")
    store.register_worker("w2", "host", 124, "cpu")
    store.worker_heartbeat("w1", current_job_id=7)
    alive = {w.id: w for w in store.alive_workers(max_age_s=10)}
    assert set(alive) == {"w1", "w2"}
    assert alive["w1"].device == "cuda:0" and alive["w1"].current_job_id == 7
    store.unregister_worker("w2")
    assert [w.id for w in store.alive_workers(10)] == ["w1"]
    time.sleep(0.05)
    assert store.alive_workers(max_age_s=0.01) == []
    with pytest.raises(LookupError, match="no worker registered"):
        store.worker_heartbeat("ghost")


def test_wait_for_job_reports_changes_and_times_out(store):
    job = store.submit("selftest", {})
    seen = []
    with pytest.raises(TimeoutError, match=f"job {job.id} still queued"):
        wait_for_job(store, job.id, timeout=0.2, progress_callback=seen.append, poll_s=0.05)
    assert [j.status for j in seen] == [QUEUED]  # reported once, not on every poll
    store.request_cancel(job.id)
    assert wait_for_job(store, job.id, timeout=1).status == CANCELLED


def test_timestamps_are_utc_aware(store):
    job = store.submit("selftest", {})
    got = store.claim("w", "cpu")
    for t in (got.created_at, got.started_at, got.heartbeat_at):
        assert t.tzinfo is not None and t.astimezone(timezone.utc) == t
    assert os.path.isdir(job.run_dir)


OPENER = """
import sys, time
from pathlib import Path
from dpo_engine.jobs.store import JobStore
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
store = JobStore(sys.argv[1], runs_dir=Path(sys.argv[2]))
print(store.submit("selftest", {}).id)
"""


def test_processes_opening_a_fresh_database_at_once_all_succeed(tmp_path, fresh_db_url):
    url = fresh_db_url
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, url, str(tmp_path / "runs"), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]  # the error's own lines
    assert sorted(int(out) for out, _ in outs) == [1, 2, 3]


def test_get_by_run_id(store):
    job = store.submit("selftest", {}, run_id="my-run-1")
    assert store.get_by_run_id("my-run-1").id == job.id
    assert store.get_by_run_id("no-such-run") is None


def test_store_runs_on_the_chosen_backend(store, backend):
    assert store.engine.dialect.name == backend
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar() == schema.LATEST_VERSION


def test_a_version_1_database_is_upgraded_in_place(fresh_db_url, tmp_path):
    old = JobStore(fresh_db_url, runs_dir=tmp_path / "runs")
    first = old.submit("selftest", {"steps": 2}, run_id="before-upgrade")
    with old.engine.begin() as conn:  # back to the schema of version 1
        conn.execute(text("ALTER TABLE jobs DROP COLUMN submitted_by"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN processes"))
        conn.execute(text("DROP TABLE schema_version"))
    old.close()
    store = JobStore(fresh_db_url, runs_dir=tmp_path / "runs")
    kept = store.get(first.id)
    assert (kept.run_id, kept.params, kept.submitted_by, kept.processes) == ("before-upgrade", {"steps": 2}, None, 1)
    new = store.submit("selftest", {}, submitted_by="alice@example.org")
    assert store.get(new.id).submitted_by == "alice@example.org"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar() == schema.LATEST_VERSION == 3
    store.close()


def test_a_database_from_a_newer_program_is_refused(fresh_db_url, tmp_path):
    store = JobStore(fresh_db_url, runs_dir=tmp_path / "runs")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    store.close()
    with pytest.raises(schema.SchemaTooNew, match="schema version 99, newer than this program's 3"):
        JobStore(fresh_db_url, runs_dir=tmp_path / "runs")


def test_a_multi_process_job_waits_for_a_worker_with_enough_gpus(store):
    """A training job launching two processes is not taken by a worker whose jobs see one GPU."""
    two = store.submit("train", {"optimisation": {"processes": 2}}, run_id="two-gpus")
    assert store.get(two.id).processes == 2 and "2 GPUs" in store.get(two.id).message
    assert store.submit("selftest", {}).processes == 1
    assert store.claim("w-pinned", "cuda:1", max_processes=1).kind == "selftest"
    assert store.claim("w-pinned", "cuda:1", max_processes=1) is None
    assert store.claim("w-two", "cuda:0", max_processes=2).id == two.id
    three = store.submit("train", {"optimisation": {"processes": 3}}, run_id="three-cpu")
    assert store.claim("w-cpu", "cpu", max_processes=None).id == three.id  # processes on the CPU: no GPU bound


def test_opening_retries_while_sqlite_says_locked_without_asking_its_busy_handler():
    """SQLite answers "database is locked" at once (no busy handler) to a connection that opens while
    the last one to the file cleans up its WAL: opening retries that for a while, and nothing else."""
    import sqlite3

    from dpo_engine.jobs.store import retry_while_locked

    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "open"

    assert retry_while_locked(locked_twice) == "open" and len(calls) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_while_locked(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: x")))
    attempts = []

    def always_locked():
        attempts.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError, match="locked"):  # gives up after its timeout
        retry_while_locked(always_locked, timeout_s=0.05)
    assert 2 <= len(attempts) <= 6
