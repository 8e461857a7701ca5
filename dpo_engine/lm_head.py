"""The LM head on response tokens, a few rows at a time (METHOD.md 2.1).

The logits of a batch's response tokens (N × V, V ≈ 49k for SmolLM2) are the largest tensors
of a DPO step: a plain `log_softmax`/`logsumexp` keeps them for backward, and backward adds a
gradient and a softmax of the same size. Here the trainer keeps the final hidden states at the
response tokens instead (N × H, H ≈ 576) and forms logits `chunk_rows` rows at a time:

- `head_token_logps`: log π(y_n | ctx_n) = z_n[y_n] - logsumexp(z_n), z_n = W h_n. Its gradient
  with respect to h_n is g_n (W[y_n] - softmax(z_n)ᵀ W), and the bracket does not depend on the
  upstream g_n, so it is formed in the forward pass (N × H) and backward is one scaling: the same
  two head-sized matrix products as the plain path, without an N × V tensor surviving the
  forward. A trainable head (full fine-tuning) also needs dL/dW = Σ_n g_n (e_{y_n} - p_n) h_nᵀ;
  backward recomputes the chunk's logits for it.
- `head_logits`: the logits themselves, for callers that need whole distributions of a few rows.
- `perturbed_token_logps`: ε-DPO's log-probs under (1 + t) z - t z_ref, chunk by chunk, no gradient.

Some models do more to W h before the softmax: Gemma caps it softly (c tanh(z / c)), Cohere scales
it, Granite divides it. `LogitTransform` is that step, read from the model's config
(logit_transform.py); every function here (and the divergences) applies it where logits are formed,
and its slope where gradients pass back through it, so log-probs are the model's own.

Values equal the plain path's (`losses.token_logps` on full logits) to float rounding; tests in
tests/test_lm_head.py compare values and gradients. How many rows a chunk holds: logit_chunks.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpo_engine.logit_chunks import head_chunk_rows
from dpo_engine.logit_transform import IDENTITY, LogitTransform
from dpo_engine.losses import check_labels, token_logps


def head_logits(hidden: Tensor, weight: Tensor, transform: LogitTransform = IDENTITY) -> Tensor:
    """The model's logits for hidden (N × H) and the head weight (V × H): `transform` of z = h Wᵀ, in
    at least float32 (N × V)."""
    z = hidden @ weight.T
    return transform.apply(z.to(torch.promote_types(z.dtype, torch.float32)))


def _check(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N x H) and head weight (V x H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected labels (N,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
    check_labels(labels, weight.shape[0])


def _logps_and_direction(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, want_direction: bool, transform: LogitTransform
) -> tuple[Tensor, Tensor | None]:
    """The label log-probs (N,) and, when asked, d logp_n / d h_n = ((e_y - softmax(z_n)) ⊙ slope)ᵀ W (N × H)."""
    out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    direction = torch.empty_like(hidden) if want_direction else None
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        z = head_logits(hidden[rows], weight, transform)
        lse = torch.logsumexp(z, dim=-1)
        out[rows] = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) - lse
        if direction is not None:
            slope = None if transform.identity else transform.slope(z)
            # e_y - softmax(z), formed in fp32 before the cast: for a confident token p_y is near 1, and
            # W[y] - (pᵀW rounded to bf16) would lose the small difference that is the gradient
            p = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of z
            p[torch.arange(p.shape[0], device=p.device), labels[rows]] -= 1.0
            if slope is not None:
                p = p.mul_(slope)
            direction[rows] = -(p.to(weight.dtype) @ weight)
    return out, direction


class _HeadTokenLogps(torch.autograd.Function):
    """log-probs of the labels from hidden states and the head, chunked; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, transform: LogitTransform):  # type: ignore[override]
        out, direction = _logps_and_direction(hidden, weight, labels, chunk_rows, ctx.needs_input_grad[0], transform)
        ctx.save_for_backward(hidden, weight, labels, direction)
        ctx.chunk_rows, ctx.transform = chunk_rows, transform
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, labels, direction = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_out.unsqueeze(-1) * direction).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                z = head_logits(hidden[rows], weight, ctx.transform)
                p = torch.softmax(z, dim=-1)
                g = grad_out[rows].to(p.dtype)
                coef = -p.mul_(g.unsqueeze(-1))  # d logp / dz = e_y - p, scaled by g
                coef.scatter_add_(-1, labels[rows].unsqueeze(-1), g.unsqueeze(-1))
                if not ctx.transform.identity:
                    coef.mul_(ctx.transform.slope(z))
                grad_weight += coef.T @ hidden[rows].to(coef.dtype)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def head_token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_rows: int | None = None,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    """log π(label_n | ctx_n) = z_n[label_n] - logsumexp(z_n), z_n = `transform`(W h_n): hidden (N × H),
    weight (V × H), labels (N,) -> (N,), in at least float32; no N × V tensor is kept for backward.
    `chunk_rows` defaults to `head_chunk_rows(H)`."""
    _check(hidden, weight, labels)
    chunk_rows = head_chunk_rows(weight.shape[1]) if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    labels = labels.long()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadTokenLogps.apply(hidden, weight, labels, chunk_rows, transform)
    with torch.no_grad():
        return _logps_and_direction(hidden, weight, labels, chunk_rows, False, transform)[0]


@torch.no_grad()
def perturbed_token_logps(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ts: tuple[float, ...],
    *,
    ref_weight: Tensor | None = None,
    chunk_rows: int | None = None,
    transform: LogitTransform = IDENTITY,
) -> list[Tensor]:
    """For each t in ts, log-softmax((1 + t) z - t z_ref) at the labels (N,), with z and z_ref the
    model's logits (`transform` of W h and of W_ref h_ref; W_ref = W unless given): ε-DPO's
    perturbed policies (METHOD.md 2.6), a chunk of rows at a time."""
    _check(hidden, weight, labels)
    ref_weight = weight if ref_weight is None else ref_weight
    if ref_weight.shape != weight.shape:
        raise ValueError(
            f"policy and reference head weights differ in shape: {tuple(weight.shape)} vs {tuple(ref_weight.shape)}"
        )
    if ref_hidden.shape != hidden.shape:
        raise ValueError(
            f"policy and reference hidden states differ in shape: {tuple(hidden.shape)} vs {tuple(ref_hidden.shape)}"
        )
    labels = labels.long()
    chunk_rows = head_chunk_rows(weight.shape[1]) if chunk_rows is None else chunk_rows
    outs = [
        torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for _ in ts
    ]
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        z, z_ref = head_logits(hidden[rows], weight, transform), head_logits(ref_hidden[rows], ref_weight, transform)
        for out, t in zip(outs, ts):
            out[rows] = token_logps((1.0 + t) * z - t * z_ref, labels[rows])
    return outs
