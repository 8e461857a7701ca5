"""`dpo-kernels app`: the web app plus a local worker, with the bundled sample registered."""

from __future__ import annotations

import typer

from dpo_engine.cli.common import WorkspaceOption, workspace


def register(app: typer.Typer) -> None:
    @app.command("app")
    def app_command(
        host: str = typer.Option(None, help="Address to serve on (default from streamlit_config.toml: 127.0.0.1)."),
        port: int = typer.Option(None, help="Port (default from streamlit_config.toml: 8501)."),
        ws: str = WorkspaceOption,
        no_worker: bool = typer.Option(False, "--no-worker", help="Do not start a local worker."),
        device: str = typer.Option("auto", help="Device of the local worker: auto, cpu or cuda:N."),
        sample: bool = typer.Option(True, "--sample/--no-sample", help="Register the bundled sample dataset."),
    ) -> None:
        """Start the Streamlit app and a local worker; Ctrl-C stops both."""
        from dpo_engine.serve import launch

        w = workspace(ws)
        if sample:
            from dpo_engine.data import ensure_sample_dataset

            info = ensure_sample_dataset(w)
            typer.echo(f"sample dataset: {info.id} ({info.n_pairs} pairs)")
        typer.echo(f"workspace: {w.root}")
        raise typer.Exit(launch(w, host=host, port=port, with_worker=not no_worker, device=device))
