"""The DPO-Kernels training run (METHOD.md 2): torch + transformers + accelerate, CPU to multi-GPU.

`DPOTrainer` composes the pieces, each a module read top to bottom:
- `setup.build_parts` builds the `parts.TrainingParts` (device, models, data split, kernel, optimiser);
- `step.TrainingStep` computes the objective on a batch and takes one optimiser step, with the passes
  and the reference's source from `passes`;
- `evaluation.Evaluator` writes the held-out rows and snapshots;
- `checkpoint` saves and restores everything an exact resume needs;
- `monitoring` holds the time split, trackers, HT-SR, the saved model and summary.json.
This module only ties them together: `run()` sets up, resumes or evaluates step 0, loops over steps,
and writes summary.json whatever happens. The run directory grows live so pages can follow it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from accelerate import Accelerator

from dpo_engine import rundir
from dpo_engine.train.checkpoint import load_checkpoint, save_checkpoint, save_reference_cache
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.evaluation import Evaluator
from dpo_engine.train.monitoring import TimeSplit, Trackers, peak_memory_mb, save_model, write_summary
from dpo_engine.train.parts import TrainingParts, TrainState
from dpo_engine.train.passes import ModelPasses, ReferenceSource
from dpo_engine.train.setup import CALIBRATED_KERNELS, build_parts, make_accelerator
from dpo_engine.train.step import StepTerms, TrainingDiverged, TrainingStep
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


class DPOTrainer:
    """Set up once from a TrainConfig, then `run()`; writes everything into `run_dir`.

    After `setup()`: `parts` (what setup built), `passes` (model passes), `step` (the objective and
    one optimiser step), `evaluator` (held-out rows and snapshots); `state` is the progress."""

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
        self.timer = TimeSplit()
        self.trackers = Trackers(config, self.run_dir)
        self.accelerator: Accelerator | None = None  # set first in setup(), so a failed setup still knows its rank
        self.parts: TrainingParts | None = None
        self.passes: ModelPasses | None = None
        self.step: TrainingStep | None = None
        self.evaluator: Evaluator | None = None
        self.htsr_before: float | None = None
        self.htsr_after: float | None = None

    def log(self, message: str) -> None:
        if self._log_fn is not None:
            self._log_fn(message)
        else:
            logger.info(message)

    def setup(self) -> None:
        """Build the parts, then the passes, the step and the evaluator over them."""
        self.accelerator, compute_dtype = make_accelerator(self.config, self._device_request)
        parts = build_parts(
            self.config,
            self.run_dir,
            self.workspace,
            self.accelerator,
            compute_dtype,
            pairs=self._pairs,
            timer=self.timer,
            log=self.log,
        )
        self.parts = parts
        self.htsr_before = parts.htsr_before
        self.passes = ModelPasses.from_parts(parts)
        self.step = TrainingStep(self.config, parts, self.state, self.passes, ReferenceSource(self.passes))
        self.evaluator = Evaluator(self.config, parts, self.state, self.step, self.run_dir)
        eval_every, snapshot_every = self.cadence()
        total = parts.total_steps
        self.log(
            f"evaluating {len(parts.eval_pairs)} held-out pairs "
            + (f"at step 0, every {eval_every} steps and at the end" if eval_every < total else "at step 0 and the end")
            + (
                f"; snapshots every {snapshot_every} steps"
                if snapshot_every < total
                else "; snapshots at step 0 and the end"
            )
        )

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        summary: dict[str, Any] = {"status": "running", "error": None}
        self.htsr_before = None
        try:
            with self.timer.timed("setup"):
                self.setup()
            ckpt = rundir.latest_checkpoint(self.run_dir)
            if ckpt is not None:
                load_checkpoint(self.parts, self.state, ckpt, self.run_dir, self.log)
            else:
                if self.parts.accelerator.is_main_process:
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
            if self.parts is not None:
                save_reference_cache(self.parts)
            self.trackers.close()
        self._write_summary(summary, t_start)
        return summary

    def _loop(self) -> str:
        mon, parts = self.config.monitoring, self.parts
        total = parts.total_steps
        bar = None
        if self._progress_bar and parts.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.state.step, desc="train", unit="step")
        try:
            while self.state.step < total:
                if self._should_stop():
                    self.log(f"cancelled at step {self.state.step}")
                    return "cancelled"
                row = self.step.run()
                step = self.state.step
                if parts.accelerator.is_main_process and (step % mon.log_every == 0 or step == total):
                    rundir.append_jsonl(self.run_dir / rundir.METRICS, row)
                    self.trackers.log(row, step, "train")
                message = f"step {step}/{total} loss {row['loss']:.4f} acc {row['reward_acc']:.2f}"
                self._progress(step / total, message)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}")
                if step < total:
                    self._monitor()
                if step % mon.checkpoint_every == 0 or step == total:
                    save_checkpoint(parts, self.state, self.run_dir, self.timer, self.log)
        finally:
            if bar is not None:
                bar.close()
        return "succeeded"

    def cadence(self) -> tuple[int, int]:
        """(eval_every, snapshot_every) of this run, the automatic ones resolved."""
        opt, parts = self.config.optimisation, self.parts
        return self.config.monitoring.cadence(
            parts.total_steps,
            eval_pairs=len(parts.eval_pairs),
            pairs_per_step=opt.batch_size * opt.grad_accum * parts.accelerator.num_processes,
        )

    def _monitor(self, final: bool = False) -> None:
        """Evaluate (and snapshot) when the cadence says so; append the eval row."""
        step = self.state.step
        eval_every, snapshot_every = self.cadence()
        do_eval = final or step == 0 or step % eval_every == 0
        do_snap = final or step == 0 or step % snapshot_every == 0
        if not (do_eval or do_snap):
            return
        if (
            final
            and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1:]
            and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1].get("step") == step
        ):
            return  # the last step already coincided with an eval
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": step}
        with self.timer.timed("eval"):
            row.update(self.evaluator.evaluate(snapshot=do_snap))
        if self.parts.accelerator.is_main_process:
            rundir.append_jsonl(self.run_dir / rundir.EVAL, row)
            self.trackers.log(row, step, "eval")
        save_reference_cache(self.parts)
        cache = self.parts.reference_cache
        self.log(
            f"eval step {step}: loss_pref {row['loss_pref']:.4f} reward_acc {row['reward_acc']:.3f}"
            + (
                " (the policy is still the reference: every margin ties, and a tie counts as wrong)"
                if self.step.reference.policy_is_reference(step)
                else ""
            )
            + (f" dbs {row['dbs']:.3f}" if "dbs" in row else "")
            + (
                f" ({time.perf_counter() - t0:.1f}s; reference cache {cache.count()} pairs)"
                if cache is not None
                else ""
            )
        )

    def _finish(self) -> None:
        if not self.parts.accelerator.is_main_process:
            return
        with self.timer.timed("save_model"):
            before, self.htsr_after = save_model(
                self.config, self.parts, self.run_dir, self.workspace, self.timer, self.log
            )
            self.htsr_before = before if before is not None else self.htsr_before

    def _write_summary(self, summary: dict[str, Any], t_start: float) -> None:
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        write_summary(
            summary,
            run_dir=self.run_dir,
            state=self.state,
            parts=self.parts,
            htsr_before=self.htsr_before,
            htsr_after=self.htsr_after,
            timer=self.timer,
            t_start=t_start,
            log=self.log,
        )


def train(config: TrainConfig, run_dir: str | Path, *, workspace: Workspace, **kwargs: Any) -> dict[str, Any]:
    """Train (or resume) into run_dir and return summary.json's content."""
    return DPOTrainer(config, run_dir, workspace=workspace, **kwargs).run()
