"""`JobStore`: the job table behind every worker, page and CLI command.

All state lives in the database, so any number of processes (web app, CLI, workers, job
children) can share one store; nothing is kept in memory between calls. Writes use short
transactions; on SQLite they start with `BEGIN IMMEDIATE` (one writer at a time, no upgrade
deadlocks) and WAL lets readers go on meanwhile. The claim is a conditional UPDATE whose row
count says who won, so it is atomic on any SQL backend; on PostgreSQL the candidate SELECT
also uses `FOR UPDATE SKIP LOCKED` so concurrent workers do not queue behind each other.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dpo_engine import rundir
from dpo_engine.jobs.devices import CLUSTER_DEVICE, normalize_device
from dpo_engine.jobs.executors import RESTARTABLE_KINDS, known_kinds
from dpo_engine.jobs.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL_STATUSES,
    Job,
    JobRow,
    WorkerInfo,
    WorkerRow,
    utcnow,
)
from dpo_engine.jobs.schema import upgrade_schema
from dpo_engine.workspace import Workspace, current_user

SQLITE_BUSY_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3
_IMMEDIATE = "dpo_begin_immediate"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateError(RuntimeError):
    """The requested transition is not allowed from the job's current status."""


def retry_while_locked(fn, timeout_s: float = SQLITE_BUSY_TIMEOUT_S):
    """fn(), again while SQLite answers "database is locked", for up to `timeout_s`.

    SQLite returns SQLITE_BUSY without asking the busy handler when a connection opens a WAL
    database while the last connection to it is closing (it holds an exclusive lock to clean up the
    WAL) or while another one runs recovery (sqlite.org/wal.html, "Sometimes queries return
    SQLITE_BUSY in WAL mode"): processes that open and close the job database at once meet that."""
    deadline, delay = time.monotonic() + timeout_s, 0.01
    while True:
        try:
            return fn()
        except (sqlite3.OperationalError, OperationalError) as exc:
            if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN so writes can ask for BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        retry_while_locked(lambda: cur.execute("PRAGMA journal_mode=WAL"))  # the first read of the file
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN")

    return engine


def _check_fraction(fraction: float) -> float:
    value = float(fraction)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"progress must be a fraction in [0, 1], got {fraction!r}")
    return value


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable (plain dicts, lists, str, numbers): {exc}") from None


def launched_processes(kind: str, params: dict[str, Any]) -> int:
    """How many processes a job of `kind` with `params` launches: a training run's
    `optimisation.processes`, else 1."""
    if kind != "train":
        return 1
    optimisation = params.get("optimisation") if isinstance(params.get("optimisation"), dict) else {}
    try:
        return max(1, int(optimisation.get("processes") or 1))
    except (TypeError, ValueError):
        return 1


