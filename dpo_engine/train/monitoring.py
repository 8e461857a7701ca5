"""What the run directory shows besides the step and evaluation: time split, trackers, HT-SR, model, summary.

Read top to bottom: `TimeSplit` adds up wall time outside the step by activity, `Trackers` forwards
rows to the trackers the config names, the HT-SR functions write the WeightWatcher tables (reusing
the untrained model's table and the unchanged layers' rows where the weights are the same),
`save_model` writes the trained model at the end, and `write_summary` writes summary.json whatever
happened.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from dpo_engine import rundir
from dpo_engine.analysis.htsr import analyze_model, weighted_alpha
from dpo_engine.analysis.htsr_update import lora_deltas, summarize_update, update_table, weight_deltas
from dpo_engine.train.config import HTSR_AUTO_MAX_PARAMS, TrainConfig
from dpo_engine.train.parts import TrainingParts, TrainState
from dpo_engine.train.reference import CACHE_DIR
from dpo_engine.workspace import Workspace

LogFn = Callable[[str], None]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TimeSplit:
    """Seconds spent outside the step, by activity (summary.json's time_split_s)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._outer: str | None = None

    @contextlib.contextmanager
    def timed(self, activity: str):
        """Add the wall time of the block to seconds[activity] (nested blocks count once, in the inner one)."""
        t0 = time.perf_counter()
        outer = self._outer
        self._outer = activity
        try:
            yield
        finally:
            self._outer = outer
            elapsed = time.perf_counter() - t0
            self.seconds[activity] = self.seconds.get(activity, 0.0) + elapsed
            if outer is not None:
                self.seconds[outer] = self.seconds.get(outer, 0.0) - elapsed


# ------------------------------------------------------------------ trackers
class Trackers:
    """Forwards metrics/eval rows to the trackers named in monitoring.report_to (none by default),
    opened at the first row so a run without them imports no tracker package."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self._open = None

    def log(self, row: dict[str, Any], step: int, split: str) -> None:
        report_to = self.config.monitoring.report_to
        if not report_to:
            return
        if self._open is None:
            from dpo_engine.tracking import open_trackers  # imported only when a tracker is named

            self._open = open_trackers(list(report_to), self.run_dir, self.run_dir.name, self.config.resolved())
        self._open.log(row, step=step, split=split)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


# ------------------------------------------------------------------ HT-SR
HTSR_IN_RUN, HTSR_AT_END, HTSR_SKIPPED = "in_run", "at_end", "skipped"


def htsr_plan(setting: str, n_params: int, processes: int, four_bit: bool = False) -> tuple[str, str]:
    """When the run analyses its layers, and why: before training and after it (`in_run`), both after
    training on rank 0 once no process waits on another (`at_end`, several processes), or not at all.
    4-bit weights are stored packed, two to a byte: no matrix WeightWatcher could read."""
    if setting == "off":
        return HTSR_SKIPPED, "HT-SR off (monitoring.htsr)"
    if four_bit:
        return HTSR_SKIPPED, (
            "HT-SR skipped: 4-bit weights (model.load_in_4bit) are stored packed; "
            "an HT-SR job on the saved model reads them unpacked"
        )
    if setting == "auto" and n_params >= HTSR_AUTO_MAX_PARAMS:
        return HTSR_SKIPPED, (
            f"HT-SR skipped: {n_params / 1e9:.2f}B parameters, at or above the {HTSR_AUTO_MAX_PARAMS / 1e9:g}B "
            "where monitoring.htsr auto leaves it to an HT-SR job on the saved model (or set it to on)"
        )
    if processes > 1:
        return HTSR_AT_END, "HT-SR before and after training both run at the end, on rank 0"
    return HTSR_IN_RUN, ""


def htsr_device(accelerator: Accelerator) -> str | None:
    """Where the layer spectra are computed: the run's GPU when it has one, else numpy on the CPU."""
    return str(accelerator.device) if accelerator.device.type == "cuda" else None


def htsr(
    model,
    filename: str,
    label: str,
    *,
    run_dir: Path,
    accelerator: Accelerator,
    timer: TimeSplit,
    log: LogFn,
    known=None,
) -> float | None:
    """Write the model's WeightWatcher table to run_dir/filename (rank 0); return its weighted alpha."""
    if not accelerator.is_main_process:
        return None
    t0 = time.perf_counter()
    with timer.timed("htsr"):
        table = analyze_model(model, known=known, device=htsr_device(accelerator))
    table.to_csv(run_dir / filename, index=False)
    wa = weighted_alpha(table)
    reused = f", {len(known)} unchanged layers' rows reused" if known is not None and len(known) else ""
    log(f"HT-SR {label}: {len(table)} layers, weighted alpha {wa:.4f} ({time.perf_counter() - t0:.1f}s{reused})")
    return wa


def htsr_before(
    model,
    key: str,
    *,
    workspace: Workspace,
    run_dir: Path,
    accelerator: Accelerator,
    timer: TimeSplit,
    log: LogFn,
) -> float | None:
    """HT-SR of the untrained model, reused from the workspace when this exact model was analysed before."""
    cached = workspace.root / CACHE_DIR / f"{key}.{rundir.HTSR_BEFORE}"
    if cached.is_file() and accelerator.is_main_process:
        shutil.copyfile(cached, run_dir / rundir.HTSR_BEFORE)
        wa = weighted_alpha(rundir.read_htsr(run_dir, "before"))
        log(f"HT-SR before: weighted alpha {wa:.4f} (same model analysed before)")
        return wa
    wa = htsr(model, rundir.HTSR_BEFORE, "before", run_dir=run_dir, accelerator=accelerator, timer=timer, log=log)
    if accelerator.is_main_process:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        shutil.copyfile(run_dir / rundir.HTSR_BEFORE, tmp)
        os.replace(tmp, cached)
    return wa


def htsr_unchanged_layers(model, run_dir: Path, accelerator: Accelerator):
    """Rows of the "before" table for layers with no trainable parameter in the LoRA model (neither
    adapters nor saved copies: their weights are the base model's); the HT-SR "after" reuses them
    instead of repeating their SVDs."""
    before = rundir.read_htsr(run_dir, "before") if accelerator.is_main_process else None
    if before is None or "longname" not in before or "layer_id" not in before:
        return None
    modules = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()}
    # What training or the merge writes: trainable parameters, and the base weights of LoRA layers
    # (by storage, so a head tied to the embedding counts for both).
    touched = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    for module in modules.values():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            touched.update(p.data_ptr() for p in module.base_layer.parameters())
    frozen = {
        name
        for name, module in modules.items()
        if not any(p.requires_grad or p.data_ptr() in touched for p in module.parameters())
    }
    return before[before["longname"].isin(frozen) & (before["layer_id"] > 0)]


