"""The DPO-Kernels training run (METHOD.md 2): torch + transformers + accelerate, CPU to multi-GPU.

The trainer is three rooms, each a module read top to bottom:
- `setup` (data, models, method): device, policy and reference, tokenised split, kernel, optimiser;
- `step` (forward, objective, backward): one optimiser step and its metrics row;
- `monitoring` (eval, snapshots, HT-SR, checkpoints): everything the run directory shows besides
  the step, and exact resume.
This module only ties them together: `run()` sets up, resumes or evaluates step 0, loops over steps,
and writes summary.json whatever happens. Everything a resumed run needs to reproduce the
uninterrupted one (weights, optimiser, schedule, RNG, kernel weights, beta, data position) is
checkpointed; the run directory grows live so pages can follow it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from dpo_engine import rundir
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.monitoring import Monitoring, peak_memory_mb
from dpo_engine.train.setup import CALIBRATED_KERNELS, TrainingSetup
from dpo_engine.train.step import StepTerms, TrainingDiverged, TrainingStep, TrainState
from dpo_engine.workspace import Workspace

__all__ = [
    "CALIBRATED_KERNELS",
    "DPOTrainer",
    "StepTerms",
    "TrainingDiverged",
    "TrainingOutOfMemory",
    "peak_memory_mb",
    "train",
]

logger = logging.getLogger("dpo_engine.train")

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]
LogFn = Callable[[str], None]


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which settings reduce it."""


OOM_ADVICE = (
    "out of memory: reduce optimisation.batch_size or data.max_length, raise optimisation.grad_accum to keep "
    "the effective batch, keep model.lora on, or turn on model.gradient_checkpointing"
)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class DPOTrainer(TrainingSetup, TrainingStep, Monitoring):
    """Set up once from a TrainConfig, then `run()`; writes everything into `run_dir`."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        workspace: Workspace,
        pairs: pd.DataFrame | None = None,
        device: str | None = None,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        log: LogFn | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = workspace
        self._pairs = pairs
        self._device_request = device
        self._progress = progress or (lambda f, m: None)
        self._should_stop = should_stop or (lambda: False)
        self._log_fn = log
        self._progress_bar = progress_bar
        self.state = TrainState(beta=config.method.loss.beta)
        self.time_split: dict[str, float] = {}  # seconds outside the step, by activity (summary.json)
        # eval chunk index -> the reference's token hidden states there (monitoring)
        self.divergence_reference: dict = {}

    @contextlib.contextmanager
    def timed(self, activity: str):
        """Add the wall time of the block to time_split[activity] (nested blocks count once, in the inner one)."""
        t0 = time.perf_counter()
        outer = getattr(self, "_timing_outer", None)
        self._timing_outer = activity
        try:
            yield
        finally:
            self._timing_outer = outer
            elapsed = time.perf_counter() - t0
            self.time_split[activity] = self.time_split.get(activity, 0.0) + elapsed
            if outer is not None:
                self.time_split[outer] = self.time_split.get(outer, 0.0) - elapsed

    def log(self, message: str) -> None:
        if self._log_fn is not None:
            self._log_fn(message)
        else:
            logger.info(message)

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        summary: dict[str, Any] = {"status": "running", "error": None}
        self.htsr_before = None
        try:
            with self.timed("setup"):
                self.setup()
            ckpt = rundir.latest_checkpoint(self.run_dir)
            if ckpt is not None:
                self._load_checkpoint(ckpt)
            else:
                if self.accelerator.is_main_process:
                    for stale in (rundir.METRICS, rundir.EVAL):
                        (self.run_dir / stale).unlink(missing_ok=True)
                torch.manual_seed(self.config.optimisation.seed)
                self._monitor()
            status = self._loop()
            summary["status"] = status
            if status == "succeeded":
                self._monitor(final=True)
                self._finish()
        except TrainingDiverged as exc:
            summary.update(status="failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised below
            if _is_oom(exc):
                summary.update(status="failed", error=f"{OOM_ADVICE} ({type(exc).__name__}: {exc})"[:2000])
            else:
                summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                self._write_summary(summary, t_start)
                raise
        finally:
            if hasattr(self, "accelerator"):
                self._save_reference_cache()
            self._close_trackers()
        self._write_summary(summary, t_start)
        return summary

    def _loop(self) -> str:
        mon = self.config.monitoring
        bar = None
        if self._progress_bar and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step")
        try:
            while self.state.step < self.total_steps:
                if self._should_stop():
                    self.log(f"cancelled at step {self.state.step}")
                    return "cancelled"
                row = self._train_step()
                step = self.state.step
                if self.accelerator.is_main_process and (step % mon.log_every == 0 or step == self.total_steps):
                    rundir.append_jsonl(self.run_dir / rundir.METRICS, row)
                    self._track(row, step, "train")
                message = f"step {step}/{self.total_steps} loss {row['loss']:.4f} acc {row['reward_acc']:.2f}"
                self._progress(step / self.total_steps, message)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}")
                if step < self.total_steps:
                    self._monitor()
                if step % mon.checkpoint_every == 0 or step == self.total_steps:
                    self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return "succeeded"


def train(config: TrainConfig, run_dir: str | Path, *, workspace: Workspace, **kwargs: Any) -> dict[str, Any]:
    """Train (or resume) into run_dir and return summary.json's content."""
    return DPOTrainer(config, run_dir, workspace=workspace, **kwargs).run()
