"""The worker: claims jobs one at a time and runs each in a contained child process.

The worker itself stays light (no torch): it keeps its own row and the running job's heartbeat
fresh, reaps jobs whose worker vanished, watches for cancel requests, and turns the child's
exit into the job's final status. The child runs in its own process group (so a cancel can
signal everything the job started) and is told by the kernel to stop if the worker dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

import dpo_engine
from dpo_engine.jobs.allocator import CUDA_ALLOC_CONF, with_allocator
from dpo_engine.jobs.child import ENV_DEVICE, ENV_WORKER_PID
from dpo_engine.jobs.devices import cuda_device_count, pinned_visible_devices, resolve_device
from dpo_engine.jobs.models import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job
from dpo_engine.jobs.stopping import StopOnSignal
from dpo_engine.jobs.store import JobStore
from dpo_engine.workspace import ENV_DB_URL, ENV_WORKSPACE, Workspace

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
CANCEL_POLL_S = 0.5
WATCH_INTERVAL_S = 0.1
# How long a job may take to stop after SIGTERM before SIGKILL: saving a large checkpoint or
# disconnecting N Ray Train workers on a busy node takes seconds (Kubernetes allows pods 30 s too).
CANCEL_GRACE_S = 30.0
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when the worker dies (Linux).

    The kernel ties this to the thread that started the child; that thread waits in `run_job`
    until the child has ended, so it cannot fire early.
    """
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, max_bytes: int = 65536) -> list[str]:
    """Last `n` lines of a text file (reading at most `max_bytes` from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-n:]


def describe_exit(returncode: int, we_killed: bool = False) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (possibly out of memory)" if name == "SIGKILL" and not we_killed else ""
        return f"killed by signal {name}{hint}"
    return f"exited with code {returncode}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Worker(StopOnSignal):
    """Run queued jobs from a workspace on one device."""

    def __init__(
        self,
        workspace: Workspace,
        device: str = "auto",
        poll_s: float = 1.0,
        heartbeat_s: float = 2.0,
        lost_timeout_s: float = 30.0,
        cancel_grace_s: float = CANCEL_GRACE_S,
        store: JobStore | None = None,
        worker_id: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        for name, value in (("poll_s", poll_s), ("heartbeat_s", heartbeat_s), ("cancel_grace_s", cancel_grace_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not lost_timeout_s > heartbeat_s:
            raise ValueError(
                f"lost_timeout_s ({lost_timeout_s}) must exceed heartbeat_s ({heartbeat_s}), "
                "or live jobs would be reaped as lost"
            )
        self.workspace = workspace
        self.device = resolve_device(device)
        self.pinned = str(device).strip().lower() != "auto"  # an explicit device binds every process a job starts
        self.visible_devices = (
            pinned_visible_devices(self.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if self.pinned and self.device.startswith("cuda:")
            else None
        )
        # the most processes a job may launch here: one per GPU its processes see; unlimited on the CPU
        if self.device.startswith("cuda:"):
            self.max_processes: int | None = 1 if self.visible_devices is not None else max(1, cuda_device_count())
        else:
            self.max_processes = None if self.device == "cpu" else 1
        self.poll_s, self.heartbeat_s = float(poll_s), float(heartbeat_s)
        self.lost_timeout_s, self.cancel_grace_s = float(lost_timeout_s), float(cancel_grace_s)
        self.store = store or JobStore.for_workspace(workspace)
        self.hostname = socket.gethostname()
        self.worker_id = worker_id or f"{self.hostname}-{os.getpid()}-{os.urandom(2).hex()}"
        self.extra_env = dict(extra_env or {})
        self._stop_signal = None

    # ---- lifecycle ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(WATCH_INTERVAL_S, max(0.0, end - time.monotonic())))

    @property
    def loop_name(self) -> str:
        return f"worker {self.worker_id}"

    def run(self, once: bool = False) -> int:
        """Process jobs until stopped (or, with `once`, at most one). Returns how many ran."""
        with self.stop_signals_handled():
            return self._run(once)

    def _run(self, once: bool) -> int:
        self.store.register_worker(self.worker_id, self.hostname, os.getpid(), self.device)
        log.info("worker %s on %s watching %s", self.worker_id, self.device, self.workspace.root)
        processed = 0
        try:
            while not self.stopping:
                try:
                    self.store.worker_heartbeat(self.worker_id)
                    for lost in self.store.reap_lost(self.lost_timeout_s):
                        log.warning("job %s lost -> %s: %s", lost.id, lost.status, lost.message)
                    job = self.store.claim(self.worker_id, self.device, self.max_processes)
                except SQLAlchemyError as exc:  # database briefly unavailable: retry after a pause
                    log.error("job database error: %s", exc)
                    job = None
                    if once:
                        raise
                if job is None:
                    if once:
                        break
                    self._sleep(self.poll_s)
                    continue
                self.run_job(job)
                processed += 1
                if once:
                    break
        finally:
            self.store.unregister_worker(self.worker_id)
        return processed

    # ---- one job ---------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ, **self.extra_env)
        # the child runs with the run directory as cwd; keep this package importable from a checkout
        package_root = str(Path(dpo_engine.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env.update(
            {
                ENV_WORKSPACE: str(self.workspace.root),
                ENV_DB_URL: self.store.url,
                ENV_DEVICE: self.child_device,
                ENV_WORKER_PID: str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        # packed batches change shape every step: growable segments keep the CUDA allocator from
        # fragmenting into blocks no later batch fits (a user's own setting wins)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
        return with_allocator(env)

    @property
    def child_device(self) -> str:
        """The device as the job's process names it: a pinned GPU is the only one it sees, so `cuda:0`."""
        return "cuda:0" if self.visible_devices is not None else self.device

    def run_job(self, job: Job) -> Job:
        """Run a job this worker has claimed, to its final status (or back to the queue)."""
        run_dir = Path(job.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "log.txt"
        with open(log_path, "ab") as logf:
            header = (
                f"=== job {job.id} ({job.kind}) attempt {job.attempts} on {self.device} "
                f"by worker {self.worker_id} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n"
            )
            logf.write(header.encode())
            logf.flush()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dpo_engine.jobs.child", str(job.id), "--device", self.child_device],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self._child_env(),
                    cwd=str(run_dir),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                return self.store.finish(job.id, FAILED, error=f"could not start the job process: {exc}")
        log.info("job %s (%s) started as pid %s", job.id, job.kind, proc.pid)
        reason, killed = self._watch(job, proc)
        _signal_group(proc.pid, signal.SIGKILL)  # nothing the job started outlives it
        return self._conclude(job, proc.returncode, reason, killed, log_path)

    def _watch(self, job: Job, proc: subprocess.Popen) -> tuple[str | None, bool]:
        """Wait for the child, keeping heartbeats; returns (stop reason, whether SIGKILL was sent)."""
        reason: str | None = None
        term_sent_at: float | None = None
        killed = False
        next_beat = next_cancel_check = 0.0
        while proc.poll() is None:
            now = time.monotonic()
            try:
                if now >= next_beat:
                    self.store.heartbeat(job.id)
                    self.store.worker_heartbeat(self.worker_id, job.id)
                    next_beat = now + self.heartbeat_s
                if reason is None and now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_POLL_S
                    if self.store.get(job.id).cancel_requested:
                        reason = "cancel"
            except SQLAlchemyError as exc:  # keep the job running through a database hiccup
                log.error("job database error while running job %s: %s", job.id, exc)
            if reason is None and self.stopping:
                reason = "shutdown"
            if reason is not None and term_sent_at is None:
                log.info("stopping job %s (%s): SIGTERM to its process group", job.id, reason)
                _signal_group(proc.pid, signal.SIGTERM)
                term_sent_at = now
            if term_sent_at is not None and not killed and now - term_sent_at > self.cancel_grace_s:
                log.warning("job %s ignored SIGTERM for %.1fs: SIGKILL", job.id, self.cancel_grace_s)
                _signal_group(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(WATCH_INTERVAL_S)
        return reason, killed

    def _conclude(self, job: Job, rc: int, reason: str | None, killed: bool, log_path: Path) -> Job:
        current = self.store.get(job.id)
        if current.status != RUNNING or current.worker_id != self.worker_id:
            log.warning("job %s was taken over meanwhile (now %s); leaving it", job.id, current.status)
            return current
        if reason is None and current.cancel_requested:
            reason = "cancel"  # the job saw the request first and stopped cleanly before the watcher's next poll
        if reason == "cancel":
            done = self.store.finish(
                job.id, CANCELLED, message=f"cancelled by request; process {describe_exit(rc, killed)}"
            )
        elif reason == "shutdown":
            done = self.store.requeue_or_fail(
                job.id, f"interrupted: worker {self.worker_id} was stopped ({self.stop_reason})"
            )
        elif rc == 0:
            done = self.store.finish(job.id, SUCCEEDED, message="succeeded")
        else:
            first = current.error or f"the job process {describe_exit(rc, killed)}"
            if current.error:
                first = f"{current.error} (process {describe_exit(rc, killed)})"
            tail = "\n".join(tail_lines(log_path))
            done = self.store.finish(
                job.id, FAILED, error=f"{first}\n--- last lines of log.txt ---\n{tail}", message=first
            )
        log.info("job %s %s", job.id, done.status)
        return done
