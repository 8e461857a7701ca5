"""The hybrid DPO loss and ε-DPO's adaptive beta (METHOD.md 2.1, 2.5, 2.6).

Plain functions on tensors so the trainer, the tests and notebooks share one
definition of every quantity that ends up in metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpo_engine.kernels import KernelModule


class LossConfig(BaseModel):
    """Preference-loss settings (METHOD.md 2.5-2.6)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0.0, description="DPO temperature beta on the log-ratio margin.")
    gamma: float = Field(0.5, ge=0.0, description="Weight of the kernel (embedding) margin; 0 = probability term only.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Conservative DPO: -(1-ls) log s(m) - ls log s(-m)."
    )
    epsilon_dpo: float = Field(
        0.0, ge=0.0, lt=1.0, description="epsilon-DPO perturbation size for adaptive beta (0 = fixed beta)."
    )


@dataclass
class LossOutput:
    """Total loss and its parts; every per-pair field has shape (B,) and is detached except `loss`."""

    loss: Tensor
    loss_pref: Tensor
    loss_div: Tensor
    loss_entropy: Tensor
    margins: Tensor  # m_i = beta_i * rho_i + gamma * m_emb_i
    rho: Tensor  # [l_θ(y+) - l_ref(y+)] - [l_θ(y-) - l_ref(y-)]
    m_emb: Tensor  # log K(h_x, h_y+) - log K(h_x, h_y-), zeros without a kernel
    beta_i: Tensor
    reward_chosen: Tensor  # beta_i * (l_θ(y+) - l_ref(y+))
    reward_rejected: Tensor  # beta_i * (l_θ(y-) - l_ref(y-))


def _check_aligned(logits: Tensor, labels: Tensor, mask: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B x T x V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must both be (B x T) = "
            f"{tuple(logits.shape[:2])}"
        )


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum over response tokens of log π(label_t | <t), per sequence -> (B,).

    `logits[:, t]` must already be the prediction for `labels[:, t]` (the caller shifts:
    logits = model_logits[:, :-1], labels = input_ids[:, 1:]). Positions where
    `loss_mask` is False (prompt, padding) are ignored, whatever their label (e.g. -100).
    Uses gather minus logsumexp rather than a full log_softmax so no extra
    vocabulary-sized tensor is kept for the backward pass.
    """
    _check_aligned(logits, labels, loss_mask)
    mask = loss_mask.bool()
    vocab = logits.shape[-1]
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).long()
    if mask.any():
        chosen = safe_labels[mask]
        if int(chosen.min()) < 0 or int(chosen.max()) >= vocab:
            raise ValueError(
                f"labels at response positions must lie in [0, {vocab}), got range [{int(chosen.min())}, "
                f"{int(chosen.max())}]"
            )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    token_logp = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logp * mask).sum(-1)


def check_labels(labels: Tensor, vocab: int) -> None:
    """Labels must index the vocabulary. Checked on CPU tensors only: on a GPU reading the range back
    would make the host wait for the device at every pass, so training checks its token ids against
    the head once, before the first step (train/setup.py, `check_token_ids`)."""
    if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}), got range [{int(labels.min())}, {int(labels.max())}]")


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(label_n | context_n) for N scored positions: logits (N × V), labels (N,) -> (N,).

    The flat counterpart of `sequence_logps` for batches that index their response tokens
    (packed pairs, logits computed at response positions only): gather minus logsumexp, in at
    least float32, with no log-softmax of the whole vocabulary kept.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N x V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    check_labels(labels, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sum_by_sequence(values: Tensor, sequence: Tensor, n_sequences: int) -> Tensor:
    """Per-sequence sums of per-token values: out[s] = sum of values[n] with sequence[n] == s -> (n_sequences,)."""
    out = torch.zeros(n_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence, values)


def masked_mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of hidden states over the masked tokens, L2-normalised -> (B × H). A row without tokens
    (an empty prompt under a tokenizer that adds no BOS) pools to the zero vector (METHOD.md 2.2)."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B x T x H) and mask (B x T), got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return F.normalize(pooled, dim=-1)


def _as_vector(value: Tensor | float, like: Tensor, name: str) -> Tensor:
    out = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if out.ndim == 0:
        return out.expand_as(like)
    if out.shape != like.shape:
        raise ValueError(f"{name} must be a scalar or have shape {tuple(like.shape)}, got {tuple(out.shape)}")
    return out


def hybrid_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float | Tensor,
    m_emb: Tensor | None,
    gamma: float,
    label_smoothing: float,
    loss_div: Tensor | None = None,
    alpha: float = 0.0,
    loss_entropy: Tensor | None = None,
) -> LossOutput:
    """L = mean_i -log σ(m_i) (label-smoothed) + alpha * L_div + L_entropy (METHOD.md 2.5).

    m_i = beta_i * rho_i + gamma * m_emb_i. `m_emb=None` means no kernel term (m_emb = 0
    whatever gamma is). With gamma = 0, no divergence and fixed beta this is exactly
    DPO (Rafailov et al.); with label smoothing ls it is conservative DPO.
    """
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.ndim != 1:
        raise ValueError(
            f"the four log-probability tensors must all be (B,), got shapes {sorted(tuple(s) for s in shapes)}"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    on_host = not isinstance(beta, Tensor) or beta.device.type == "cpu"  # a device's would be read back: a wait
    if on_host and bool((torch.as_tensor(beta) <= 0).any()):
        raise ValueError("beta must be > 0")
    beta_i = _as_vector(beta, policy_chosen_logps, "beta")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    rho = chosen_ratio - rejected_ratio
    if m_emb is None:
        m_emb = torch.zeros_like(rho)
    elif m_emb.shape != rho.shape:
        raise ValueError(f"m_emb must have shape {tuple(rho.shape)}, got {tuple(m_emb.shape)}")
    margins = beta_i * rho + gamma * m_emb
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    loss_pref = per_pair.mean()

    zero = torch.zeros((), dtype=loss_pref.dtype, device=loss_pref.device)
    loss_div = zero if loss_div is None else loss_div
    loss_entropy = zero if loss_entropy is None else loss_entropy.to(loss_pref.device)
    loss = loss_pref + alpha * loss_div + loss_entropy
    return LossOutput(
        loss=loss,
        loss_pref=loss_pref.detach(),
        loss_div=loss_div.detach(),
        loss_entropy=loss_entropy.detach(),
        margins=margins.detach(),
        rho=rho.detach(),
        m_emb=m_emb.detach(),
        beta_i=beta_i.detach(),
        reward_chosen=(beta_i * chosen_ratio).detach(),
        reward_rejected=(beta_i * rejected_ratio).detach(),
    )


def embedding_margin(kernel: KernelModule, h_x: Tensor, h_chosen: Tensor, h_rejected: Tensor) -> Tensor:
    """m_emb = log K(h_x, h_y+) - log K(h_x, h_y-) -> (B,)."""
    return kernel.log_kernel(h_x, h_chosen) - kernel.log_kernel(h_x, h_rejected)


def _log_ratio(logits: Tensor, ref_logits: Tensor, labels: Tensor, mask: Tensor, t: float) -> Tensor:
    """Sequence log-prob under logits (1 + t) z - t z_ref."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return sequence_logps((1.0 + t) * logits.to(dtype) - t * ref_logits.to(dtype), labels, mask)


