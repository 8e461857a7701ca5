"""The typed state of a training run: every object setup builds and the step, evaluation and checkpoints use.

`TrainingParts` holds what is built once (device, models, data split, method, optimiser) and never
reassigned afterwards; `TrainState` holds the progress that moves every step and that a checkpoint
restores. Both are plain dataclasses so each reader names what it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.kernels import KernelCalibration, KernelModule
from dpo_engine.train.reference import ReferenceCache

EncoderReps = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class TrainingParts:
    """Everything `setup.build_parts` builds, in the order it builds it."""

    accelerator: Accelerator  # device placement, mixed precision, DDP wrapping and cross-process reductions
    device: torch.device  # where the models, projection and kernel live
    compute_dtype: torch.dtype  # the precision the passes run in (LoRA's frozen base is stored in it too)
    tokenizer: Any  # the policy's tokenizer (pad id for batches; saved beside the model)
    model: torch.nn.Module  # the policy, LoRA-wrapped or full, as prepared by the accelerator
    ref_model: torch.nn.Module | None  # frozen copy for full fine-tuning; None with LoRA (adapters off = reference)
    hidden_size: int  # the policy's hidden size (the projection's input without an encoder)
    reference_cache: ReferenceCache | None  # workspace cache of reference log-probs and pooled states, if on
    htsr_before: float | None  # weighted alpha of the untrained model; None when not analysed (or resuming)
    base_model_key: str  # hash of the untrained weights and compute dtype (reference and HT-SR caches)
    htsr_plan: str  # when the layers are analysed: in the run, at its end, or not (monitoring.htsr_plan)
    pairs: pd.DataFrame  # the checked pairs this run uses (after max_pairs)
    train_pairs: Sequence[TokenizedPair]  # the training split, pairs made from the token arrays when read (ArrayPairs)
    eval_pairs: list[TokenizedPair]  # tokenised held-out split
    probe_pairs: list[TokenizedPair]  # the first eval pairs, whose representations snapshots store
    batches_per_epoch: int  # micro-batches per epoch over all processes' shards
    total_steps: int  # optimiser steps in the run
    pack_pairs: bool  # packed rows (optimisation.pack_pairs, unless the model's attention window forbids them)
    encoder_reps: EncoderReps | None  # pair id -> encoder embeddings of (prompt, chosen, rejected), if used
    projection: torch.Tensor  # (dim_in × k) random orthogonal projection of representations
    calibration: KernelCalibration | None  # scales fitted on reference representations (calibrated kernels)
    kernel: KernelModule | None  # the embedding kernel; None for kernel "none"
    kernel_params: list[torch.nn.Parameter]  # the kernel's mixture weights (their own optimiser group)
    optimizer: torch.optim.Optimizer  # AdamW over the trainable model parameters and the mixture weights
    scheduler: Any  # transformers learning-rate schedule stepped once per optimiser step


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore."""

    step: int = 0
    micro_index: int = 0
    beta: float = 0.1
    tokens_seen: int = 0
    train_seconds: float = 0.0
    overflow_streak: int = 0  # fp16: consecutive steps whose gradients overflowed (the scaler skipped them)
