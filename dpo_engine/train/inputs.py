"""Input checks every way of starting a training run makes before anything is written or queued.

The CLI and the Train form both call `check_inputs`, so a dataset that cannot be trained on or a
local model directory without a model is refused with one line, not discovered by a failed job.
"""

from __future__ import annotations

from pathlib import Path


def check_inputs(cfg, ws) -> None:
    """Refuse a run whose dataset or local model cannot be used.

    Raises the data layer's errors (DatasetNotFound, ValueError for unusable pairs) or
    UnknownModelError for a directory that holds no model; the callers show the message.
    """
    from dpo_engine.data import open_dataset
    from dpo_engine.models.loading import model_directory
    from dpo_engine.train.data import check_pairs

    check_pairs(open_dataset(ws, cfg.data.dataset).table)
    if Path(cfg.model.name).expanduser().is_dir():
        model_directory(cfg.model.name, workspace=ws)  # raises UnknownModelError without config.json


class WillNotFit(ValueError):
    """The predicted peak memory of a run exceeds what its device has; the message says what to change."""


def memory_estimate(cfg, ws, device: str, *, free: bool = False):
    """The predicted peak memory of `cfg` on `device` (dpo_engine/train/memory.py), nothing loaded;
    against the GPU memory free now with `free` (memory.device_memory), else its total."""
    from dpo_engine.logit_chunks import head_chunk_rows
    from dpo_engine.models.loading import model_directory, resolve_dtype
    from dpo_engine.train.memory import device_memory, estimate_peak, model_shape
    from dpo_engine.train.setup import use_gradient_checkpointing

    shape = model_shape(
        model_directory(cfg.model.name, workspace=ws), cfg.model.lora_target_modules, cfg.model.trust_remote_code
    )
    compute = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    div = cfg.method.divergence
    regularised = div.name != "none" and div.alpha > 0
    estimate = estimate_peak(
        shape,
        lora=cfg.model.lora,
        lora_r=cfg.model.lora_r,
        compute_dtype=compute,
        batch_size=cfg.optimisation.batch_size,
        max_length=cfg.data.max_length,
        gradient_checkpointing=use_gradient_checkpointing(cfg.model.gradient_checkpointing, shape.n_params),
        device=device,
        available=device_memory(device, free=free),
        head_chunk_rows=head_chunk_rows(shape.hidden),
        load_in_4bit=cfg.model.load_in_4bit,
        eval_batch_size=cfg.monitoring.eval_batch(cfg.optimisation.batch_size),
        divergence_chunk_rows=(div.chunk_positions or head_chunk_rows(shape.hidden)) if regularised else None,
    )
    estimate.free = free and device.startswith("cuda")
    return estimate


def check_memory(cfg, ws, device: str, *, free: bool = False):
    """The estimate, or WillNotFit when the run is predicted not to fit on `device` (ValueError when
    its options cannot run there at all, e.g. 4-bit weights or flex_attention without an NVIDIA GPU); `free` as in
    `memory_estimate`."""
    from dpo_engine.train.setup import require_device_support

    require_device_support(cfg.model, device)
    estimate = memory_estimate(cfg, ws, device, free=free)
    if not estimate.fits:
        raise WillNotFit(f"this run will not fit: {estimate.summary()}; to fit, " + "; or ".join(estimate.advice))
    return estimate
