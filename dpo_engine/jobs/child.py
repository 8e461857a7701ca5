"""The job's own process: `python -m dpo_engine.jobs.child <job_id>`.

The worker starts this in a new process group with stdout/stderr appended to the run's
log.txt. It imports the executor (and with it torch, if the job needs it), runs it, stores
the result or the error line in the job row, and exits 0 on success. The worker decides the
final status from the exit code. On SIGTERM (cancel, worker shutdown, or the worker dying,
via PR_SET_PDEATHSIG) it raises `JobCancelled` so the executor's cleanup runs, and on the way
out it signals its own process group so no grandchild outlives the job.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from dpo_engine.jobs.context import JobCancelled, JobContext
from dpo_engine.jobs.executors import resolve_executor
from dpo_engine.jobs.store import JobStore
from dpo_engine.workspace import ENV_DB_URL, Workspace, disk_full_message

ENV_DEVICE = "DPO_KERNELS_JOB_DEVICE"
ENV_WORKER_PID = "DPO_KERNELS_WORKER_PID"
EXIT_FAILED = 1
EXIT_CANCELLED = 128 + signal.SIGTERM


def _one_line(exc: BaseException) -> str:
    if message := disk_full_message(exc):
        return message
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _stop_process_group() -> None:
    """Send SIGTERM to everything this job started (only when we lead our own group)."""
    if os.getpgrp() != os.getpid():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except ProcessLookupError:
        pass


def run_child(job_id: int, device: str | None = None) -> int:
    """Run one job in this process and return the exit code for the worker."""
    ws = Workspace.resolve()
    store = JobStore(os.environ.get(ENV_DB_URL) or ws.db_url, runs_dir=ws.runs_dir)
    parent = int(os.environ[ENV_WORKER_PID]) if os.environ.get(ENV_WORKER_PID) else None
    if parent is not None and os.getppid() != parent:
        print(f"[job {job_id}] the worker (pid {parent}) is already gone; not starting", flush=True)
        return EXIT_CANCELLED
    job = store.get(job_id)
    ctx = JobContext(
        job=job, workspace=ws, store=store, device=device or os.environ.get(ENV_DEVICE) or "cpu", parent_pid=parent
    )

    def _on_term(signum, _frame):
        ctx.mark_terminated()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one JobCancelled is enough
        raise JobCancelled(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _on_term)
    try:
        fn = resolve_executor(job.kind, job.executor)
        result = fn(ctx)
        ctx.flush_progress()
        if result is not None and not isinstance(result, dict):
            raise TypeError(f"the {job.kind} executor returned {type(result).__name__}; it must return a dict or None")
        store.record_outcome(job_id, result=result or {})
        print(f"[job {job_id}] finished", flush=True)
        return 0
    except JobCancelled as exc:
        print(f"[job {job_id}] {exc}", flush=True)
        return EXIT_CANCELLED
    except BaseException as exc:  # the job's failure, whatever it is, becomes its error line
        traceback.print_exc()
        sys.stderr.flush()
        try:
            store.record_outcome(job_id, error=_one_line(exc))
        except Exception:  # the traceback is in log.txt; the worker still marks the job failed
            traceback.print_exc()
        return EXIT_FAILED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _stop_process_group()
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpo_engine.jobs.child", description=__doc__.splitlines()[0])
    parser.add_argument("job_id", type=int)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    sys.exit(run_child(args.job_id, args.device))


if __name__ == "__main__":
    main()
