"""TrainConfig: every training setting, typed, with its default written out and a help text.

The settings are grouped (data, model, method, optimisation, monitoring) because the training form
renders one group per section; the field descriptions are that form's help texts. The resolved
config (every default filled in) is written to the run directory as config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dpo_engine.data.split import SplitBy
from dpo_engine.divergences import DivergenceConfig
from dpo_engine.kernels import KernelConfig
from dpo_engine.losses import LossConfig

LORA_DEFAULT_LR = 5e-4
FULL_FINETUNE_DEFAULT_LR = 5e-5
# model.gradient_checkpointing="auto" turns checkpointing on from this many parameters: below it the
# activations of a default batch are small beside the weights, above it they dominate a GPU's memory.
GRADIENT_CHECKPOINTING_MIN_PARAMS = 1_000_000_000
# monitoring.htsr="auto" analyses the layers in the run below this many parameters: above it the
# float64 spectra of every layer cost minutes twice per run, so an HT-SR job on the saved model does it.
HTSR_AUTO_MAX_PARAMS = 1_000_000_000


def switch_from_bool(value: Any) -> Any:
    """An auto/on/off setting from a config written before auto existed, which said true or false."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class DataConfig(_Strict):
    dataset: str = Field(..., description="Dataset id or name in the workspace, or a path to a preference file.")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of pairs held out for evaluation (seeded split)."
    )
    min_eval_pairs: int = Field(32, ge=1, description="Hold out at least this many pairs, whatever the fraction.")
    split_seed: int | None = Field(
        None,
        description="Seed of the train/eval split; empty = optimisation.seed. Fix it to compare seeds on the same "
        "held-out pairs.",
    )
    split_by: SplitBy = Field(
        "prompt",
        description="Hold out whole prompts (every pair whose normalised prompt is the same stays on one side, so "
        "no held-out prompt is trained on) or single pairs (the split of earlier versions).",
    )
    max_pairs: int | None = Field(None, ge=2, description="Use only the first N pairs of the dataset (empty = all).")
    max_length: int = Field(256, ge=8, description="Maximum tokens of prompt + response; longer responses are cut.")
    max_prompt_length: int | None = Field(
        None, ge=4, description="Maximum prompt tokens; longer prompts keep their end. Empty = half of max_length."
    )

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_prompt_length is None:
            self.max_prompt_length = max(4, self.max_length // 2)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "so that responses keep at least one token"
            )
        return self


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Policy model: smollm2-135m-instruct, tiny-random, a local Hugging Face directory, or a cached "
        "model id.",
    )
    lora: bool = Field(
        True,
        description="Train LoRA adapters (the reference is the base model with adapters off) instead of all weights.",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters (Llama-style names by default).",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Recompute activations in the backward pass: less memory, ~30% slower; auto = on for models "
        f"of {GRADIENT_CHECKPOINTING_MIN_PARAMS / 1e9:g}B parameters and more.",
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel (transformers' attn_implementation). sdpa: PyTorch's "
        "scaled_dot_product_attention, packed rows' block mask given as a dense boolean mask (every device; "
        "eager where a model has no SDPA). flex_attention: the same mask as a block-sparse BlockMask built on "
        "the GPU, so fused kernels skip masked tiles and grouped-query models keep K/V unexpanded where their "
        "query heads are a power of two (NVIDIA GPUs; compiled on first use).",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: store the frozen base weights in 4-bit NF4 (bitsandbytes, NVIDIA GPUs; LoRA only), "
        "computing in model.dtype: about a quarter of the bf16 weight memory.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute precision; auto = bf16 mixed precision on GPUs that support it, fp32 on CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped with a local model directory to run (off unless you trust it)."
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_from_bool(cls, value: Any) -> Any:
        return switch_from_bool(value)

    @property
    def needs_nvidia_gpu(self) -> bool:
        """Options that run only on an NVIDIA GPU (train.setup.require_device_support says why)."""
        return self.load_in_4bit or self.attn_implementation == "flex_attention"

    @model_validator(mode="after")
    def _known(self) -> "ModelConfig":
        from dpo_engine.models import is_known_model

        if not is_known_model(self.name):
            from dpo_engine.models import KNOWN_MODELS

            raise ValueError(
                f"unknown model {self.name!r}: use one of {', '.join(KNOWN_MODELS)}, a local Hugging Face "
                "directory, or a model id already in the local cache"
            )
        if self.load_in_4bit and not self.lora:
            raise ValueError("model.load_in_4bit needs model.lora: 4-bit base weights cannot be trained themselves")
        if self.lora and not self.lora_target_modules:
            raise ValueError("lora is on but lora_target_modules is empty; name at least one module (e.g. q_proj)")
        return self


class MethodConfig(_Strict):
    kernel: KernelConfig = Field(
        default_factory=KernelConfig, description="Kernel on representations (METHOD.md 2.3-2.4)."
    )
    divergence: DivergenceConfig = Field(
        default_factory=DivergenceConfig, description="Token-level divergence regulariser (METHOD.md 2.7)."
    )
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="Preference loss: beta, gamma, label smoothing, epsilon-DPO (METHOD.md 2.5-2.6).",
    )
    embedding_source: Literal["policy", "encoder"] = Field(
        "policy",
        description="policy: the kernel acts on the policy's hidden states (trainable); encoder: on frozen sentence "
        "embeddings.",
    )
    projection_dim: int = Field(
        256,
        ge=2,
        description="Representations are projected to min(hidden size, this) dims by a fixed random orthogonal map.",
    )
    calibration_pairs: int = Field(
        256,
        ge=2,
        description="Training pairs whose reference representations calibrate the spectral and Mahalanobis kernels.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "MethodConfig":
        if self.loss.gamma > 0 and self.kernel.name == "none":
            raise ValueError("loss.gamma > 0 needs a kernel: choose a kernel or set gamma to 0")
        return self


class OptimConfig(_Strict):
    max_steps: int | None = Field(100, ge=1, description="Optimiser steps to run (set this or epochs, not both).")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training split (used when max_steps is empty)."
    )
    batch_size: int = Field(
        4, ge=1, description="Pairs per micro-batch (per process); chosen and rejected are stacked, so 2x sequences."
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches accumulated per optimiser step (effective batch = batch_size x grad_accum x "
        "processes).",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description=f"Learning rate; empty = {LORA_DEFAULT_LR:g} with LoRA (adapters start at zero and need larger "
        f"steps), {FULL_FINETUNE_DEFAULT_LR:g} for full fine-tuning.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on model parameters.")
    warmup_ratio: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of steps with linear warm-up of the learning rate."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (global L2 norm).")
    seed: int = Field(
        0, description="Seed of the split, data order, LoRA init, dropout and the representation projection."
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Training processes on this machine (gloo on CPU, NCCL on GPUs, one GPU each); each "
        "takes its own batch_size pairs per micro-batch and the logged metrics are means over all processes.",
    )
    reference_cache: bool = Field(
        True,
        description="Keep the reference model's log-probs per pair in the workspace and skip its forward pass "
        "when they are known (objectives that need the reference's token distributions still run it).",
    )
    pack_pairs: bool = Field(
        True,
        description="Put prompt, chosen and rejected in one sequence with a block attention mask, so the shared "
        "prompt is computed once per pair instead of twice.",
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "OptimConfig":
        if self.epochs is not None and self.max_steps is not None and "max_steps" not in self.model_fields_set:
            self.max_steps = None  # epochs given explicitly: it replaces the default max_steps
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of optimisation.max_steps and optimisation.epochs")
        return self


# The automatic evaluation cadence: about this many evaluations per run, at least this many steps apart,
# and far enough apart that evaluating costs at most about EVAL_SHARE_AUTO of the training between two
# evaluations, taking a no-grad forward over a pair as FORWARD_SHARE_OF_STEP of a training step over it.
EVALS_PER_RUN_AUTO = 20
EVAL_EVERY_AUTO_MIN = 10
EVAL_SHARE_AUTO = 0.2
FORWARD_SHARE_OF_STEP = 1 / 3


class MonitoringConfig(_Strict):
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl row every N optimiser steps.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Evaluate on the held-out split every N steps (and at step 0 and the end); empty = auto: about "
        f"{EVALS_PER_RUN_AUTO} evaluations a run, at least {EVAL_EVERY_AUTO_MIN} steps apart and far enough apart "
        f"that evaluating costs at most about {EVAL_SHARE_AUTO:.0%} of the training between them (a short run "
        "evaluates at step 0 and the end only).",
    )
    snapshot_every: int | None = Field(
        None,
        ge=1,
        description="Store probe-set representations + Davies-Bouldin score every N steps (and at 0 and the end); "
        "empty = at every second evaluation. A snapshot at a step that is not an evaluation step costs one.",
    )
    eval_max_pairs: int | None = Field(
        512,
        ge=2,
        description="Evaluate on at most this many held-out pairs (a fixed seeded subset of the split, the same at "
        "every eval); empty = all of them.",
    )
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Held-out pairs per evaluation batch (and per batch of the reference's no-grad passes); "
        "empty = auto: optimisation.batch_size. Larger is faster where memory allows (the memory estimate counts "
        "it); no value depends on it.",
    )
    probe_pairs: int = Field(128, ge=2, description="Held-out pairs in the fixed probe set for snapshots.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    htsr: Literal["auto", "on", "off"] = Field(
        "auto",
        description="WeightWatcher layer analysis before and after training; auto = on for models under "
        f"{HTSR_AUTO_MAX_PARAMS / 1e9:g}B parameters (larger ones: run an HT-SR job on the saved model). With "
        "several processes both analyses run at the end, on rank 0, so no process waits on them.",
    )
    eval_divergences: bool = Field(
        True,
        description="Log all seven token divergences at every eval (the Wasserstein one costs most); off writes them "
        "as empty.",
    )
    divergence_pairs: int = Field(
        8,
        ge=1,
        description="Held-out pairs (a fixed subset) on which the seven divergence traces are computed at each eval.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list,
        description="Also send metrics.jsonl and eval.jsonl rows to these trackers (empty = none).",
    )

    @field_validator("htsr", mode="before")
    @classmethod
    def _htsr_from_bool(cls, value: Any) -> Any:
        return switch_from_bool(value)

    def eval_batch(self, train_batch_size: int) -> int:
        """Pairs per evaluation batch, the automatic value resolved: the training micro-batch, not more,
        because with gradient checkpointing a training step keeps little and a no-grad pass over more
        pairs can peak above it (docs/BENCHMARKS.md)."""
        return self.eval_batch_size or train_batch_size

    def cadence(self, total_steps: int, *, eval_pairs: int = 0, pairs_per_step: int = 1) -> tuple[int, int]:
        """(eval_every, snapshot_every) of a run of `total_steps` optimiser steps, each over `pairs_per_step`
        pairs, that evaluates `eval_pairs` pairs, the automatic ones resolved (METHOD.md 3)."""
        affordable = math.ceil(eval_pairs * FORWARD_SHARE_OF_STEP / (EVAL_SHARE_AUTO * max(1, pairs_per_step)))
        every = self.eval_every or max(EVAL_EVERY_AUTO_MIN, math.ceil(total_steps / EVALS_PER_RUN_AUTO), affordable)
        return every, self.snapshot_every or 2 * every


class TrainConfig(_Strict):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model and how it is fine-tuned.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Kernel, divergence and loss.")
    optimisation: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser, schedule, batch and seed.")
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig, description="Logging, evaluation, snapshots, checkpoints."
    )

    @model_validator(mode="after")
    def _resolve_lr(self) -> "TrainConfig":
        if self.optimisation.lr is None:
            self.optimisation.lr = LORA_DEFAULT_LR if self.model.lora else FULL_FINETUNE_DEFAULT_LR
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read JSON or YAML; `overrides` are dotted keys (e.g. {"optimisation.lr": 1e-4}) applied on top."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - PyYAML ships with the dependencies
                raise ValueError("reading YAML configs needs PyYAML") from exc
            raw = yaml.safe_load(text) or {}
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> "TrainConfig":
        data = json.loads(json.dumps(raw))
        for dotted, value in overrides.items():
            if value is None:
                continue
            set_dotted(data, dotted, value)
        return cls.model_validate(data)

    def resolved(self) -> dict[str, Any]:
        """JSON-ready dict with every default written out (what config.json holds)."""
        return self.model_dump(mode="json")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data["a"]["b"] = value for "a.b", creating intermediate mappings."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {key} is not a group of settings")
    node[keys[-1]] = value
