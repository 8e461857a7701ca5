"""`dpo-kernels train` and `dpo-kernels htsr`: submit a job, or run it here with --foreground.

`train`'s flags are generated from `TrainConfig`: one flag per setting, its help text the field's
description (the same text the Train form shows), its allowed values and its default. A setting
added to the config therefore appears here by itself. Flags left unset do not override `--config`.

Every input is checked before anything is written: a rejected `train` leaves no run directory and
no job behind (the config is validated, the dataset opened and checked, a local model directory
inspected, and only then is a job submitted or a run directory created).
"""

from __future__ import annotations

import inspect
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel

from dpo_engine.cli.common import WorkspaceOption, fail, path_inside, print_json, workspace

# Settings whose own field name would be ambiguous ("name") keep the short flags users know.
FLAG_NAMES = {"model.name": "model", "method.kernel.name": "kernel", "method.divergence.name": "divergence"}
POSITIONAL = {"data.dataset"}  # the DATASET argument


@dataclass(frozen=True)
class ConfigFlag:
    """One `train` flag bound to a dotted TrainConfig path."""

    path: str
    param: str  # python identifier of the callback parameter
    flag: str  # --like-this
    annotation: Any
    is_bool: bool
    is_list: bool
    help: str


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, Any, Any]]:
    """(dotted path, field name, annotation, FieldInfo) of every non-group field, depth first."""
    out = []
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        if _is_model(annotation):
            out.extend(_leaves(annotation, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", name, annotation, info))
    return out


def _value_text(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds_text(info: Any) -> str:
    import annotated_types as at

    parts = []
    for meta in info.metadata:
        for cls, symbol, attr in ((at.Ge, "≥", "ge"), (at.Gt, ">", "gt"), (at.Le, "≤", "le"), (at.Lt, "<", "lt")):
            if isinstance(meta, cls):
                parts.append(f"{symbol} {getattr(meta, attr):g}")
    return " and ".join(parts)


def _help_text(annotation: Any, info: Any) -> str:
    text = (info.description or "").rstrip(".")
    allowed = ""
    if typing.get_origin(annotation) is Literal:
        allowed = ", ".join(map(str, typing.get_args(annotation)))
    elif annotation in (int, float):
        allowed = _bounds_text(info)
        allowed = f"{'integer' if annotation is int else 'number'}{' ' + allowed if allowed else ''}"
    elif typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (str,)
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        allowed = f"comma-separated list of {', '.join(map(str, choices))}" if choices else "comma-separated list"
    default = info.get_default(call_default_factory=True) if not info.is_required() else None
    parts = [text + "."]
    if allowed:
        parts.append(f"Allowed: {allowed}.")
    parts.append(f"Default: {_value_text(default)}.")
    return " ".join(parts)


def config_flags() -> list[ConfigFlag]:
    """One flag per TrainConfig setting (names disambiguated by their group when they clash)."""
    from dpo_engine.train.config import TrainConfig

    leaves = [leaf for leaf in _leaves(TrainConfig) if leaf[0] not in POSITIONAL]
    counts: dict[str, int] = {}
    for _, name, _, _ in leaves:
        counts[name] = counts.get(name, 0) + 1
    flags = []
    for path, name, annotation, info in leaves:
        if path in FLAG_NAMES:
            flag = FLAG_NAMES[path]
        elif counts[name] > 1 or len(name) < 3:
            flag = f"{path.split('.')[-2]}_{name}"
        else:
            flag = name
        flags.append(
            ConfigFlag(
                path=path,
                param=flag,
                flag="--" + flag.replace("_", "-"),
                annotation=annotation,
                is_bool=annotation is bool,
                is_list=typing.get_origin(annotation) is list,
                help=_help_text(annotation, info),
            )
        )
    return flags


# ---------------------------------------------------------------- config from flags


def build_config(
    dataset: str,
    config_file: Optional[Path],
    flag_values: dict[str, Any] | None = None,
    preset: str | None = None,
    **flags: Any,
):
    """TrainConfig from an optional JSON/YAML file, a preset on top of it, the dataset argument and
    the flags given (`flag_values` or keywords, named like the flags: kernel=..., lora_r=...).

    Raises pydantic's ValidationError, ValueError or a YAML error; the CLI turns them into one line.
    """
    flag_values = {**(flag_values or {}), **flags}
    from dpo_engine.train.config import TrainConfig, set_dotted

    raw: dict[str, Any] = {}
    if config_file is not None:
        raw = TrainConfig.from_file(config_file, **{"data.dataset": dataset}).model_dump(mode="json")
    from dpo_engine.train.presets import apply_preset

    raw = apply_preset(raw, preset)
    set_dotted(raw, "data.dataset", dataset)
    by_param = {f.param: f for f in config_flags()}
    for param, value in flag_values.items():
        if value is None:
            continue
        spec = by_param[param]
        if spec.is_list:
            value = [item.strip() for item in str(value).split(",") if item.strip()]
        set_dotted(raw, spec.path, value)
    if flag_values.get("epochs") is not None and flag_values.get("max_steps") is None:
        set_dotted(raw, "optimisation.max_steps", None)
    return TrainConfig.model_validate(raw)


# ---------------------------------------------------------------- commands


def _train(
    dataset: str,
    config: Optional[Path],
    preset: Optional[str],
    run_dir: Optional[Path],
    foreground: bool,
    workspace_path: Optional[str],
    **flag_values: Any,
) -> None:
    """Train DPO-Kernels on a dataset: submit a job (default) or run it here (--foreground).

    Every setting of the training config has a flag below; --config FILE reads a JSON or YAML
    TrainConfig, --preset NAME (e.g. quick) fills in named settings on top of it, and the flags
    given override both.
    """
    if flag_values.get("max_steps") is not None and flag_values.get("epochs") is not None:
        fail("give --max-steps or --epochs, not both")
    if run_dir is not None and not foreground:
        fail("--run-dir needs --foreground (submitted jobs get runs/<run_id>)")
    path = Path(dataset).expanduser()
    if path.is_file():
        dataset = str(path.resolve())  # a worker may run elsewhere: hand it an absolute path
    cfg = build_config(dataset, config, flag_values, preset=preset)
    ws = workspace(workspace_path)
    if run_dir is not None:
        run_dir = path_inside(run_dir, ws.runs_dir, "--run-dir")
    from dpo_engine.train.inputs import check_inputs

    check_inputs(cfg, ws)
    title = f"train {cfg.model.name} {cfg.method.kernel.name}+{cfg.method.divergence.name} on {Path(dataset).name}"
    if not foreground:
        from dpo_engine.jobs import JobStore

        job = JobStore.for_workspace(ws).submit("train", cfg.resolved(), title=title)
        typer.echo(job.run_id)
        return
    _train_foreground(cfg, ws, run_dir)


def _train_signature() -> tuple[inspect.Signature, dict[str, Any]]:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(
            "dataset",
            kw,
            annotation=str,
            default=typer.Argument(
                ..., help="Dataset id/name in the workspace, or a preference file (JSONL, JSON, CSV, Parquet, .gz)."
            ),
        ),
    ]
    for spec in config_flags():
        decl = f"{spec.flag}/--no-{spec.flag[2:]}" if spec.is_bool else spec.flag
        annotation = Optional[bool] if spec.is_bool else Optional[str] if spec.is_list else Optional[spec.annotation]
        if typing.get_origin(spec.annotation) is Literal:
            annotation = Optional[str]
        params.append(
            inspect.Parameter(
                spec.param,
                kw,
                annotation=annotation,
                default=typer.Option(None, decl, help=spec.help, show_default=False),
            )
        )
    params += [
        inspect.Parameter(
            "config",
            kw,
            annotation=Optional[Path],
            default=typer.Option(
                None,
                "--config",
                help="JSON or YAML TrainConfig; the flags given override it. Default: none.",
                show_default=False,
            ),
        ),
        inspect.Parameter(
            "preset",
            kw,
            annotation=Optional[str],
            default=typer.Option(
                None,
                "--preset",
                help="Named settings applied on top of --config and under the flags given: "
                "quick = the bundled SmolLM2-135M-Instruct, HMK, 128-token sequences, 48 steps (about 4 minutes on 2 "
                "CPU cores). Default: none.",
                show_default=False,
            ),
        ),
        inspect.Parameter(
            "run_dir",
            kw,
            annotation=Optional[Path],
            default=typer.Option(
                None,
                "--run-dir",
                help="Run directory inside the workspace (foreground only). Default: runs/<date>-train.",
                show_default=False,
            ),
        ),
        inspect.Parameter(
            "foreground",
            kw,
            annotation=bool,
            default=typer.Option(
                False, "--foreground", help="Train in this process with a progress bar instead of submitting a job."
            ),
        ),
        inspect.Parameter("workspace_path", kw, annotation=Optional[str], default=WorkspaceOption),
    ]
    return inspect.Signature(params), {p.name: p.annotation for p in params}


def make_train_command():
    """The `train` callback with one keyword parameter per flag (typer reads the signature)."""

    def train(**kwargs: Any) -> None:
        fixed = {k: kwargs.pop(k) for k in ("dataset", "config", "preset", "run_dir", "foreground", "workspace_path")}
        _train(**fixed, **kwargs)

    signature, annotations = _train_signature()
    train.__signature__ = signature  # type: ignore[attr-defined]
    train.__annotations__ = annotations
    train.__doc__ = _train.__doc__
    return train


def _train_foreground(cfg, ws, run_dir: Optional[Path]) -> None:
    from tqdm import tqdm

    from dpo_engine import rundir
    from dpo_engine.train.trainer import train as run_training

    if run_dir is None:
        run_dir = ws.run_dir(time.strftime("%Y%m%d-%H%M%S") + "-train")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        tqdm.write(line)
        rundir.append_log(run_dir, line)

    log(f"run directory: {run_dir}")
    if cfg.optimisation.processes > 1:
        from dpo_engine.train.launch import launch_training

        try:
            summary = launch_training(cfg, run_dir, workspace=ws, log=log)
        except ValueError as exc:
            fail(str(exc))
    else:
        summary = run_training(cfg, run_dir, workspace=ws, log=log, progress_bar=True)
    from dpo_engine.analysis.health import health_of
    from dpo_engine.report.rundata import load_run

    alerts = health_of(load_run(run_dir))
    print_json(
        {
            k: summary.get(k)
            for k in (
                "status",
                "steps_completed",
                "final_eval",
                "wall_time_s",
                "tokens_per_s",
                "peak_memory_mb",
                "weighted_alpha_before",
                "weighted_alpha_after",
                "error",
            )
        }
        | {"run_dir": str(run_dir), "health_alerts": [f"{a.headline}: {a.evidence}" for a in alerts]}
    )
    if summary.get("status") != "succeeded":
        fail(summary.get("error") or f"training {summary.get('status')}", code=1)


def _check_analysable(model: str) -> None:
    """A registry name, a cached id, or a directory holding a model or a LoRA adapter."""
    from dpo_engine.models import UnknownModelError, is_known_model

    path = Path(model).expanduser()
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise UnknownModelError(
                f"{path} is a directory but holds no Hugging Face model (no config.json) "
                "and no LoRA adapter (no adapter_config.json)"
            )
    elif not is_known_model(model):
        raise UnknownModelError(
            f"unknown model {model!r}: give smollm2-135m-instruct, tiny-random, a local model "
            "directory or a run's model/ directory"
        )


def htsr(
    model: str = typer.Argument(
        ..., help="Model name (smollm2-135m-instruct, tiny-random), a local directory, or a run's model/ directory."
    ),
    foreground: bool = typer.Option(False, "--foreground", help="Analyse in this process instead of submitting a job."),
    run_dir: Optional[Path] = typer.Option(
        None,
        "--run-dir",
        show_default=False,
        help="Where to write htsr.csv, inside the workspace (foreground only). Default: runs/<date>-htsr.",
    ),
    workspace_path: Optional[str] = WorkspaceOption,
) -> None:
    """WeightWatcher HT-SR analysis of a model: per-layer alpha and the weighted alpha."""
    ws = workspace(workspace_path)
    _check_analysable(model)
    if run_dir is not None:
        if not foreground:
            fail("--run-dir needs --foreground (submitted jobs get runs/<run_id>)")
        run_dir = path_inside(run_dir, ws.runs_dir, "--run-dir")
    if not foreground:
        from dpo_engine.jobs import JobStore

        job = JobStore.for_workspace(ws).submit("htsr", {"model": model}, title=f"htsr {Path(model).name}")
        typer.echo(job.run_id)
        return
    from dpo_engine.analysis.htsr_job import analyze_into

    run_dir = run_dir or ws.run_dir(time.strftime("%Y%m%d-%H%M%S") + "-htsr")
    summary = analyze_into(model, run_dir, workspace=ws)
    print_json({**summary, "run_dir": str(run_dir)})


def register(app: typer.Typer) -> None:
    app.command("train")(make_train_command())
    app.command("htsr")(htsr)
