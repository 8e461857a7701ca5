"""`dpo-kernels`: a thin command-line shell over the engine.

Each concern adds its commands from its own module through `register(app)`, so the CLI stays a
list of thin wrappers and no module here holds engine logic. Errors are handled centrally: every
command is wrapped once (`install_error_handling`), so bad input gives one line and exit 2.
"""

from __future__ import annotations

import importlib

import typer

from dpo_engine.cli.common import document_defaults, install_error_handling, run_cli

app = typer.Typer(
    name="dpo-kernels",
    help="DPO-Kernels Studio: diagnose preference data, train kernelized DPO, present the results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: every default and allowed value printed in full, never cut
)

# Modules that contribute commands; each exposes register(app: typer.Typer).
_COMMAND_MODULES = (
    "dpo_engine.cli.data_cmd",
    "dpo_engine.cli.jobs_cmd",
    "dpo_engine.cli.worker_cmd",
    "dpo_engine.cli.cluster_cmd",
    "dpo_engine.cli.diagnose_cmd",
    "dpo_engine.cli.train_cmd",
    "dpo_engine.cli.report_cmd",
    "dpo_engine.cli.app_cmd",
)

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a concern not built yet
        if exc.name != _name:
            raise
        continue
    _module.register(app)

# One place maps the engine's input errors to one-line messages for every command (see common.py).
document_defaults(app)
install_error_handling(app)


def main() -> None:
    run_cli(app)
