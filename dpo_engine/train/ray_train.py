"""Multi-process training on a Ray cluster: the same `train()` on N Ray Train workers.

On a Ray cluster the N processes of `optimisation.processes` may sit on several machines, which
`torch.distributed.run` (launch.py, one node) cannot reach. `launch_training_on_ray` runs them
through Ray Train's `TorchTrainer` (`ScalingConfig(num_workers=N, use_gpu=...)`): Ray places the
workers and sets up the torch process group (gloo on CPU, NCCL on GPUs) with RANK, WORLD_SIZE,
LOCAL_RANK and ACCELERATE_TORCH_DEVICE, so accelerate's Accelerator joins that group and the
trainer runs unchanged: metrics averaged over processes, rank 0 alone writes the run directory.
The run directory must be on storage every node sees (as for any job on the cluster); Ray
Train's own storage goes inside it (`ray_train/`), as do rank 0's log lines (the driver passes
them to `log`) and the stop request.

Ray Train 2.60 offers no call to stop a running `fit()` from another thread (only Ctrl-C in the
main thread), so cancel is cooperative: the driver writes `ray_train/stop`, and before each step
the workers agree (all-reduce) on whether any of them sees it, then all end the step loop at
the same step and rank 0 records "cancelled". A process killed outright takes its Ray Train run
along (Ray ends the actors of a driver that is gone).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from dpo_engine import rundir
from dpo_engine.train.launch import LAUNCH_CONFIG, report_step_progress

STAGE = "ray_train"  # Ray Train's storage, rank 0's log and the stop request, inside the run directory
RANK0_LOG = "rank0.log"
STOP = "stop"
# How long a stopped launcher waits for its workers to stop at a step before leaving Ray to end them:
# well within the grace a worker gives a cancelled job (jobs/worker.py CANCEL_GRACE_S).
STOP_WAIT_S = 15.0


def _worker(args: dict[str, Any]) -> None:
    """One Ray Train worker: `train()` in the process group Ray Train set up."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import train
    from dpo_engine.workspace import Workspace

    run_dir = Path(args["run_dir"])
    stage = run_dir / STAGE
    config = TrainConfig.model_validate(json.loads((run_dir / LAUNCH_CONFIG).read_text(encoding="utf-8")))
    rank0 = ray.train.get_context().get_world_rank() == 0
    out = open(stage / RANK0_LOG, "a", encoding="utf-8") if rank0 else None

    def log(line: str) -> None:
        if out is not None:
            out.write(line + "\n")
            out.flush()

    def should_stop() -> bool:  # every rank calls this before each step: one tiny all-reduce
        flag = torch.tensor([float((stage / STOP).exists())], device=get_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    try:
        train(
            config,
            run_dir,
            workspace=Workspace(Path(args["workspace"])),
            device=args["device"],
            should_stop=should_stop,
            log=log,
        )
    finally:
        if out is not None:
            out.close()


def _one_line(exc: BaseException) -> str:
    """The first worker's error (or the exception's own), on one line."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
        exc = getattr(exc, "_base_exc", exc)  # Ray wraps the worker's exception with its traceback
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def launch_training_on_ray(
    config,
    run_dir: str | Path,
    *,
    workspace,
    address: str | None = None,
    use_gpu: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `train()` on config.optimisation.processes Ray Train workers into run_dir; return summary.json.

    use_gpu: one GPU per worker (NCCL) or the CPU (gloo); None: GPUs when the cluster has any.
    Connects to the cluster at `address` unless Ray is already initialised in this process."""
    import ray

    run_dir = Path(run_dir).resolve()
    stage = run_dir / STAGE
    stage.mkdir(parents=True, exist_ok=True)
    for stale in (STOP, RANK0_LOG):  # from an earlier launch into this run directory
        (stage / stale).unlink(missing_ok=True)
    (run_dir / LAUNCH_CONFIG).write_text(config.model_dump_json(), encoding="utf-8")
    owned = not ray.is_initialized()
    outcome: dict[str, BaseException] = {}
    cancelled = False
    try:
        try:
            trainer = _trainer(config, run_dir, workspace, address, owned, use_gpu)
        except Exception as exc:  # noqa: BLE001 - no cluster, bad settings: the run's one-line error
            outcome["error"] = exc
        else:
            runner = threading.Thread(target=_fit, args=(trainer, outcome), name="ray-train-fit", daemon=True)
            runner.start()
            try:
                cancelled = _follow(
                    runner, config, run_dir, should_stop, progress, log or (lambda line: print(line, flush=True))
                )
            except BaseException:  # a signal stopped this process (a job's cancel): let the workers stop at a step
                (stage / STOP).touch()
                runner.join(timeout=STOP_WAIT_S)
                raise
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()
    summary = rundir.read_summary(run_dir) or {}
    if "error" in outcome:
        summary.update(
            status="cancelled" if cancelled else "failed", error=summary.get("error") or _one_line(outcome["error"])
        )
    elif summary.get("status") in (None, "running"):
        summary.update(
            status="cancelled" if cancelled else "failed",
            error=None if cancelled else "the Ray Train workers ended without writing summary.json",
        )
    return summary


def _trainer(config, run_dir: Path, workspace, address: str | None, connect: bool, use_gpu: bool | None):
    """Connect to the cluster (when `connect`) and build the TorchTrainer."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dpo_engine.jobs.ray_backend import FORWARDED_ENV
    from dpo_engine.jobs.ray_cluster import join

    if connect:  # the workers start from `ray start`'s environment: hand them this job's settings
        address = join(address, workspace)  # loopback kept as loopback, the workspace head's token
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        on_term = signal.getsignal(signal.SIGTERM)
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env} if env else None,
        )
        if on_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)  # ray.init replaced it with sys.exit; a job's cancel needs its own
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    return TorchTrainer(
        _worker,
        train_loop_config={
            "run_dir": str(run_dir),
            "workspace": str(Path(workspace.root).resolve()),
            "device": None if use_gpu else "cpu",
        },
        scaling_config=ScalingConfig(num_workers=config.optimisation.processes, use_gpu=use_gpu),
        run_config=RunConfig(name="fit", storage_path=str(run_dir / STAGE)),
    )


def _fit(trainer, outcome: dict[str, BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - reported as the run's error line
        outcome["error"] = exc


def _follow(runner: threading.Thread, config, run_dir: Path, should_stop, progress, log) -> bool:
    """Until the run ends: pass rank 0's log lines on, report progress, ask for a stop when told.
    Returns whether a stop was asked for."""
    stage, total, pos, cancelled = run_dir / STAGE, config.optimisation.max_steps, 0, False
    while True:
        runner.join(timeout=0.5)
        pos = _pass_on(stage / RANK0_LOG, pos, log)
        if not runner.is_alive():
            return cancelled
        if not cancelled and should_stop is not None and should_stop():
            cancelled = True
            (stage / STOP).touch()
        report_step_progress(run_dir, total, progress, f"{config.optimisation.processes} Ray Train workers")


def _pass_on(path: Path, pos: int, log: Callable[[str], None]) -> int:
    """Hand the complete lines written to `path` since byte `pos` to `log`; return the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        return pos
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode("utf-8", "replace").splitlines():
        log(line)
    return pos + end
