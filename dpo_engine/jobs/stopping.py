"""How the long-running loops (the local worker, the Ray dispatcher) are asked to stop.

SIGINT or SIGTERM only sets a flag: the loop finishes its current poll, then stops what it runs
(requeue from a checkpoint, or fail with the reason) and unregisters, so no job is left claimed.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StopOnSignal:
    """Mixin: `request_stop`, `stopping`, and signal handlers installed for the duration of `run`."""

    _stop_signal: int | None = None

    @property
    def loop_name(self) -> str:
        return type(self).__name__.lower()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop claiming; a running job is stopped and requeued (checkpoint) or failed."""
        self._stop_signal = signum

    @property
    def stopping(self) -> bool:
        return self._stop_signal is not None

    @property
    def stop_reason(self) -> str:
        return signal.Signals(self._stop_signal).name if self._stop_signal else "request"

    def _on_signal(self, signum, _frame) -> None:
        log.info("%s received %s; stopping", self.loop_name, signal.Signals(signum).name)
        self.request_stop(signum)

    @contextmanager
    def stop_signals_handled(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to `request_stop` (main thread only: Python allows no other), then restore."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