# ------------------------------------------------------------------ end of run
def save_model(
    config: TrainConfig, parts: TrainingParts, run_dir: Path, workspace: Workspace, timer: TimeSplit, log: LogFn
) -> tuple[float | None, float | None]:
    """Save the trained model (the LoRA adapter or the full model) and its tokenizer (rank 0); when
    the run analyses its layers, write the "after" table (and the "before" one when it was left to
    the end) and return both weighted alphas (None where not analysed here)."""
    model = parts.accelerator.unwrap_model(parts.model)
    out_dir = run_dir / rundir.MODEL
    model.save_pretrained(out_dir)
    parts.tokenizer.save_pretrained(out_dir)
    log(f"model saved: {out_dir.relative_to(run_dir)} ({'LoRA adapter' if config.model.lora else 'full model'})")
    if parts.htsr_plan == HTSR_SKIPPED:
        return None, None
    before = None
    if parts.htsr_plan == HTSR_AT_END and not (run_dir / rundir.HTSR_BEFORE).is_file():
        before = untrained_htsr(config, parts, run_dir, workspace, timer, log)
    return before, htsr_after(config, parts, model, run_dir, timer, log, workspace=workspace)


def untrained_htsr(
    config: TrainConfig, parts: TrainingParts, run_dir: Path, workspace: Workspace, timer: TimeSplit, log: LogFn
) -> float | None:
    """The "before" analysis at the end of a run: from the workspace when this model was analysed
    before, else of a fresh copy of the untrained weights loaded onto the CPU."""
    cached = workspace.root / CACHE_DIR / f"{parts.base_model_key}.{rundir.HTSR_BEFORE}"
    base = None if cached.is_file() else untrained_weights(config, workspace, torch.float32)
    return htsr_before(
        base,
        parts.base_model_key,
        workspace=workspace,
        run_dir=run_dir,
        accelerator=parts.accelerator,
        timer=timer,
        log=log,
    )