@torch.no_grad()
def epsilon_dpo_steps(
    policy_logits_chosen: Tensor,
    ref_logits_chosen: Tensor,
    labels_chosen: Tensor,
    mask_chosen: Tensor,
    policy_logits_rejected: Tensor,
    ref_logits_rejected: Tensor,
    labels_rejected: Tensor,
    mask_rejected: Tensor,
    epsilon: float,
) -> Tensor:
    """ε-DPO step direction per pair, in {-1, 0, +1} (METHOD.md 2.6).

    Under z+ = (1+ε) z - ε z_ref, z and z- = (1-ε) z + ε z_ref, compare the sequence
    log-ratio l(y+) - l(y-): +1 if it strictly increases from z- to z to z+, -1 if it
    strictly decreases, else 0.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    for logits, ref in ((policy_logits_chosen, ref_logits_chosen), (policy_logits_rejected, ref_logits_rejected)):
        if logits.shape != ref.shape:
            raise ValueError(
                f"policy and reference logits differ in shape: {tuple(logits.shape)} vs {tuple(ref.shape)}"
            )
    ratios = []
    for t in (-epsilon, 0.0, epsilon):
        chosen = _log_ratio(policy_logits_chosen, ref_logits_chosen, labels_chosen, mask_chosen, t)
        rejected = _log_ratio(policy_logits_rejected, ref_logits_rejected, labels_rejected, mask_rejected, t)
        ratios.append(chosen - rejected)
    minus, mid, plus = ratios
    up = (plus > mid) & (mid > minus)
    down = (minus > mid) & (mid > plus)
    return up.to(torch.int64) - down.to(torch.int64)


@torch.no_grad()
def epsilon_dpo_steps_tokens(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    sequence: Tensor,
    n_pairs: int,
    epsilon: float,
) -> Tensor:
    """`epsilon_dpo_steps` on flat response tokens: logits (N × V) at scored positions, labels (N,),
    sequence (N,) in [0, 2B) (chosen 0..B-1, rejected B..2B-1) -> steps (B,) in {-1, 0, +1}."""
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}"
        )
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    z, z_ref = policy_logits.to(dtype), ref_logits.to(dtype)
    perturbed = [token_logps((1.0 + t) * z - t * z_ref, labels) for t in epsilon_grid(epsilon)]
    return epsilon_dpo_steps_from_token_logps(perturbed, sequence, n_pairs)


def epsilon_grid(epsilon: float) -> tuple[float, float, float]:
    """The three perturbations t of ε-DPO's policies (1 + t) z - t z_ref: -ε, 0, +ε."""
    return (-epsilon, 0.0, epsilon)


def epsilon_dpo_steps_from_token_logps(perturbed: list[Tensor], sequence: Tensor, n_pairs: int) -> Tensor:
    """Steps (B,) from the response tokens' log-probs (N,) under the perturbed policies at t = -ε, 0, +ε
    (`epsilon_grid`): +1 where the log-ratio margin rises monotonically with t, -1 where it falls."""
    ratios = []
    for token_values in perturbed:
        seq = sum_by_sequence(token_values, sequence, 2 * n_pairs)
        ratios.append(seq[:n_pairs] - seq[n_pairs:])
    minus, mid, plus = ratios
    up = (plus > mid) & (mid > minus)
    down = (minus > mid) & (mid > plus)
    return up.to(torch.int64) - down.to(torch.int64)


def epsilon_dpo_beta_per_pair(beta: float, steps: Tensor, epsilon: float) -> Tensor:
    """beta_i = beta / (1 + ε step_i)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return beta / (1.0 + epsilon * steps.to(torch.float32))


def update_beta(beta: float, mean_step: float, epsilon: float) -> float:
    """beta <- beta / (1 + ε mean(step)), applied once per optimiser step."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not -1.0 <= mean_step <= 1.0:
        raise ValueError(f"mean_step is a mean of steps in {{-1, 0, 1}}, got {mean_step}")
    return float(beta / (1.0 + epsilon * mean_step))
