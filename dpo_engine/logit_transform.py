"""What a model does to its LM head's output W h before the softmax (METHOD.md 2.1).

Most models use W h as it is. Gemma caps it softly (c tanh(z / c), `final_logit_softcapping`),
Cohere multiplies it (`logit_scale`) and Granite divides it (`logits_scaling`). The trainer forms
logits itself, a chunk of response tokens at a time (lm_head.py, divergences.py), so it applies the
same step, and its slope where gradients pass back through it; setup checks once that the result
equals the model's own logits (train/setup.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to z = W h before its softmax: multiply by `scale`, then, with `softcap` c,
    c tanh(z / c). The identity for most models."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap

    def apply(self, z: Tensor) -> Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def slope(self, final: Tensor) -> Tensor | float:
        """d(final logits)/dz, from the final logits themselves (tanh' = 1 - tanh²)."""
        if not self.softcap:
            return self.scale
        return (1.0 - (final / self.softcap).square()) * self.scale


IDENTITY = LogitTransform()


def _number(value) -> float | None:
    """A config value that is a number, else None (e.g. MPT's "inv_sqrt_d_model" names a rule)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value else None


def logit_transform(config) -> LogitTransform:
    """The model's step between W h and the softmax, from its (text) config: Gemma's
    `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling` (a divisor). A
    model that does something else is caught by the trainer's logits check (train/passes.py)."""
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        text = config
    scale = _number(getattr(text, "logit_scale", None)) or 1.0
    divisor = _number(getattr(text, "logits_scaling", None))
    if divisor:
        scale /= divisor
    return LogitTransform(scale, _number(getattr(text, "final_logit_softcapping", None)))
