"""`dpo-kernels worker` and `dpo-kernels jobs ...`: run, inspect and control jobs from a shell."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, print_json, stderr_is_tty, workspace
from dpo_engine.jobs.models import STATUSES, SUCCEEDED, Job
from dpo_engine.jobs.store import JobStore
from dpo_engine.jobs.wait import wait_for_job

jobs_app = typer.Typer(help="List, inspect, follow and cancel jobs.", no_args_is_help=True)


def _store(ws_path: str | None) -> JobStore:
    return JobStore.for_workspace(workspace(ws_path))


def _job_dict(job: Job) -> dict[str, Any]:
    out = job.model_dump(mode="json")
    out["elapsed_s"] = job.elapsed_s
    out["log_path"] = str(job.log_path)
    return out


def _get(store: JobStore, job_id: int) -> Job:
    return store.get(job_id)  # JobNotFound -> one line, exit 2 (dpo_engine.cli.common)


def wait_with_bar(store: JobStore, job_id: int, timeout: float | None = None) -> Job:
    """Follow a job with a progress bar on stderr; returns the finished job."""
    from tqdm import tqdm

    with tqdm(total=100, desc=f"job {job_id}", unit="%", file=sys.stderr, disable=not stderr_is_tty()) as bar:

        def update(job: Job) -> None:
            bar.n = round(job.progress * 100, 1)
            bar.set_postfix_str(f"{job.status}: {job.message}"[:60], refresh=False)
            bar.refresh()

        try:
            return wait_for_job(store, job_id, timeout=timeout, progress_callback=update)
        except TimeoutError as exc:
            fail(str(exc), code=1)


@jobs_app.command("list")
def list_jobs(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    status: str | None = typer.Option(
        None, "--status", help=f"Only jobs with this status. Allowed: {', '.join(STATUSES)}."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="Only jobs of this kind (e.g. embed, diagnose, train, htsr, selftest)."
    ),
    limit: int = typer.Option(200, "--limit", min=1, help="At most this many (newest first)."),
    ws: str | None = WorkspaceOption,
) -> None:
    """List jobs, newest first."""
    jobs = _store(ws).list(status=status, kind=kind, limit=limit)
    if as_json:
        print_json([_job_dict(j) for j in jobs])
        return
    if not jobs:
        typer.echo("no jobs")
        return
    typer.echo(f"{'ID':>5}  {'KIND':<10} {'STATUS':<10} {'PROG':>5} {'ELAPSED':>8}  {'DEVICE':<7} TITLE / MESSAGE")
    for j in jobs:
        elapsed = f"{j.elapsed_s:.0f}s" if j.elapsed_s is not None else "-"
        typer.echo(
            f"{j.id:>5}  {j.kind:<10} {j.status:<10} {j.progress * 100:>4.0f}% {elapsed:>8}  "
            f"{(j.device or j.requested_device or '-'):<7} {j.title} - {j.message.splitlines()[0] if j.message else ''}"
        )


@jobs_app.command("show")
def show(job_id: int = typer.Argument(..., help="Job id."), ws: str | None = WorkspaceOption) -> None:
    """Print one job as JSON."""
    print_json(_job_dict(_get(_store(ws), job_id)))


@jobs_app.command("logs")
def logs(
    job_id: int = typer.Argument(..., help="Job id."),
    tail: int | None = typer.Option(None, "--tail", min=0, help="Only the last N lines."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job finishes."),
    ws: str | None = WorkspaceOption,
) -> None:
    """Print a job's log.txt."""
    from dpo_engine.jobs.worker import tail_lines

    store = _store(ws)
    job = _get(store, job_id)
    path = job.log_path
    if tail is not None:
        lines = tail_lines(path, n=tail, max_bytes=max(65536, tail * 1024)) if tail else []
        text = "\n".join(lines) + ("\n" if lines else "")
    else:
        text = path.read_text(errors="replace") if path.exists() else ""
    sys.stdout.write(text)
    sys.stdout.flush()
    if not follow:
        return
    pos = path.stat().st_size if path.exists() else 0
    while True:
        finished = store.get(job_id).is_finished
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        if finished:
            return
        time.sleep(0.5)


@jobs_app.command("cancel")
def cancel(job_id: int = typer.Argument(..., help="Job id."), ws: str | None = WorkspaceOption) -> None:
    """Cancel a job: queued ones at once, running ones are stopped by their worker."""
    store = _store(ws)
    _get(store, job_id)
    job = store.request_cancel(job_id)  # JobStateError (already finished) -> one line, exit 1
    typer.echo(f"job {job.id}: {'cancel requested' if job.cancel_requested else job.status}")


@jobs_app.command("workers")
def workers(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    max_age_s: float = typer.Option(10.0, "--max-age", help="Seconds since a worker's last heartbeat."),
    ws: str | None = WorkspaceOption,
) -> None:
    """List the workers that are alive and their devices."""
    alive = _store(ws).alive_workers(max_age_s)
    if as_json:
        print_json([w.model_dump(mode="json") for w in alive])
        return
    if not alive:
        typer.echo("no live workers")
    for w in alive:
        busy = f"running job {w.current_job_id}" if w.current_job_id else "idle"
        typer.echo(f"{w.id}  {w.device}  pid {w.pid} on {w.hostname}  {busy}")


@jobs_app.command("selftest")
def selftest(
    seconds: float = typer.Option(2.0, "--seconds", min=0.0, help="How long the test job runs."),
    steps: int = typer.Option(10, "--steps", min=1, help="Progress steps."),
    fail_job: bool = typer.Option(False, "--fail", help="Make the job raise half way."),
    device: str | None = typer.Option(
        None, "--device", help="Only a worker on this device may run it: cpu, cuda or cuda:N. Default: any worker."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job (a worker must be running)."),
    timeout: float | None = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds."),
    ws: str | None = WorkspaceOption,
) -> None:
    """Submit a self-test job and print its id."""
    store = _store(ws)
    params = {"seconds": seconds, "steps": steps, "fail": fail_job}
    job = store.submit("selftest", params, title=f"selftest {seconds:g}s", requested_device=device)
    typer.echo(job.id)
    if wait:
        done = wait_with_bar(store, job.id, timeout)
        typer.echo(f"job {done.id}: {done.status}", err=True)
        if done.status != SUCCEEDED:
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
