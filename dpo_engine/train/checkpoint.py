"""Checkpoints: everything an exact resume needs, saved atomically, the newest one kept, and restored.

A checkpoint holds the trainable weights, the optimiser and schedule, the kernel's weights, the
progress (`TrainState`) and every RNG, so a resumed run reproduces the uninterrupted one; on resume
the run directory's rows and snapshots after the checkpoint's step are dropped.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dpo_engine import rundir
from dpo_engine.train.monitoring import TimeSplit
from dpo_engine.train.parts import TrainingParts, TrainState

LogFn = Callable[[str], None]


def trainable_state(parts: TrainingParts) -> dict[str, torch.Tensor]:
    """CPU copies of the policy's trainable parameters (the LoRA adapters, or every weight)."""
    model = parts.accelerator.unwrap_model(parts.model)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_reference_cache(parts: TrainingParts) -> None:
    """Merge the reference values this process computed into the workspace cache. Every process
    saves its own (each computes the pairs of its share of the batches); the cache's file lock merges them."""
    if parts.reference_cache is not None:
        parts.reference_cache.save()


def save_checkpoint(parts: TrainingParts, state: TrainState, run_dir: Path, timer: TimeSplit, log: LogFn) -> None:
    """Rank 0 writes the checkpoint; every process waits for it."""
    if parts.accelerator.is_main_process:
        with timer.timed("checkpoint"):
            write_checkpoint(parts, state, run_dir, log)
    parts.accelerator.wait_for_everyone()  # no process runs ahead of a checkpoint it might resume from


def write_checkpoint(parts: TrainingParts, state: TrainState, run_dir: Path, log: LogFn) -> None:
    """Write checkpoints/step_N through a temporary folder, then drop every older checkpoint."""
    final = rundir.checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainable_state(parts), tmp / "weights.pt")
    save_reference_cache(parts)
    torch.save(parts.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(parts.scheduler.state_dict(), tmp / "scheduler.pt")
    if parts.kernel is not None:
        torch.save(parts.kernel.state_dict(), tmp / "kernel.pt")
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        # this process's own GPU only: every rank seeds alike, and a resume may see fewer GPUs
        "cuda": torch.cuda.get_rng_state(parts.device) if parts.device.type == "cuda" else None,
    }
    torch.save(
        {
            "step": state.step,
            "micro_index": state.micro_index,
            "beta": state.beta,
            "tokens_seen": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "overflow_streak": state.overflow_streak,
            "scaler": scaler.state_dict() if (scaler := parts.accelerator.scaler) is not None else None,
            "rng": rng,
        },
        tmp / rundir.CHECKPOINT_STATE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for older in (run_dir / rundir.CHECKPOINTS).iterdir():  # keep only the newest complete checkpoint
        if older != final and older.name.startswith("step_"):
            shutil.rmtree(older, ignore_errors=True)
    log(f"checkpoint saved: {final.relative_to(run_dir)}")


def load_checkpoint(parts: TrainingParts, state: TrainState, path: Path, run_dir: Path, log: LogFn) -> None:
    """Restore weights, optimiser, schedule, kernel, progress (in place) and RNGs; truncate the run
    directory's rows and snapshots to the checkpoint's step."""
    weights = torch.load(path / "weights.pt", map_location="cpu")
    named = dict(parts.accelerator.unwrap_model(parts.model).named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model/config (unknown parameters: {missing[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            named[n].copy_(t.to(named[n].device))
    parts.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    parts.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if parts.kernel is not None and (path / "kernel.pt").is_file():
        parts.kernel.load_state_dict(torch.load(path / "kernel.pt", map_location=parts.device))
    st = torch.load(path / rundir.CHECKPOINT_STATE, weights_only=False)
    state.step, state.micro_index, state.beta = st["step"], st["micro_index"], st["beta"]
    state.tokens_seen, state.train_seconds = st["tokens_seen"], st["train_seconds"]
    state.overflow_streak = st.get("overflow_streak", 0)  # absent in checkpoints of earlier versions
    if st.get("scaler") is not None and parts.accelerator.scaler is not None:
        parts.accelerator.scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["rng"]["torch"])
    np.random.set_state(st["rng"]["numpy"])
    random.setstate(st["rng"]["python"])
    if (cuda_rng := _own_cuda_rng(st["rng"]["cuda"], parts.device)) is not None:
        torch.cuda.set_rng_state(cuda_rng, parts.device)
    step = state.step
    if parts.accelerator.is_main_process:
        rundir.truncate_jsonl_after_step(run_dir / rundir.METRICS, step)
        rundir.truncate_jsonl_after_step(run_dir / rundir.EVAL, step)
        for s in rundir.list_snapshots(run_dir):
            if s > step:
                rundir.snapshot_path(run_dir, s).unlink(missing_ok=True)
    log(f"resumed from {path.relative_to(run_dir)} (step {step}, beta {state.beta:g})")


def _own_cuda_rng(saved, device: torch.device):
    """The saved CUDA generator state for this process's GPU, or None (no GPU now, or none saved).
    Checkpoints of earlier versions hold a list with one state per visible GPU: rank 0's first."""
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, (list, tuple)):
        return saved[0] if saved else None
    return saved
