"""`dpo-kernels train` and `dpo-kernels htsr`: submit a job, or run it here with --foreground."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from dpo_engine.cli.common import WorkspaceOption, fail, print_json, workspace


def _overrides(**flags: Any) -> dict[str, Any]:
    """CLI flags -> dotted TrainConfig keys (flags left unset do not override the config file)."""
    mapping = {
        "model": "model.name", "kernel": "method.kernel.name", "divergence": "method.divergence.name",
        "beta": "method.loss.beta", "gamma": "method.loss.gamma", "alpha": "method.divergence.alpha",
        "epsilon_dpo": "method.loss.epsilon_dpo", "embedding_source": "method.embedding_source",
        "max_steps": "optimisation.max_steps", "epochs": "optimisation.epochs",
        "batch_size": "optimisation.batch_size", "grad_accum": "optimisation.grad_accum", "lr": "optimisation.lr",
        "max_length": "data.max_length", "lora": "model.lora", "eval_every": "monitoring.eval_every",
        "snapshot_every": "monitoring.snapshot_every", "seed": "optimisation.seed", "htsr": "monitoring.htsr",
    }
    out = {mapping[k]: v for k, v in flags.items() if v is not None}
    if flags.get("epochs") is not None and flags.get("max_steps") is None:
        out["optimisation.max_steps"] = None
    return out


def build_config(dataset: str, config_file: Optional[Path], **flags: Any):
    from pydantic import ValidationError

    from dpo_engine.train.config import TrainConfig, set_dotted

    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = TrainConfig.from_file(config_file).model_dump(mode="json")
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
    overrides = _overrides(**flags)
    set_dotted(raw, "data.dataset", dataset)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        fail(f"invalid training config: {problems}")


def train(
    dataset: str = typer.Argument(..., help="Dataset id/name in the workspace, or a preference file."),
    model: Optional[str] = typer.Option(None, "--model", help="smollm2-135m-instruct, tiny-random, a local dir or cached id."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="none, rbf, polynomial, spectral, mahalanobis, mixture, hmk."),
    divergence: Optional[str] = typer.Option(None, "--divergence", help="none, kl, js, hellinger, renyi, bhattacharyya, wasserstein, fdiv."),
    beta: Optional[float] = typer.Option(None, "--beta"),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Weight of the kernel margin."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Weight of the divergence regulariser."),
    epsilon_dpo: Optional[float] = typer.Option(None, "--epsilon-dpo", help="epsilon-DPO adaptive beta (0 = fixed)."),
    embedding_source: Optional[str] = typer.Option(None, "--embedding-source", help="policy or encoder."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    snapshot_every: Optional[int] = typer.Option(None, "--snapshot-every"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or YAML TrainConfig; flags override it."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (foreground only; default runs/<run_id>)."),
    foreground: bool = typer.Option(False, "--foreground", help="Train in this process with a progress bar."),
    no_htsr: bool = typer.Option(False, "--no-htsr", help="Skip the WeightWatcher analysis."),
    workspace_path: Optional[str] = WorkspaceOption,
) -> None:
    """Train DPO-Kernels on a dataset: submit a job (default) or run it here (--foreground)."""
    if max_steps is not None and epochs is not None:
        fail("give --max-steps or --epochs, not both")
    cfg = build_config(
        dataset, config, model=model, kernel=kernel, divergence=divergence, beta=beta, gamma=gamma, alpha=alpha,
        epsilon_dpo=epsilon_dpo, embedding_source=embedding_source, max_steps=max_steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_length=max_length, lora=lora,
        eval_every=eval_every, snapshot_every=snapshot_every, seed=seed, htsr=False if no_htsr else None,
    )
    ws = workspace(workspace_path)
    title = f"train {cfg.model.name} {cfg.method.kernel.name}+{cfg.method.divergence.name} on {Path(dataset).name}"
    if not foreground:
        if run_dir is not None:
            fail("--run-dir needs --foreground (submitted jobs get runs/<run_id>)")
        from dpo_engine.jobs import JobStore

        job = JobStore.for_workspace(ws).submit("train", cfg.resolved(), title=title)
        typer.echo(job.run_id)
        return
    _train_foreground(cfg, ws, run_dir)


def _train_foreground(cfg, ws, run_dir: Optional[Path]) -> None:
    from tqdm import tqdm

    from dpo_engine.train import rundir
    from dpo_engine.train.trainer import train as run_training

    if run_dir is None:
        run_dir = ws.run_dir(time.strftime("%Y%m%d-%H%M%S") + "-train")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        tqdm.write(line)
        rundir.append_log(run_dir, line)

    log(f"run directory: {run_dir}")
    summary = run_training(cfg, run_dir, workspace=ws, log=log, progress_bar=True)
    print_json({k: summary.get(k) for k in ("status", "steps_completed", "final_eval", "wall_time_s", "tokens_per_s",
                                            "peak_memory_mb", "weighted_alpha_before", "weighted_alpha_after", "error")})
    if summary.get("status") != "succeeded":
        fail(summary.get("error") or f"training {summary.get('status')}", code=1)


def htsr(
    model: str = typer.Argument(..., help="Model name, local directory, or a run's model/ directory."),
    foreground: bool = typer.Option(False, "--foreground", help="Analyse in this process instead of submitting a job."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where to write htsr.csv (foreground only)."),
    workspace_path: Optional[str] = WorkspaceOption,
) -> None:
    """WeightWatcher HT-SR analysis of a model: per-layer alpha and the weighted alpha."""
    ws = workspace(workspace_path)
    if not foreground:
        from dpo_engine.jobs import JobStore

        job = JobStore.for_workspace(ws).submit("htsr", {"model": model}, title=f"htsr {Path(model).name}")
        typer.echo(job.run_id)
        return
    from dpo_engine.analysis.htsr_job import analyze_into
    from dpo_engine.models import UnknownModelError

    run_dir = run_dir or ws.run_dir(time.strftime("%Y%m%d-%H%M%S") + "-htsr")
    try:
        summary = analyze_into(model, run_dir, workspace=ws)
    except (UnknownModelError, ValueError) as exc:
        fail(str(exc))
    print_json({**summary, "run_dir": str(run_dir)})


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("htsr")(htsr)
