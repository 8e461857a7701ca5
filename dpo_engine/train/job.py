"""The "train" job: TrainConfig JSON in ctx.params -> a run directory, resuming a killed run's checkpoint."""

from __future__ import annotations

import os
from typing import Any

from dpo_engine import rundir


def run_train_job(ctx) -> dict[str, Any]:
    """Entry point the worker calls in the job's child process (stdout goes to log.txt)."""
    from dpo_engine.jobs.ray_backend import ENV_RAY_ADDRESS
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import train

    config = TrainConfig.model_validate(ctx.params)
    resume = rundir.latest_checkpoint(ctx.run_dir)
    if resume is not None:
        print(f"resuming from {resume}", flush=True)
    ray_address = os.environ.get(ENV_RAY_ADDRESS)  # set when the Ray backend runs this job
    if not ray_address:  # refused in seconds, before a model is loaded, when it cannot fit this device
        from dpo_engine.train.inputs import check_memory

        # free memory opens a CUDA context here; a job of several processes only waits, so it reads the total
        free = config.optimisation.processes == 1
        print(check_memory(config, ctx.workspace, str(ctx.device), free=free).summary(), flush=True)
    try:
        if config.optimisation.processes > 1 and ray_address:  # N Ray Train workers on the cluster (ray_train.py)
            from dpo_engine.train.ray_train import launch_training_on_ray

            requested = ctx.job.requested_device or ""  # none: GPUs when the cluster has any
            summary = launch_training_on_ray(
                config,
                ctx.run_dir,
                workspace=ctx.workspace,
                address=ray_address,
                use_gpu=requested.startswith("cuda") if requested else None,
                should_stop=ctx.should_stop,
                progress=ctx.progress,
            )
        elif config.optimisation.processes > 1:  # the same trainer on N processes (launch.py); this one waits
            from dpo_engine.train.launch import launch_training

            device = ctx.device if str(ctx.device).startswith("cpu") else None  # GPUs: one process per visible GPU
            summary = launch_training(
                config,
                ctx.run_dir,
                workspace=ctx.workspace,
                device=device,
                should_stop=ctx.should_stop,
                progress=ctx.progress,
            )
        else:
            summary = train(
                config,
                ctx.run_dir,
                workspace=ctx.workspace,
                device=ctx.device,
                progress=ctx.progress,
                should_stop=ctx.should_stop,
                log=lambda line: print(line, flush=True),
            )
    except BaseException as exc:
        if type(exc).__name__ == "JobCancelled":  # stopped by a signal mid-step: record it as such
            _mark(ctx.run_dir, "cancelled", str(exc))
        raise
    status = summary.get("status")
    if status == "failed":
        raise RuntimeError(summary.get("error") or "training failed")
    if status == "cancelled":
        from dpo_engine.jobs.context import JobCancelled

        raise JobCancelled("training cancelled on request")
    ctx.progress(1.0, "done")
    return {k: summary.get(k) for k in rundir.SUMMARY_HEADLINE}


def _mark(run_dir, status: str, error: str) -> None:
    summary = rundir.read_summary(run_dir) or {}
    summary.update(status=status, error=error)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
