"""Presets: named settings of the one TrainConfig, not a second code path.

A preset is a mapping of dotted TrainConfig paths to values. It is applied to the raw settings
before validation, and anything the user gives explicitly (a form field, a CLI flag) is applied
after it, so a preset only fills in; the resolved config.json shows every value it set.

`quick` was chosen by measurement on the bundled HH sample with the bundled SmolLM2-135M-Instruct
on 2 CPU cores (the runs and their numbers: docs/BENCHMARKS.md, "The quick preset"):
- 128 tokens with 64 for the prompt, from the token pre-flight: it keeps the end of every prompt
  (its last turn) and most responses whole; the full-length suggestion costs about four times as
  much per step, too much for five minutes on a CPU;
- LoRA rank 16 (alpha 32, no dropout), learning rate 5e-4 after a 10 % warm-up, cosine decay: the
  lowest training loss of the learning rates and schedules tried;
- the mixture weights (λ, τ) get weight_lr 0.05 so a short run lets them move as far as the
  gradient asks (METHOD.md 2.4);
- 48 steps of 4 pairs; evaluation, divergence traces (4 pairs) and snapshots at steps 0, 24 and
  48 on 24 held-out pairs; 16 calibration pairs; no intermediate checkpoint; HT-SR before and after.
The method is HMK with the Hellinger divergence: Hellinger is the divergence the diagnosis
recommends for the HH sample (its recommended kernel is polynomial; the preset keeps HMK, the
mixture that lets training weigh the kernels, so the λ/τ view has something to show). The Train
form replaces both with the user's own diagnosis when there is one.
"""

from __future__ import annotations

import json
from typing import Any

QUICK_MINUTES = 5  # on 2 CPU cores (docs/BENCHMARKS.md)
QUICK_LABEL = f"Quick run (CPU, about {QUICK_MINUTES} min)"

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "model.name": "smollm2-135m-instruct",
        "model.lora": True,
        "model.lora_r": 16,
        "model.lora_alpha": 32,
        "model.lora_dropout": 0.0,
        "data.max_pairs": None,
        "data.eval_fraction": 0.06,
        "data.min_eval_pairs": 24,
        "data.max_length": 128,
        "data.max_prompt_length": 64,
        "method.kernel.name": "hmk",
        "method.kernel.weight_lr": 0.05,
        "method.divergence.name": "hellinger",
        "method.calibration_pairs": 16,
        "optimisation.max_steps": 48,
        "optimisation.epochs": None,
        "optimisation.batch_size": 4,
        "optimisation.grad_accum": 1,
        "optimisation.lr": 5e-4,
        "optimisation.warmup_ratio": 0.1,
        "optimisation.scheduler": "cosine",
        "optimisation.seed": 0,
        "monitoring.eval_every": 24,
        "monitoring.snapshot_every": 24,
        "monitoring.probe_pairs": 24,
        "monitoring.divergence_pairs": 4,
        "monitoring.checkpoint_every": 1000,
        "monitoring.htsr": "on",
        "monitoring.eval_divergences": True,
    },
}

PRESET_LABELS = {"quick": QUICK_LABEL}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_overrides(name: str) -> dict[str, Any]:
    """The dotted settings of preset `name` (a copy); a one-line error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))


def apply_preset(raw: dict[str, Any], name: str | None) -> dict[str, Any]:
    """`raw` (nested TrainConfig settings, not yet validated) with preset `name` written into it.

    Settings the caller sets afterwards win; `raw` itself is not modified.
    """
    from dpo_engine.train.config import set_dotted

    out = json.loads(json.dumps(raw))
    if name:
        for dotted, value in preset_overrides(name).items():
            set_dotted(out, dotted, value)
    return out
