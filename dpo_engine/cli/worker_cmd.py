"""`dpo-kernels worker`: run queued jobs on this machine's device."""

from __future__ import annotations

import logging
import sys

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, workspace


def worker(
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    once: bool = typer.Option(False, "--once", help="Run at most one queued job, then exit."),
    poll_s: float = typer.Option(1.0, "--poll-s", help="Seconds between looks at the queue."),
    heartbeat_s: float = typer.Option(2.0, "--heartbeat-s", help="Seconds between heartbeats."),
    lost_timeout_s: float = typer.Option(30.0, "--lost-timeout", help="Heartbeat age after which a job is lost."),
    ws: str | None = WorkspaceOption,
) -> None:
    """Run queued jobs on one device until interrupted (Ctrl-C stops it cleanly)."""
    from dpo_engine.jobs.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [worker] %(message)s", stream=sys.stderr)
    try:
        w = Worker(workspace(ws), device=device, poll_s=poll_s, heartbeat_s=heartbeat_s, lost_timeout_s=lost_timeout_s)
    except ValueError as exc:
        fail(str(exc))
    w.run(once=once)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
