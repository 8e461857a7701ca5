"""Helpers shared by CLI commands: workspace option, JSON output, clean one-line failures."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from dpo_engine.workspace import Workspace

WorkspaceOption = typer.Option(
    None, "--workspace", "-w", help="Workspace directory (default: $DPO_KERNELS_WORKSPACE or ./workspace)."
)


def workspace(path: str | None) -> Workspace:
    return Workspace.resolve(path)


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit with a one-line message on stderr and no traceback (exit 2 = unusable input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
