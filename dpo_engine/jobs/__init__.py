"""Jobs: every heavy computation runs as a queued job on a worker, in its own child process.

`JobStore` holds the job and worker tables (SQLite in the workspace, or any SQLAlchemy URL);
`Worker` claims and runs jobs; executors are looked up by kind in the child only.
"""

from dpo_engine.jobs.executors import ExecutorError, known_kinds, register_executor, resolve_executor
from dpo_engine.jobs.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL_STATUSES,
    Job,
    WorkerInfo,
)
from dpo_engine.jobs.store import JobNotFound, JobStateError, JobStore
from dpo_engine.jobs.wait import wait_for_job

__all__ = [
    "CANCELLED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "TERMINAL_STATUSES",
    "ExecutorError",
    "Job",
    "JobNotFound",
    "JobStateError",
    "JobStore",
    "WorkerInfo",
    "known_kinds",
    "register_executor",
    "resolve_executor",
    "wait_for_job",
]
