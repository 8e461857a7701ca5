"""Job and worker tables, and the immutable `Job` snapshot handed to callers.

The tables are plain SQLAlchemy 2 ORM models with portable column types, so the same schema
works on the default SQLite file and on a shared PostgreSQL database. Timestamps are stored
as UTC and always come back timezone-aware, whatever the backend keeps.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Store naive UTC, return aware UTC: SQLite drops time zones, PostgreSQL keeps them."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One unit of heavy work; the row is the single source of truth for its state."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    executor: Mapped[str] = mapped_column(String(256))  # "module:function", fixed at submit time
    title: Mapped[str] = mapped_column(String(256), default="")
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str] = mapped_column(String(128), unique=True)
    run_dir: Mapped[str] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    requested_device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resumable: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_by: Mapped[str | None] = mapped_column(String(256), nullable=True)  # schema version 2
    # processes the job launches (a multi-process training run: one per GPU on a GPU); schema version 3
    processes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class WorkerRow(Base):
    """A worker process announcing itself, so the UI can show who is alive and on which device."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    current_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Job(BaseModel):
    """Immutable snapshot of a job row; re-read it from the store to see changes."""

    model_config = ConfigDict(frozen=True)

    id: int
    kind: str
    executor: str
    title: str = ""
    params: dict[str, Any] = {}
    status: str = QUEUED
    priority: int = 0
    run_id: str
    run_dir: str
    progress: float = 0.0
    message: str = ""
    worker_id: str | None = None
    device: str | None = None
    requested_device: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    cancel_requested: bool = False
    error: str | None = None
    result: dict[str, Any] | None = None
    attempts: int = 0
    resumable: bool = False
    processes: int = 1
    submitted_by: str | None = None

    @classmethod
    def from_row(cls, row: JobRow) -> "Job":
        return cls.model_validate({c.key: getattr(row, c.key) for c in JobRow.__table__.columns})

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def elapsed_s(self) -> float | None:
        """Seconds since the job started (until it finished); None while it has not started."""
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / "log.txt"


class SchemaVersionRow(Base):
    """One row holding the schema version this database was last upgraded to (see `schema.py`)."""

    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class WorkerInfo(BaseModel):
    """Immutable snapshot of a worker row."""

    model_config = ConfigDict(frozen=True)

    id: str
    hostname: str
    pid: int
    device: str
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None = None
    current_job_id: int | None = None

    @classmethod
    def from_row(cls, row: WorkerRow) -> "WorkerInfo":
        return cls.model_validate({c.key: getattr(row, c.key) for c in WorkerRow.__table__.columns})
