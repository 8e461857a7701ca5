"""Block until a job finishes, reporting each change: used by the CLI's --wait and by tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from dpo_engine.jobs.models import Job
from dpo_engine.jobs.store import JobStore


def wait_for_job(
    store: JobStore,
    job_id: int,
    timeout: float | None = None,
    progress_callback: Callable[[Job], None] | None = None,
    poll_s: float = 0.5,
) -> Job:
    """Poll until the job reaches a final status; raises TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    last: tuple | None = None
    while True:
        job = store.get(job_id)
        seen = (job.status, job.progress, job.message)
        if progress_callback is not None and seen != last:
            progress_callback(job)
        last = seen
        if job.is_finished:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s ({job.message})")
        time.sleep(poll_s)
