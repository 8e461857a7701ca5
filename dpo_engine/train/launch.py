"""Multi-process training: the same `train()` on N processes under `torch.distributed.run`.

`launch_training` starts `python -m torch.distributed.run --nproc_per_node N -m dpo_engine.train.launch`
(gloo on CPU, NCCL on GPUs; accelerate's Accelerator reads the rank and world size that the launcher
sets), waits, lets the caller cancel, and returns summary.json. Each process draws its own share of
every step's batch (global batch = batch_size x processes), metrics are averaged over processes, and
only rank 0 writes the run directory (METHOD.md 2.8). Run as a module, this file is the entry each
process runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dpo_engine import rundir

LAUNCH_CONFIG = "launch_config.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report_step_progress(
    run_dir: Path, total: int | None, progress: Callable[[float, str], None] | None, workers: str
) -> None:
    """Pass the last step the workers logged to metrics.jsonl on to `progress` (nothing without a step count)."""
    if progress is None or not total:
        return
    rows = rundir.read_jsonl(run_dir / rundir.METRICS)
    if rows:
        progress(min(rows[-1]["step"] / total, 0.99), f"step {rows[-1]['step']}/{total} ({workers})")


def launch_command(run_dir: Path, workspace_root: Path, processes: int, device: str | None) -> list[str]:
    """The launcher command line (one node, `processes` workers on this machine)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dpo_engine.train.launch",
        str(run_dir),
        str(workspace_root),
    ]
    if device is not None:
        cmd += ["--device", device]
    return cmd


def launch_training(
    config,
    run_dir: str | Path,
    *,
    workspace,
    device: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Run `train()` on config.optimisation.processes processes into run_dir; return summary.json's content."""
    import torch

    run_dir = Path(run_dir)
    processes = config.optimisation.processes
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if not str(device).startswith("cpu") and processes > torch.cuda.device_count():
        raise ValueError(
            f"optimisation.processes is {processes} but {torch.cuda.device_count()} GPU(s) are visible; "
            "use at most one process per GPU, or train on the CPU"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LAUNCH_CONFIG).write_text(config.model_dump_json(), encoding="utf-8")
    env = dict(os.environ)
    if device is not None and str(device).startswith("cpu"):
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    log = log or (lambda line: print(line, flush=True))
    proc = subprocess.Popen(
        launch_command(run_dir, workspace.root, processes, device),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cancelled = False
    try:
        import threading

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        total = config.optimisation.max_steps
        while proc.poll() is None:
            if should_stop is not None and should_stop():
                cancelled = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            report_step_progress(run_dir, total, progress, f"{processes} processes")
            time.sleep(0.5)
        proc.wait()
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summary = rundir.read_summary(run_dir) or {}
    if cancelled:
        summary.update(status="cancelled", error=summary.get("error"))
    elif proc.returncode != 0 and summary.get("status") in (None, "running", "succeeded"):
        summary.update(
            status="failed", error=summary.get("error") or f"training processes exited with code {proc.returncode}"
        )
    return summary


def _main(argv: list[str]) -> int:
    import argparse

    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import train
    from dpo_engine.workspace import Workspace

    parser = argparse.ArgumentParser(description="one process of a multi-process training run")
    parser.add_argument("run_dir")
    parser.add_argument("workspace")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    config = TrainConfig.model_validate(json.loads((run_dir / LAUNCH_CONFIG).read_text(encoding="utf-8")))
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)  # the launcher keeps the log
    device = "cpu" if args.device is not None and args.device.startswith("cpu") else None
    summary = train(config, run_dir, workspace=Workspace(Path(args.workspace)), device=device, log=log)
    return 0 if summary.get("status") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
