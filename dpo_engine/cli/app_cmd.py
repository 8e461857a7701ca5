"""`dpo-kernels app`: the web app plus a worker, with the bundled sample registered."""

from __future__ import annotations

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, workspace


def register(app: typer.Typer) -> None:
    @app.command("app")
    def app_command(
        host: str = typer.Option(None, help="Address to serve on (default from streamlit_config.toml: 127.0.0.1)."),
        port: int = typer.Option(None, help="Port (default from streamlit_config.toml: 8501)."),
        ws: str = WorkspaceOption,
        no_worker: bool = typer.Option(False, "--no-worker", help="Do not start a worker."),
        device: str = typer.Option("auto", help="Device of the local worker: auto, cpu or cuda:N."),
        backend: str = typer.Option(
            "local", "--backend", help="Where jobs run: local (this machine) or ray (a Ray cluster)."
        ),
        address: str = typer.Option(None, "--address", help="Ray cluster address with --backend ray (default: auto)."),
        auth: str = typer.Option("none", "--auth", help="none (loopback only), oidc (Streamlit login) or proxy."),
        allow_header: str = typer.Option(
            "X-Forwarded-User", "--allow-header", help="--auth proxy: request header holding the user name."
        ),
        allow_user: list[str] = typer.Option([], "--allow-user", help="--auth proxy: a user allowed in (repeat)."),
        sample: bool = typer.Option(True, "--sample/--no-sample", help="Register the bundled sample dataset."),
    ) -> None:
        """Start the Streamlit app and a worker; Ctrl-C stops both. Beyond loopback it needs --auth."""
        from dpo_engine.serve import AuthSettings, DeploymentError, check_deployment, launch, worker_command

        w = workspace(ws)
        settings = AuthSettings(
            mode=auth, header=allow_header, allowed_users=tuple(u.strip() for u in allow_user if u.strip())
        )
        try:
            check_deployment(host, settings)
            worker_command(w, backend, device, address)
        except DeploymentError as exc:
            fail(str(exc))
        if sample:
            from dpo_engine.data import ensure_sample_dataset

            info = ensure_sample_dataset(w)
            typer.echo(f"sample dataset: {info.id} ({info.n_pairs} pairs)")
        typer.echo(f"workspace: {w.root}")
        try:
            code = launch(
                w,
                host=host,
                port=port,
                with_worker=not no_worker,
                device=device,
                auth=settings,
                backend=backend,
                address=address,
            )
        except DeploymentError as exc:
            fail(str(exc))
        raise typer.Exit(code)
