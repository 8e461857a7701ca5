"""`dpo-kernels`: a thin command-line shell over the engine.

Each concern adds its commands from its own module through `register(app)`, so the CLI stays a
list of thin wrappers and no module here holds engine logic. Errors are handled centrally: every
command is wrapped once (`install_error_handling`), so bad input gives one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

import typer

from dpo_engine.cli.common import document_defaults, install_error_handling, run_cli

# Top-level command -> the module that adds it; each module exposes register(app: typer.Typer).
_COMMANDS = {
    "data": "dpo_engine.cli.data_cmd",
    "jobs": "dpo_engine.cli.jobs_cmd",
    "worker": "dpo_engine.cli.worker_cmd",
    "cluster": "dpo_engine.cli.cluster_cmd",
    "diagnose": "dpo_engine.cli.diagnose_cmd",
    "train": "dpo_engine.cli.train_cmd",
    "htsr": "dpo_engine.cli.train_cmd",
    "report": "dpo_engine.cli.report_cmd",
    "app": "dpo_engine.cli.app_cmd",
}


def build_app(modules: Iterable[str]) -> typer.Typer:
    """A CLI with the commands of `modules` (all of them for help and for tests)."""
    built = typer.Typer(
        name="dpo-kernels",
        help="DPO-Kernels Studio: diagnose preference data, train kernelized DPO, present the results.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain help: every default and allowed value printed in full, never cut
    )

    @built.callback()
    def _group() -> None:
        """Keeps a CLI built with one command a group (`dpo-kernels data ...`), as with all of them."""

    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(built)
    # One place maps the engine's input errors to one-line messages for every command (see common.py).
    document_defaults(built)
    install_error_handling(built)
    return built


def __getattr__(name: str):
    """`dpo_engine.cli.app`: the whole CLI, built on first use."""
    if name == "app":
        globals()["app"] = built = build_app(_COMMANDS.values())
        return built
    raise AttributeError(name)


def main() -> None:
    """Run the CLI; a known command loads only its own module, so that `data` or `worker` does not
    pay for importing the training stack."""
    first = sys.argv[1] if len(sys.argv) > 1 else None
    run_cli(build_app([_COMMANDS[first]]) if first in _COMMANDS else __getattr__("app"))
