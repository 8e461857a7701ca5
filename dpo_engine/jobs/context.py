"""`JobContext`: what an executor gets to do its work and talk back to the job row.

Executors report with `progress()` (written to the database at most ~2 times a second, so a
tight training loop can call it every step) and poll `should_stop()` to end early and cleanly
when the user cancels or the worker that launched them has died. Plain `print` goes to log.txt.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_engine.jobs.models import Job
from dpo_engine.jobs.store import JobStore
from dpo_engine.workspace import Workspace

PROGRESS_INTERVAL_S = 0.5
CANCEL_POLL_INTERVAL_S = 0.5


class JobCancelled(Exception):
    """Raised inside a job's process when it is told to stop (cancel or worker shutdown)."""


@dataclass
class JobContext:
    job: Job
    workspace: Workspace
    store: JobStore
    device: str
    parent_pid: int | None = None
    _last_write: float = field(default=0.0, repr=False)
    _pending: tuple[float, str] | None = field(default=None, repr=False)
    _last_cancel_check: float = field(default=0.0, repr=False)
    _cancelled: bool = field(default=False, repr=False)
    _terminated: bool = field(default=False, repr=False)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.job.params)

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; throttled, but completion (1.0) is always written."""
        fraction = float(fraction)
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(f"progress must be a fraction in [0, 1], got {fraction!r}")
        now = time.monotonic()
        if fraction >= 1.0 or now - self._last_write >= PROGRESS_INTERVAL_S:
            self.store.set_progress(self.job.id, fraction, message)
            self._last_write, self._pending = now, None
        else:
            self._pending = (fraction, message)

    def flush_progress(self) -> None:
        """Write the last throttled progress update, if one is waiting."""
        if self._pending is not None:
            fraction, message = self._pending
            self.store.set_progress(self.job.id, fraction, message)
            self._pending = None

    def parent_alive(self) -> bool:
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def mark_terminated(self) -> None:
        """Called from the SIGTERM handler: from now on `should_stop()` is True."""
        self._terminated = True

    def should_stop(self) -> bool:
        """True once a cancel was requested, a stop signal arrived, or the worker died."""
        if self._terminated or self._cancelled or not self.parent_alive():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_POLL_INTERVAL_S:
            self._last_cancel_check = now
            self._cancelled = self.store.get(self.job.id).cancel_requested
        return self._cancelled
