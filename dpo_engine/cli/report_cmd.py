"""`dpo-kernels report RUN_ID... --out report.html`: the self-contained stakeholder report."""

from __future__ import annotations

from pathlib import Path

import typer

from dpo_engine.cli.common import WorkspaceOption, workspace


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_ids: list[str] = typer.Argument(
            ..., help="Run ids (or job ids) to include; several runs add a comparison."
        ),
        out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
        diagnosis: str | None = typer.Option(
            None,
            "--diagnosis",
            help="Run or job id of a diagnose job (default: the newest diagnosis of the run's dataset).",
        ),
        workspace_path: str | None = WorkspaceOption,
    ) -> None:
        """Write one HTML file (opens offline): the results in plain words, every plot, alerts, diagnosis,
        configuration and, last, what the runs cost."""
        from dpo_engine.report import write_report

        ws = workspace(workspace_path)
        path = write_report(ws, run_ids, out, diagnosis=diagnosis)  # unknown ids -> one line, exit 2
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
