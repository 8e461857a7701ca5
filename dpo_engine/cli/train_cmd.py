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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from dpo_engine.cli.common import WorkspaceOption, announce_job, fail, path_inside, print_json, workspace
from dpo_engine.schema import help_text, leaf_settings
from dpo_engine.train.presets import QUICK_MINUTES

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


def config_flags() -> list[ConfigFlag]:
    """One flag per TrainConfig setting (names disambiguated by their group when they clash)."""
    from dpo_engine.train.config import TrainConfig

    leaves = [spec for spec in leaf_settings(TrainConfig) if spec.path not in POSITIONAL]
    counts: dict[str, int] = {}
    for spec in leaves:
        counts[spec.name] = counts.get(spec.name, 0) + 1
    flags = []
    for spec in leaves:
        if spec.path in FLAG_NAMES:
            flag = FLAG_NAMES[spec.path]
        elif counts[spec.name] > 1 or len(spec.name) < 3:
            flag = f"{spec.path.split('.')[-2]}_{spec.name}"
        else:
            flag = spec.name
        flags.append(
            ConfigFlag(
                path=spec.path,
                param=flag,
                flag="--" + flag.replace("_", "-"),
                annotation=spec.annotation,
                is_bool=spec.is_bool,
                is_list=spec.is_list,
                help=help_text(spec),
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
    dry_run: bool,
    device: Optional[str],
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
    if device is not None:
        from dpo_engine.jobs.devices import normalize_device

        device = normalize_device(device)
    cfg = build_config(dataset, config, flag_values, preset=preset)
    ws = workspace(workspace_path)
    if run_dir is not None:
        run_dir = path_inside(run_dir, ws.runs_dir, "--run-dir")
    from dpo_engine.train.inputs import check_inputs, check_memory

    check_inputs(cfg, ws)
    if not (dry_run or foreground):  # queued: checked here too when this machine has the job's device
        from dpo_engine.jobs import JobStore

        if device is not None and _visible_here(device):
            check_memory(cfg, ws, device)
        title = f"train {cfg.model.name} {cfg.method.kernel.name}+{cfg.method.divergence.name} on {Path(dataset).name}"
        job = JobStore.for_workspace(ws).submit("train", cfg.resolved(), title=title, requested_device=device)
        announce_job(job)
        return
    here = device or _local_device()
    if not _visible_here(here):
        fail(f"device {here} is not on this machine; give --device cpu or one of its GPUs, or queue the job")
    if dry_run:
        _print_estimate(cfg, ws, here)
        return
    check_memory(cfg, ws, here)
    _train_foreground(cfg, ws, run_dir, here)


def _local_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _visible_here(device: str) -> bool:
    """Whether this machine has `device`, so a job for it can be checked before it is queued."""
    if device == "cpu":
        return True
    if not device.startswith("cuda:"):
        return False
    import torch

    return int(device.split(":")[1]) < torch.cuda.device_count()


def _print_estimate(cfg, ws, device: str) -> None:
    from dpo_engine.train.inputs import memory_estimate
    from dpo_engine.train.setup import require_device_support

    require_device_support(cfg.model, device)  # options that cannot run there at all: one line, no estimate
    estimate = memory_estimate(cfg, ws, device)
    gib = 1024**3
    print_json(
        {
            "device": estimate.device,
            "predicted_peak_gib": round(estimate.total / gib, 2),
            "available_gib": round(estimate.available / gib, 2) if estimate.available else None,
            "fits": estimate.fits,
            "components_gib": {k: round(v / gib, 3) for k, v in estimate.components.items()},
            "to_fit": estimate.advice,
        }
    )
    if not estimate.fits:
        fail(f"this run will not fit on {estimate.device}: " + "; or ".join(estimate.advice), code=1)


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
                "quick = the bundled SmolLM2-135M-Instruct, HMK, 128-token sequences, 48 steps (about "
                f"{QUICK_MINUTES} minutes on 2 CPU cores). Default: none.",
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
        inspect.Parameter(
            "dry_run",
            kw,
            annotation=bool,
            default=typer.Option(
                False,
                "--dry-run",
                help="Check the inputs and print the predicted peak memory against this machine's device; "
                "queue nothing.",
            ),
        ),
        inspect.Parameter(
            "device",
            kw,
            annotation=Optional[str],
            default=typer.Option(
                None,
                "--device",
                help="cpu or cuda:N. A submitted job waits for a worker on that device (without it, any worker "
                "takes it, and one whose device cannot hold the run fails it); --foreground and --dry-run use it "
                "here. Default: any worker; here, the first GPU if there is one.",
                show_default=False,
            ),
        ),
        inspect.Parameter("workspace_path", kw, annotation=Optional[str], default=WorkspaceOption),
    ]
    return inspect.Signature(params), {p.name: p.annotation for p in params}


def make_train_command():
    """The `train` callback with one keyword parameter per flag (typer reads the signature)."""

    def train(**kwargs: Any) -> None:
        fixed = {
            k: kwargs.pop(k)
            for k in ("dataset", "config", "preset", "run_dir", "foreground", "dry_run", "device", "workspace_path")
        }
        _train(**fixed, **kwargs)

    signature, annotations = _train_signature()
    train.__signature__ = signature  # type: ignore[attr-defined]
    train.__annotations__ = annotations
    train.__doc__ = _train.__doc__
    return train


def _train_foreground(cfg, ws, run_dir: Optional[Path], device: str) -> None:
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
            cpu = device if device.startswith("cpu") else None  # GPUs: one process per visible GPU
            summary = launch_training(cfg, run_dir, workspace=ws, device=cpu, log=log)
        except ValueError as exc:
            fail(str(exc))
    else:
        summary = run_training(cfg, run_dir, workspace=ws, device=device, log=log, progress_bar=True)
    from dpo_engine.analysis.health import health_of
    from dpo_engine.report.rundata import load_run

    alerts = health_of(load_run(run_dir))
    print_json(
        {k: summary.get(k) for k in rundir.SUMMARY_HEADLINE}
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
        announce_job(job)
        return
    import torch

    from dpo_engine.analysis.htsr_job import analyze_into

    run_dir = run_dir or ws.run_dir(time.strftime("%Y%m%d-%H%M%S") + "-htsr")
    summary = analyze_into(model, run_dir, workspace=ws, device="cuda:0" if torch.cuda.is_available() else None)
    print_json({**summary, "run_dir": str(run_dir)})


def register(app: typer.Typer) -> None:
    app.command("train")(make_train_command())
    app.command("htsr")(htsr)
