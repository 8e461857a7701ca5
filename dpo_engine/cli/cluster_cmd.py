"""`dpo-kernels cluster start|stop`: a Ray head on this machine, reachable from it alone, with a token."""

from __future__ import annotations

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, workspace

cluster_app = typer.Typer(
    help="Start or stop a Ray head on this machine (127.0.0.1 only, token authentication) for --backend ray.",
    no_args_is_help=True,
)


@cluster_app.command("start")
def start(
    num_cpus: int | None = typer.Option(None, "--num-cpus", min=1, help="CPUs the head offers (default: all)."),
    num_gpus: int | None = typer.Option(None, "--num-gpus", min=0, help="GPUs the head offers (default: all)."),
    ws: str | None = WorkspaceOption,
) -> None:
    """Start the workspace's Ray head in the background; `worker --backend ray` then finds it and its token."""
    from dpo_engine.jobs.ray_cluster import RayUnavailable, start_for_workspace

    try:
        record = start_for_workspace(workspace(ws), num_cpus=num_cpus, num_gpus=num_gpus)
    except RayUnavailable as exc:
        fail(str(exc), code=1)
    typer.echo(f"Ray head at {record.address} (127.0.0.1 only, token in {record.token_path}); log: {record.log_path}")


@cluster_app.command("stop")
def stop(ws: str | None = WorkspaceOption) -> None:
    """Stop the workspace's Ray head and delete its token."""
    from dpo_engine.jobs.ray_cluster import stop_for_workspace

    record = stop_for_workspace(workspace(ws))
    typer.echo(f"stopped the Ray head at {record.address}" if record else "no Ray head of this workspace is running")


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
