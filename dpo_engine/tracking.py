"""Send a run's metric rows to the experiment trackers a team already uses, under TRL's names.

`open_trackers(report_to, run_dir, run_name, config)` opens the chosen backends (transformers'
names: tensorboard, mlflow, wandb, trackio; "none" or an empty list opens none) and returns an
object whose `.log(row, step, split)` takes a row of metrics.jsonl (split "train") or eval.jsonl
(split "eval") and `.close()` ends the runs. Our keys are renamed to TRL's (`rewards/chosen`,
`rewards/margins`, `logps/chosen`, `learning_rate`, ...) so our runs sit beside TRL runs, with
ours under `kernel/`, `divergence/` and `loss/`; eval rows get the `eval/` prefix.

Everything is offline by default and stays in the run directory: TensorBoard event files in
`<run_dir>/tensorboard/`, an MLflow SQLite store in `<run_dir>/mlflow/` (or the server named by
$MLFLOW_TRACKING_URI), W&B in offline mode under `<run_dir>/wandb/` (unless $WANDB_MODE says
otherwise), and trackio's local store. Each backend's package is imported only when chosen,
and a missing one is a one-line `TrackerUnavailable` error.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KNOWN_TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
EXPERIMENT = "dpo-kernels"
# tensorboard and mlflow are pinned in the `trackers` extra; wandb and trackio are the user's choice.
INSTALL_HINTS = {
    "tensorboard": "pip install 'dpo-kernels-studio[trackers]'",
    "mlflow": "pip install 'dpo-kernels-studio[trackers]'",
    "wandb": "pip install wandb",
    "trackio": "pip install trackio",
}

# Our run-directory keys -> TRL's metric names (DPOTrainer), then ours where TRL has none.
TRL_NAMES: dict[str, str] = {
    "loss": "loss",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "margin": "rewards/margins",
    "reward_acc": "rewards/accuracies",
    "logp_chosen": "logps/chosen",
    "logp_rejected": "logps/rejected",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
    "beta": "beta",
    "loss_pref": "loss/preference",
    "loss_div": "loss/divergence",
    "loss_entropy": "loss/entropy",
    "hybrid_acc": "rewards/hybrid_accuracies",
    "tokens_per_s": "throughput/tokens_per_s",
    "dbs": "kernel/dbs",
    "probe_acc": "kernel/probe_acc",
    "probe_acc_lo": "kernel/probe_acc_lo",
    "probe_acc_hi": "kernel/probe_acc_hi",
}
NOT_METRICS = ("step", "split", "time", "timestamp")


class TrackerUnavailable(RuntimeError):
    """A chosen tracker's package is not installed (or the name is unknown)."""


def tracker_name(key: str) -> str:
    """The tracker-side name of one of our metric keys."""
    if key in TRL_NAMES:
        return TRL_NAMES[key]
    for prefix, group in (("lambda_", "kernel/"), ("tau_", "kernel/")):
        if key.startswith(prefix):
            return group + key
    if key.startswith("div_"):
        return "divergence/" + key[len("div_") :]
    return key


def to_tracker_metrics(row: dict[str, Any], split: str) -> dict[str, float]:
    """Numeric values of a metrics/eval row under tracker names (`eval/` prefix for eval rows).

    Non-finite values are left out, as the run directory writes them as null: a trace that was not
    computed (e.g. divergences switched off) must not reach a dashboard as a curve of NaN."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = tracker_name(key)
        out[f"eval/{name}" if split == "eval" else name] = float(value)
    return out


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise TrackerUnavailable(
            f"--report-to {tracker} needs the '{package}' package: {INSTALL_HINTS[tracker]}"
        ) from None


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        mlflow = _require("mlflow", "mlflow")
        from mlflow.entities import Param

        store = run_dir / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(EXPERIMENT, artifact_location=(store / "artifacts").as_uri())
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, int(step)) for name, value in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            name=run_name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=int(step))

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.trackio = _require("trackio", "trackio")
        self.run = self.trackio.init(project=EXPERIMENT, name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=int(step))

    def close(self) -> None:
        self.trackio.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB, "trackio": _Trackio}


class Trackers:
    """The open trackers of one run; `log` sends a row to each, `close` ends them."""

    def __init__(self, backends: list[Any]) -> None:
        self.backends = backends

    def log(self, row: dict[str, Any], step: int, split: str) -> None:
        metrics = to_tracker_metrics(row, split)
        if not metrics:
            return
        for backend in self.backends:
            backend.log(metrics, int(step))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """`"tensorboard,mlflow"` or a list -> validated names; "none"/"" -> []."""
    if report_to is None:
        return []
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [x.strip().lower() for x in items if x.strip() and x.strip().lower() != "none"]
    unknown = [x for x in names if x not in KNOWN_TRACKERS]
    if unknown:
        raise TrackerUnavailable(f"unknown tracker {unknown[0]!r}; choose from {', '.join(KNOWN_TRACKERS)} or none")
    return list(dict.fromkeys(names))


def open_trackers(report_to: list[str], run_dir: Path, run_name: str, config: dict) -> Trackers:
    """Open every chosen tracker for one run (closing those already open if one fails)."""
    opened: list[Any] = []
    run_dir = Path(run_dir)
    try:
        for name in parse_report_to(report_to):
            opened.append(_BACKENDS[name](run_dir, run_name, config))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