def htsr_after(
    config: TrainConfig,
    parts: TrainingParts,
    model,
    run_dir: Path,
    timer: TimeSplit,
    log: LogFn,
    *,
    workspace: Workspace,
):
    """The "after" table of the trained model (LoRA merged), reusing the rows of layers training left
    alone, and the table of the update ΔW (read before the merge)."""
    lora = config.model.lora
    known = htsr_unchanged_layers(model, run_dir, parts.accelerator) if lora else None
    htsr_of_update(config, parts, model, run_dir, timer, log, workspace=workspace)
    merged = model.merge_and_unload() if lora else model
    return htsr(
        merged,
        rundir.HTSR_AFTER,
        "after",
        run_dir=run_dir,
        accelerator=parts.accelerator,
        timer=timer,
        log=log,
        known=known,
    )


def weights_before(config: TrainConfig, parts: TrainingParts, model, workspace: Workspace):
    """A model holding the weights before training, for a full fine-tune's ΔW: the frozen reference
    when it is stored in the trained weights' dtype, else the untrained weights loaded afresh onto
    the CPU (a reference in a lower precision would put its rounding into ΔW)."""
    dtype = next(model.parameters()).dtype
    ref = parts.ref_model
    if ref is not None and next(ref.parameters()).dtype == dtype:
        return ref
    return untrained_weights(config, workspace, dtype)


def untrained_weights(config: TrainConfig, workspace: Workspace, dtype: torch.dtype):
    """A fresh copy of the model before training, on the CPU in `dtype` (the end-of-run analyses)."""
    from dpo_engine.models import load_policy

    model, _ = load_policy(
        config.model.name,
        workspace=workspace,
        dtype=dtype,
        device="cpu",
        trust_remote_code=config.model.trust_remote_code,
    )
    return model


def htsr_of_update(
    config: TrainConfig,
    parts: TrainingParts,
    model,
    run_dir: Path,
    timer: TimeSplit,
    log: LogFn,
    *,
    workspace: Workspace,
) -> None:
    """Write the HT-SR table of ΔW (rank 0): LoRA's (lora_alpha / r) B A, or W_after − W_before."""
    if not parts.accelerator.is_main_process:
        return
    with timer.timed("htsr"):
        before = rundir.read_htsr(run_dir, "before")
        if config.model.lora:
            deltas = lora_deltas(model)
            table = update_table(deltas, source="lora", base=before, missing_reason="no LoRA adapter: frozen")
        else:
            deltas = weight_deltas(model, weights_before(config, parts, model, workspace))
            table = update_table(deltas, source="full", base=before, missing_reason="not a linear or embedding layer")
    table.to_csv(run_dir / rundir.HTSR_UPDATE, index=False)
    log(summarize_update(table))


def write_summary(
    summary: dict[str, Any],
    *,
    run_dir: Path,
    state: TrainState,
    parts: TrainingParts | None,
    htsr_before: float | None,
    htsr_after: float | None,
    timer: TimeSplit,
    t_start: float,
    log: LogFn,
) -> None:
    """Complete summary.json's content from the run directory and the state, and write it."""
    metrics = rundir.read_jsonl(run_dir / rundir.METRICS)
    evals = rundir.read_jsonl(run_dir / rundir.EVAL)
    device = parts.device if parts is not None else torch.device("cpu")
    before = htsr_before
    if before is None:
        prev = rundir.read_htsr(run_dir, "before")
        if prev is not None:
            before = weighted_alpha(prev)
    summary.update(
        steps_completed=state.step,
        total_steps=parts.total_steps if parts is not None else None,
        n_train_pairs=len(parts.train_pairs) if parts is not None else None,
        n_eval_pairs=len(parts.eval_pairs) if parts is not None else None,
        n_probe_pairs=len(parts.probe_pairs) if parts is not None else None,
        final_metrics=metrics[-1] if metrics else None,
        final_eval=evals[-1] if evals else None,
        wall_time_s=time.perf_counter() - t_start,
        train_time_s=state.train_seconds,
        tokens_per_s=state.tokens_seen / state.train_seconds if state.train_seconds else None,
        peak_memory_mb=peak_memory_mb(device),
        # what the caching allocator held at most (allocated + cached blocks): what other jobs could not use
        peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        device=str(device),
        weighted_alpha_before=before,
        weighted_alpha_after=htsr_after,
        final_beta=state.beta,
        time_split_s={**{k: round(v, 3) for k, v in timer.seconds.items()}, "train": state.train_seconds},
    )
    if summary.get("error"):
        log(f"error: {summary['error']}")
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