class JobStore:
    """Jobs and workers in one SQL database (SQLite file by default, PostgreSQL when shared)."""

    def __init__(self, url: str, runs_dir: str | os.PathLike | None = None) -> None:
        self.url = url
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self.engine = _make_engine(url)
        self._write_engine = self.engine.execution_options(**{_IMMEDIATE: True})
        self._create_tables()

    @classmethod
    def for_workspace(cls, ws: Workspace) -> "JobStore":
        return cls(ws.db_url, runs_dir=ws.runs_dir)

    def _create_tables(self) -> None:
        # The write engine starts SQLite transactions with BEGIN IMMEDIATE, so the check-then-create
        # holds the write lock from the start instead of failing when another process does the same.
        retry_while_locked(lambda: upgrade_schema(self._write_engine))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    @staticmethod
    def _row(s: Session, job_id: int) -> JobRow:
        row = s.get(JobRow, int(job_id))
        if row is None:
            raise JobNotFound(f"no job with id {job_id}")
        return row

    # ---- submitting and reading -------------------------------------------------------

    def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        *,
        title: str = "",
        run_id: str | None = None,
        requested_device: str | None = None,
        priority: int = 0,
        submitted_by: str | None = None,
    ) -> Job:
        """Queue a job and create its run directory. Lower `priority` values run first.

        `submitted_by` names who queued it; by default `current_user()`: the signed-in user of
        the web session in a team deployment, else the operating-system user."""
        if self.runs_dir is None:
            raise ValueError("this JobStore has no runs directory; create it with JobStore.for_workspace(ws)")
        executors = known_kinds()
        if kind not in executors:
            raise ValueError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(executors))}")
        params = dict(params or {})
        _check_json("params", params)
        device = normalize_device(requested_device) if requested_device is not None else None
        processes = launched_processes(kind, params)
        chosen = run_id is not None
        if chosen and not _RUN_ID_RE.match(run_id):
            raise ValueError(
                f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-' (at most 128, not starting with a "
                "symbol)"
            )
        with self._write() as s:
            if not chosen:
                run_id = self._unused_run_id(s, kind)
            run_dir = (self.runs_dir / run_id).resolve()
            if s.scalar(select(JobRow.id).where(JobRow.run_id == run_id)) is not None:
                raise ValueError(f"run id {run_id!r} is already used by another job")
            if run_dir.exists() and any(run_dir.iterdir()):
                raise ValueError(f"run directory {run_dir} already exists and is not empty")
            run_dir.mkdir(parents=True, exist_ok=True)
            row = JobRow(
                kind=kind,
                executor=executors[kind],
                title=title or kind,
                params=params,
                status=QUEUED,
                priority=int(priority),
                run_id=run_id,
                run_dir=str(run_dir),
                progress=0.0,
                message="queued"
                if processes == 1
                else f"queued: waits for a CPU worker or one whose jobs see {processes} GPUs (--device auto)",
                requested_device=device,
                created_at=utcnow(),
                cancel_requested=False,
                attempts=0,
                resumable=False,
                submitted_by=submitted_by or current_user(),
                processes=processes,
            )
            s.add(row)
            s.flush()
            return Job.from_row(row)

    def _unused_run_id(self, s: Session, kind: str) -> str:
        """kind-date-time-random, drawn again while a job or a run directory already has it: many
        jobs submitted within one second share the time part."""
        while True:
            run_id = f"{kind}-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            if (
                s.scalar(select(JobRow.id).where(JobRow.run_id == run_id)) is None
                and not (self.runs_dir / run_id).exists()
            ):
                return run_id

    def get(self, job_id: int) -> Job:
        with self._read() as s:
            return Job.from_row(self._row(s, job_id))

    def get_by_run_id(self, run_id: str) -> Job | None:
        """The job that owns run directory `run_id` (None for runs written outside the queue)."""
        with self._read() as s:
            row = s.scalar(select(JobRow).where(JobRow.run_id == run_id))
            return None if row is None else Job.from_row(row)

    def list(self, status: str | Iterable[str] | None = None, kind: str | None = None, limit: int = 200) -> list[Job]:
        """Newest first, optionally filtered by status (one or several) and kind."""
        stmt = select(JobRow).order_by(JobRow.id.desc()).limit(int(limit))
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            bad = [x for x in wanted if x not in STATUSES]
            if bad:
                raise ValueError(f"unknown status {bad[0]!r}; expected one of {', '.join(STATUSES)}")
            stmt = stmt.where(JobRow.status.in_(wanted))
        if kind is not None:
            stmt = stmt.where(JobRow.kind == kind)
        with self._read() as s:
            return [Job.from_row(r) for r in s.scalars(stmt)]

    # ---- the worker side ----------------------------------------------------------------

    def claim(self, worker_id: str, device: str, max_processes: int | None = None) -> Job | None:
        """Atomically take the next queued job this device may run, or None when there is none.

        `max_processes`: the most processes a job may launch here (a GPU worker: the GPUs its jobs
        see); None: no limit (processes on the CPU). A job needing more waits for a worker that has them."""
        device = normalize_device(device)
        accepted = or_(JobRow.requested_device.is_(None), JobRow.requested_device == device)
        if max_processes is not None:
            accepted = accepted & (JobRow.processes <= int(max_processes))
        return self._claim(
            accepted,
            worker_id=worker_id,
            device=device,
            message=f"started on {device} by {worker_id}",
        )

    def claim_for_cluster(self, dispatcher_id: str, gpus: bool) -> Job | None:
        """Take the next queued job for a cluster scheduler (any CPU job; GPU jobs only when `gpus`).

        The job is RUNNING from here on, with no device yet: the cluster places it, and the task
        that runs it takes it over with `hand_over` once it has started on a node.
        """
        accepted = JobRow.requested_device.is_(None) | (JobRow.requested_device == "cpu")
        if gpus:
            accepted = accepted | JobRow.requested_device.like("cuda:%")
        return self._claim(
            accepted, worker_id=dispatcher_id, device=None, message=f"waiting for cluster resources ({dispatcher_id})"
        )

    def _claim(self, accepted, *, worker_id: str, device: str | None, message: str) -> Job | None:
        candidates = (
            select(JobRow.id)
            .where(JobRow.status == QUEUED)
            .where(accepted)
            .order_by(JobRow.priority, JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        for _ in range(20):  # lost races retry; each loss means someone else progressed
            with self._write() as s:
                job_id = s.scalar(candidates)
                if job_id is None:
                    return None
                now = utcnow()
                won = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == QUEUED)
                    .values(
                        status=RUNNING,
                        worker_id=worker_id,
                        device=device,
                        started_at=now,
                        heartbeat_at=now,
                        finished_at=None,
                        attempts=JobRow.attempts + 1,
                        message=message,
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount
                if won == 1:
                    return Job.from_row(self._row(s, job_id))
        return None

    def hand_over(self, job_id: int, from_worker: str, to_worker: str, device: str) -> Job | None:
        """Pass a running job from the process that claimed it to the one that runs it.

        Atomic: returns None (and changes nothing) when the job is no longer running under
        `from_worker`, e.g. it was cancelled or reaped while it waited for cluster resources.
        """
        device = normalize_device(device)
        with self._write() as s:
            moved = s.execute(
                update(JobRow)
                .where(JobRow.id == int(job_id), JobRow.status == RUNNING, JobRow.worker_id == from_worker)
                .where(JobRow.cancel_requested.is_(False))
                .values(
                    worker_id=to_worker,
                    device=device,
                    heartbeat_at=utcnow(),
                    message=f"started on {device} by {to_worker}",
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            return Job.from_row(self._row(s, job_id)) if moved == 1 else None

    def set_progress(self, job_id: int, fraction: float, message: str = "") -> None:
        """Record progress (0..1) and, when given, a status message; also counts as a heartbeat."""
        values: dict[str, Any] = {"progress": _check_fraction(fraction), "heartbeat_at": utcnow()}
        if message:
            values["message"] = str(message)
        with self._write() as s:
            self._row(s, job_id)
            s.execute(
                update(JobRow)
                .where(JobRow.id == int(job_id), JobRow.status == RUNNING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    def heartbeat(self, job_id: int) -> bool:
        """Mark a running job alive; returns whether a cancel has been requested."""
        with self._write() as s:
            row = self._row(s, job_id)
            if row.status == RUNNING:
                row.heartbeat_at = utcnow()
            return bool(row.cancel_requested)

    def record_outcome(self, job_id: int, *, result: dict | None = None, error: str | None = None) -> None:
        """What the job's own process reports (result dict or error line); the worker sets the status."""
        if result is not None:
            if not isinstance(result, dict):
                raise TypeError(f"a job result must be a dict, got {type(result).__name__}")
            _check_json("result", result)
        with self._write() as s:
            row = self._row(s, job_id)
            if result is not None:
                row.result = dict(result)
            if error is not None:
                row.error = str(error)

    def finish(
        self,
        job_id: int,
        status: str,
        error: str | None = None,
        result: dict | None = None,
        *,
        message: str | None = None,
    ) -> Job:
        """Move a queued or running job to a final status. A None result/error keeps what is stored."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish() needs a final status ({', '.join(TERMINAL_STATUSES)}), got {status!r}")
        if result is not None:
            _check_json("result", result)
        with self._write() as s:
            row = self._row(s, job_id)
            if row.status in TERMINAL_STATUSES:
                raise JobStateError(f"job {job_id} is already {row.status}")
            row.status = status
            row.finished_at = utcnow()
            if status == SUCCEEDED:
                row.progress = 1.0
            if result is not None:
                row.result = dict(result)
            if error is not None:
                row.error = str(error)
            row.message = message if message is not None else status
            s.flush()
            return Job.from_row(row)

    def request_cancel(self, job_id: int) -> Job:
        """Queued jobs are cancelled at once; running ones get `cancel_requested` for their worker."""
        with self._write() as s:
            row = self._row(s, job_id)
            if row.status == QUEUED:
                row.status = CANCELLED
                row.finished_at = utcnow()
                row.message = "cancelled before it started"
            elif row.status == RUNNING:
                row.cancel_requested = True
                row.message = "cancel requested"
            else:
                raise JobStateError(f"job {job_id} is already {row.status}; nothing to cancel")
            s.flush()
            return Job.from_row(row)

    def requeue_or_fail(self, job_id: int, reason: str) -> Job:
        """Give up on a running attempt: requeue when a checkpoint allows resuming, else fail."""
        with self._write() as s:
            row = self._row(s, job_id)
            if row.status != RUNNING:
                return Job.from_row(row)
            self._give_up(row, reason)
            s.flush()
            return Job.from_row(row)

    @staticmethod
    def _give_up(row: JobRow, reason: str) -> None:
        checkpoint = rundir.latest_checkpoint(Path(row.run_dir)) is not None
        resumable = checkpoint or row.kind in RESTARTABLE_KINDS
        row.resumable = resumable
        now = utcnow()
        if row.cancel_requested:
            row.status, row.finished_at = CANCELLED, now
            row.message = f"cancelled ({reason})"
        elif resumable and row.attempts < MAX_ATTEMPTS:
            row.status = QUEUED
            row.worker_id = None
            row.device = None
            row.heartbeat_at = None
            how = "resume from its checkpoint" if checkpoint else "start again"
            row.message = f"{reason}; requeued to {how} (attempt {row.attempts + 1} next)"
        else:
            why = f"gave up after {row.attempts} attempts" if resumable else "no checkpoint to resume from"
            row.status, row.finished_at = FAILED, now
            row.error = f"{reason} ({why})"
            row.message = row.error

    def reap_lost(self, timeout_s: float) -> list[Job]:
        """Handle running jobs whose heartbeat is older than `timeout_s`: requeue or fail them."""
        cutoff = utcnow() - timedelta(seconds=float(timeout_s))
        with self._write() as s:
            rows = s.scalars(
                select(JobRow).where(JobRow.status == RUNNING, JobRow.heartbeat_at < cutoff).order_by(JobRow.id)
            ).all()
            out = []
            for row in rows:
                beat = row.heartbeat_at.isoformat(timespec="seconds") if row.heartbeat_at else "?"
                self._give_up(row, f"lost: worker {row.worker_id} stopped heartbeating at {beat}")
                out.append(row)
            s.flush()
            return [Job.from_row(r) for r in out]

    # ---- workers ------------------------------------------------------------------------

    def register_worker(self, worker_id: str, hostname: str, pid: int, device: str) -> WorkerInfo:
        now = utcnow()
        with self._write() as s:
            row = s.get(WorkerRow, worker_id)
            if row is None:
                row = WorkerRow(id=worker_id, started_at=now)
                s.add(row)
            row.hostname, row.pid = hostname, int(pid)
            row.device = device if device == CLUSTER_DEVICE else normalize_device(device)
            row.last_seen, row.stopped_at, row.current_job_id = now, None, None
            s.flush()
            return WorkerInfo.from_row(row)

    def worker_heartbeat(self, worker_id: str, current_job_id: int | None = None) -> None:
        with self._write() as s:
            row = s.get(WorkerRow, worker_id)
            if row is None:
                raise LookupError(f"no worker registered as {worker_id!r}")
            row.last_seen = utcnow()
            row.current_job_id = current_job_id

    def unregister_worker(self, worker_id: str) -> None:
        """Mark a worker stopped (the row stays as history)."""
        with self._write() as s:
            row = s.get(WorkerRow, worker_id)
            if row is not None:
                row.stopped_at = utcnow()
                row.current_job_id = None

    def alive_workers(self, max_age_s: float = 10.0) -> list[WorkerInfo]:
        cutoff = utcnow() - timedelta(seconds=float(max_age_s))
        with self._read() as s:
            rows = s.scalars(
                select(WorkerRow)
                .where(WorkerRow.stopped_at.is_(None), WorkerRow.last_seen >= cutoff)
                .order_by(WorkerRow.started_at)
            )
            return [WorkerInfo.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per status (every status present, zeros included)."""
        with self._read() as s:
            found = dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        return {st: int(found.get(st, 0)) for st in STATUSES}
