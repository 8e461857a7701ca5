"""Helpers shared by CLI commands: workspace option, JSON output, clean one-line failures.

Every command is wrapped by `catch_input_errors` (applied once to the whole command tree in
`dpo_engine.cli`), which turns the engine's known "your input is unusable" exceptions into one
line on stderr and exit status 2. Commands therefore call the engine directly and do not sprinkle
try/except: a new error type is taught to the CLI here, in one place.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import typer

from dpo_engine.workspace import PLAIN_NAME, Workspace

WorkspaceOption = typer.Option(
    None, "--workspace", "-w", help="Workspace directory (default: $DPO_KERNELS_WORKSPACE or ./workspace)."
)

USAGE_EXIT = 2
DEBUG_ENV = "DPO_KERNELS_DEBUG"


def workspace(path: str | None) -> Workspace:
    return Workspace.resolve(path)


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(str(text).split())


def fail(message: str, code: int = USAGE_EXIT) -> NoReturn:
    """Exit with a one-line message on stderr and no traceback (exit 2 = unusable input)."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def announce_job(job) -> None:
    """Say on stderr which job was queued and how to follow it; stdout keeps only the run id for scripts."""
    typer.echo(
        f"submitted job {job.id} (run {job.run_id}); follow it: dpo-kernels jobs logs {job.id} --follow", err=True
    )
    typer.echo(job.run_id)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


# ---------------------------------------------------------------- paths


def plain_id(value: str, what: str = "run id") -> str:
    """A run or dataset id must be a plain name: no '/', no '..', nothing that escapes the workspace."""
    if not PLAIN_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-'; no path separators)")
    return value


def path_inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved, refused unless it lies under `root` (a run directory outside the workspace
    would never show up on the Runs page or in `dpo-kernels report`)."""
    resolved = Path(path).expanduser().resolve()
    root = Path(root).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{what} {path} is outside the workspace ({root}); give a path under it or leave it out")
    return resolved


# ---------------------------------------------------------------- errors -> one line


def _validation_message(exc: Exception) -> str:
    problems = []
    for error in exc.errors():  # type: ignore[attr-defined]
        where = ".".join(str(p) for p in error.get("loc", ()) if not isinstance(p, int)) or "config"
        problems.append(f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(problems)


def _yaml_message(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"the config file is not valid YAML: {problem}{where}"


def _os_message(exc: OSError) -> str:
    if not exc.strerror:  # raised with a message of our own (e.g. "config file X does not exist")
        return one_line(exc)
    name = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    return f"cannot use{name}: {exc.strerror}"


def error_message(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an exception the user caused, None for a genuine bug."""
    from pydantic import ValidationError

    try:
        import yaml

        yaml_error: tuple[type, ...] = (yaml.YAMLError,)
    except ImportError:  # pragma: no cover - PyYAML ships with the dependencies
        yaml_error = ()
    from dpo_engine.jobs.store import JobNotFound, JobStateError

    if isinstance(exc, ValidationError):
        return _validation_message(exc), USAGE_EXIT
    if yaml_error and isinstance(exc, yaml_error):
        return _yaml_message(exc), USAGE_EXIT
    if isinstance(exc, JobStateError):
        return one_line(exc), 1
    if isinstance(exc, (JobNotFound, KeyError)):  # DatasetNotFound is a KeyError with a readable message
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return one_line(text), USAGE_EXIT
    if isinstance(exc, UnicodeDecodeError):
        return f"the input is not UTF-8 text ({exc.reason} at byte {exc.start}); is it a binary file?", USAGE_EXIT
    if isinstance(exc, OSError):
        return _os_message(exc), USAGE_EXIT
    if type(exc).__name__ == "MissingColumnsError":
        return (
            f"{one_line(exc)} (store the file with its columns mapped: "
            "`dpo-kernels data add FILE --map FIELD=COLUMN`, then use the dataset id)"
        ), USAGE_EXIT
    if isinstance(exc, ValueError):  # DataFormatError, UnknownModelError, ReportError, bad numbers...
        return one_line(exc) or type(exc).__name__, USAGE_EXIT
    if type(exc).__name__ == "EmbedderNotAvailable":
        return one_line(exc), USAGE_EXIT
    return None


def catch_input_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command callback: known input errors -> `error: <one line>` and exit 2 (see module doc)."""
    if getattr(func, "_catches_input_errors", False):
        return func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - mapped below; genuine bugs are re-raised
            mapped = error_message(exc)
            if mapped is None or os.environ.get(DEBUG_ENV):
                raise
            fail(*mapped)

    wrapper._catches_input_errors = True  # type: ignore[attr-defined]
    return wrapper


def install_error_handling(app: typer.Typer) -> None:
    """Wrap every command of `app` and of its sub-apps with `catch_input_errors`."""
    for command in app.registered_commands:
        if command.callback is not None:
            command.callback = catch_input_errors(command.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            install_error_handling(group.typer_instance)


def _say_unset_defaults(callback: Callable[..., Any]) -> None:
    """Options whose default is "not given" say so in their help, so `--help` shows every default."""
    from typer.models import OptionInfo

    for param in inspect.signature(callback).parameters.values():
        info = param.default
        if not isinstance(info, OptionInfo) or info.default not in (None, [], ()):
            continue
        text = (info.help or "").rstrip()
        if "default" not in text.lower():
            info.help = f"{text} Default: {'none' if info.default is None else 'empty'}.".strip()


def document_defaults(app: typer.Typer) -> None:
    """Apply `_say_unset_defaults` to every command of `app` and its sub-apps (before wrapping)."""
    for command in app.registered_commands:
        if command.callback is not None:
            _say_unset_defaults(command.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            document_defaults(group.typer_instance)


def run_cli(app: typer.Typer) -> None:
    """Entry point: the parser's own usage errors also become one line, and a genuine bug prints one
    line plus how to see the traceback (set DPO_KERNELS_DEBUG=1)."""
    try:
        _run(app)
    except BrokenPipeError:  # `dpo-kernels ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def _run(app: typer.Typer) -> None:
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as exc:  # the parser's errors: bad option, missing argument, wrong type
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `dpo-kernels` or a bare group: show its help
            typer.echo(exc.format_message())
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(getattr(exc, "exit_code", USAGE_EXIT))
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        typer.echo(
            f"error: internal error {type(exc).__name__}: {one_line(exc)} (set {DEBUG_ENV}=1 to see the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
