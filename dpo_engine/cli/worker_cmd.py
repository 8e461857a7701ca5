"""`dpo-kernels worker`: run queued jobs on this machine's device, or feed them to a Ray cluster."""

from __future__ import annotations

import logging
import sys

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, workspace

BACKENDS = ("local", "ray")


def worker(
    device: str = typer.Option(
        "auto",
        "--device",
        help="auto, cpu, cuda or cuda:N (local backend); cuda:N binds every process a job starts to that GPU alone.",
    ),
    backend: str = typer.Option("local", "--backend", help="local: run jobs here; ray: send them to a Ray cluster."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (ray backend; default: auto)."),
    max_jobs: int | None = typer.Option(
        None, "--max-jobs", min=1, help="Ray backend: jobs at once (default: cluster CPUs)."
    ),
    once: bool = typer.Option(False, "--once", help="Run at most one queued job, then exit."),
    poll_s: float = typer.Option(1.0, "--poll-s", help="Seconds between looks at the queue."),
    heartbeat_s: float = typer.Option(2.0, "--heartbeat-s", help="Seconds between heartbeats."),
    lost_timeout_s: float = typer.Option(30.0, "--lost-timeout", help="Heartbeat age after which a job is lost."),
    ws: str | None = WorkspaceOption,
) -> None:
    """Run queued jobs until interrupted (Ctrl-C stops it cleanly): here on one device, or on a Ray cluster."""
    if backend not in BACKENDS:
        fail(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{backend} worker] %(message)s", stream=sys.stderr)
    if backend == "ray":
        from dpo_engine.jobs.ray_backend import RayDispatcher, RayUnavailable

        try:
            d = RayDispatcher(
                workspace(ws),
                address=address,
                poll_s=poll_s,
                heartbeat_s=heartbeat_s,
                lost_timeout_s=lost_timeout_s,
                max_jobs=max_jobs,
            )
            d.connect()
        except (ValueError, RayUnavailable) as exc:
            fail(str(exc))
        d.run(once=once)
        return
    from dpo_engine.jobs.worker import Worker

    try:
        w = Worker(workspace(ws), device=device, poll_s=poll_s, heartbeat_s=heartbeat_s, lost_timeout_s=lost_timeout_s)
    except ValueError as exc:
        fail(str(exc))
    w.run(once=once)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
