"""Token-level divergences between policy and reference next-token distributions (METHOD.md 2.7).

Two layers:
- distribution-level functions on log-probabilities over the last dimension
  (..., V) -> (...), written in log space, differentiable;
- `token_divergence`, the training regulariser: the mean over response positions,
  computed in chunks of positions. It works out the value and the gradient with
  respect to the policy logits chunk by chunk in the forward pass (hand-derived
  gradients, checked against autograd in tests) and keeps only that gradient for
  backward, so memory stays close to a plain DPO step whatever the sequence length,
  and the backward pass is a single scaling. Chunks follow the LM head's
  (logit_chunks.py): smaller for a narrow hidden state, whose chunk then stays in cache.

Wasserstein is the debiased entropic OT (Sinkhorn divergence)
S(p, q) = OT_ε(p, q) - ½ OT_ε(p, p) - ½ OT_ε(q, q), so that S(p, p) = 0 like every
other divergence here; S tends to the exact OT cost as ε -> 0. OT_ε is solved by
log-domain Sinkhorn on a small per-position support (top-k of p ∪ top-k of q plus one
bucket holding the remaining mass), batched over positions. Its gradient is the
envelope (dual-potential) gradient of the converged problem, so the iterations are
not unrolled through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpo_engine.logit_chunks import HEAD_CHUNK_ROWS, head_chunk_rows
from dpo_engine.logit_transform import IDENTITY, LogitTransform
from dpo_engine.names import ALL_DIVERGENCES, divergence_metric

DivergenceName = Literal[("none", *ALL_DIVERGENCES)]
FDivergenceName = Literal["jeffreys", "chi2", "total_variation", "alpha"]

_LOG_ZERO = -1e30
"""Finite stand-in for log 0 in Sinkhorn, so empty support points never produce inf - inf."""


class DivergenceConfig(BaseModel):
    """Divergence regulariser settings (METHOD.md 2.7)."""

    model_config = ConfigDict(extra="forbid")

    name: DivergenceName = Field(
        "kl",
        description="Token-level regulariser between policy and reference: none, kl, js, hellinger, renyi, "
        "bhattacharyya, wasserstein or fdiv.",
    )
    alpha: float = Field(0.1, ge=0.0, description="Weight of the divergence in the loss (0 = off).")
    renyi_order: float = Field(2.0, gt=0.0, description="Order a of the Renyi divergence (a = 1 is the KL limit).")
    f: FDivergenceName = Field(
        "jeffreys", description="f of the f-divergence: jeffreys, chi2, total_variation or alpha."
    )
    f_alpha: float = Field(0.5, description="Order of the alpha f-divergence (when f = alpha).")
    ot_epsilon: float = Field(0.05, gt=0.0, description="Entropic regularisation of the Wasserstein (Sinkhorn) term.")
    ot_iterations: int = Field(50, ge=1, description="Log-domain Sinkhorn iterations.")
    ot_top_k: int = Field(
        32, ge=1, description="Wasserstein support: top-k tokens of each distribution plus one bucket for the rest."
    )
    chunk_positions: int | None = Field(
        None,
        ge=1,
        description="Token positions per chunk when computing divergences (bounds peak memory); empty = auto: "
        "the LM head's chunk for the model's hidden size (hidden / 4 within 64-256; 256 for stored logits). "
        "No value depends on it.",
    )


# ----------------------------------------------------------------------------------------
# Distribution-level divergences: logp, logq are log-probabilities over the last dim.


def _check_same_shape(logp: Tensor, logq: Tensor) -> None:
    if logp.shape != logq.shape:
        raise ValueError(f"log-probability tensors differ in shape: {tuple(logp.shape)} vs {tuple(logq.shape)}")


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum p log(p / q)."""
    _check_same_shape(logp, logq)
    return (logp.exp() * (logp - logq)).sum(-1)


def js(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen-Shannon: ½ KL(p || m) + ½ KL(q || m), m = (p + q) / 2."""
    _check_same_shape(logp, logq)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * ((logp.exp() * (logp - logm)).sum(-1) + (logq.exp() * (logq - logm)).sum(-1))


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient at 0: p = q happens at the first step."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def hellinger(logp: Tensor, logq: Tensor) -> Tensor:
    """sqrt(½ sum (sqrt p - sqrt q)^2), summed term by term (no 1 - BC cancellation)."""
    _check_same_shape(logp, logq)
    squared = 0.5 * (torch.exp(0.5 * logp) - torch.exp(0.5 * logq)).pow(2).sum(-1)
    return _safe_sqrt(squared)


def renyi(logp: Tensor, logq: Tensor, order: float = 2.0) -> Tensor:
    """Rényi divergence of order a: 1/(a-1) log sum p^a q^(1-a); order 1 is KL."""
    _check_same_shape(logp, logq)
    if order <= 0:
        raise ValueError(f"Rényi order must be > 0, got {order}")
    if order == 1.0:
        return kl(logp, logq)
    return torch.logsumexp(order * logp + (1.0 - order) * logq, dim=-1) / (order - 1.0)


def bhattacharyya(logp: Tensor, logq: Tensor) -> Tensor:
    """-log sum sqrt(p q)."""
    _check_same_shape(logp, logq)
    return -torch.logsumexp(0.5 * (logp + logq), dim=-1)


def f_divergence(logp: Tensor, logq: Tensor, f: FDivergenceName = "jeffreys", f_alpha: float = 0.5) -> Tensor:
    """sum q f(p / q) for the named f, each written in a cancellation-free form.

    jeffreys: f(t) = (t - 1) log t            -> sum (p - q)(log p - log q)
    chi2:     f(t) = (t - 1)^2                -> sum q (p/q - 1)^2
    total_variation: f(t) = ½ |t - 1|         -> ½ sum |p - q|
    alpha:    f(t) = (t^a - a t - (1 - a)) / (a (a - 1))
              -> (sum p^a q^(1-a) - 1) / (a (a - 1)); a -> 1 gives KL(p||q), a -> 0 KL(q||p).
    """
    _check_same_shape(logp, logq)
    if f == "jeffreys":
        return ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)
    if f == "chi2":
        return (logq.exp() * torch.expm1(logp - logq).pow(2)).sum(-1)
    if f == "total_variation":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    if f == "alpha":
        a = float(f_alpha)
        if a == 1.0:
            return kl(logp, logq)
        if a == 0.0:
            return kl(logq, logp)
        return torch.expm1(torch.logsumexp(a * logp + (1.0 - a) * logq, dim=-1)) / (a * (a - 1.0))
    raise ValueError(f"unknown f-divergence {f!r}; expected one of jeffreys, chi2, total_variation, alpha")


# ----------------------------------------------------------------------------------------
# Wasserstein: entropic OT on a small support per position.


def _support(logp: Tensor, logq: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Indices (N × 2k) of top-k of p then top-k of q, and which of them count (duplicates of p's don't)."""
    k = min(int(top_k), logp.shape[-1])
    idx_p = logp.topk(k, dim=-1).indices
    idx_q = logq.topk(k, dim=-1).indices
    duplicate = (idx_q.unsqueeze(-1) == idx_p.unsqueeze(-2)).any(-1)
    keep = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)
    return torch.cat([idx_p, idx_q], dim=-1), keep


def _compact(keep: Tensor, *columns: Tensor) -> tuple[Tensor, ...]:
    """Move the counted support points first and drop columns no row needs (keep, then columns).

    p and q of a policy near its reference share most of their top tokens, so the union
    is usually far smaller than 2k, and Sinkhorn's cost grows with its square.
    """
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    width = max(int(keep.sum(-1).max()), 1)
    return tuple(t.gather(-1, order)[:, :width] for t in (keep, *columns))


def _log_masses(on_support: Tensor, keep: Tensor) -> Tensor:
    """Log-masses on the support points (given their log-probs) plus the remaining-mass bucket (N × (n + 1))."""
    rest = (1.0 - (on_support.exp() * keep).sum(-1)).clamp_min(0.0)
    log_rest = torch.where(
        rest > 0, rest.clamp_min(torch.finfo(rest.dtype).tiny).log(), torch.full_like(rest, _LOG_ZERO)
    )
    log_support = torch.where(keep, on_support, torch.full_like(on_support, _LOG_ZERO))
    return torch.cat([log_support, log_rest.unsqueeze(-1)], dim=-1)


def _ground_cost(token_rows: tuple[Tensor, Tensor], idx: Tensor) -> Tensor:
    """1 - cos between support tokens' output embeddings; the bucket is at cost 1 from every token
    (as if its embedding were orthogonal to all of them) and 0 from itself. Symmetric."""
    embeddings, inv_norm = token_rows
    rows = embeddings[idx].to(inv_norm.dtype) * inv_norm[idx].unsqueeze(-1)  # N × n × d, unit rows
    cost = (1.0 - rows @ rows.transpose(-1, -2)).clamp_min(0.0)
    cost = F.pad(cost, (0, 1, 0, 1), value=1.0)
    cost[:, -1, -1] = 0.0
    return cost


_MAX_SAFE_EXPONENT = {torch.float32: 80.0, torch.float64: 700.0}
"""Largest C/ε for which exp(-C/ε) is still a normal number: the kernel-matrix path is exact then."""


def _sinkhorn_potentials(
    log_a: Tensor, log_b: Tensor, cost: Tensor, epsilon: float, iterations: int
) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn for min <P, C> + ε KL(P || a ⊗ b) with a symmetric cost; returns the
    dual potentials f (on a) and g (on b).

    Each update is the soft-min -ε log sum_j exp(h_j - C_ij / ε). When exp(-C/ε) cannot
    underflow, it is evaluated as max(h) + log(K @ exp(h - max(h))) with K = exp(-C/ε):
    the same log-domain quantity (every sum is >= exp(-max C / ε) > 0), computed by one
    batched matrix-vector product instead of a logsumexp over an n × n temporary.
    """
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    if float(cost.amax()) / epsilon <= _MAX_SAFE_EXPONENT.get(cost.dtype, 0.0):
        kernel = torch.exp(-cost / epsilon)

        def softmin(h: Tensor) -> Tensor:
            top = h.amax(-1, keepdim=True)
            return -epsilon * (torch.bmm(kernel, (h - top).exp().unsqueeze(-1)).squeeze(-1).log() + top)
    else:
        neg_cost = -cost / epsilon

        def softmin(h: Tensor) -> Tensor:
            return -epsilon * torch.logsumexp(neg_cost + h.unsqueeze(-2), dim=-1)

    for _ in range(iterations):
        f = softmin(log_b + g / epsilon)
        g = softmin(log_a + f / epsilon)  # C symmetric: the column soft-min is the row one
    return f, g


@torch.no_grad()
def _sinkhorn_divergence(
    log_a: Tensor, log_b: Tensor, cost: Tensor, epsilon: float, iterations: int
) -> tuple[Tensor, Tensor, Tensor]:
    """S = OT(a,b) - ½ OT(a,a) - ½ OT(b,b) per row, and dS/da, dS/db (envelope gradients)."""
    n = log_a.shape[0]
    f, g = _sinkhorn_potentials(
        torch.cat([log_a, log_a, log_b]), torch.cat([log_b, log_a, log_b]), cost.repeat(3, 1, 1), epsilon, iterations
    )
    a, b = log_a.exp(), log_b.exp()
    f_ab, f_aa, f_bb = f.split(n)
    g_ab, g_aa, g_bb = g.split(n)
    ot_ab = (a * f_ab).sum(-1) + (b * g_ab).sum(-1)
    ot_aa = (a * (f_aa + g_aa)).sum(-1)
    ot_bb = (b * (f_bb + g_bb)).sum(-1)
    value = ot_ab - 0.5 * ot_aa - 0.5 * ot_bb
    # d OT(a,a)/da = f_aa + g_aa = 2 f_aa at convergence; using f_aa (computed by the very same
    # iterations as f_ab) makes the gradient exactly 0 at p = q even before full convergence.
    return value, f_ab - f_aa, g_ab - g_bb


def _unit_embeddings(token_embeddings: Tensor, vocab: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The embedding rows and their inverse norms; rows are normalised only where gathered."""
    if token_embeddings.ndim != 2 or token_embeddings.shape[0] != vocab:
        raise ValueError(
            f"token embeddings must be (V x d) with V = {vocab} (the logits' vocabulary), got "
            f"{tuple(token_embeddings.shape)}"
        )
    rows = token_embeddings.detach()
    norms = torch.linalg.vector_norm(rows, dim=-1, dtype=dtype)
    return rows, 1.0 / norms.clamp_min(1e-12)


def _check_ot_args(top_k: int, epsilon: float, iterations: int) -> None:
    if top_k < 1 or epsilon <= 0 or iterations < 1:
        raise ValueError(f"need top_k >= 1, epsilon > 0, iterations >= 1; got {top_k}, {epsilon}, {iterations}")


def wasserstein_sinkhorn(
    logp: Tensor,
    logq: Tensor,
    token_embeddings: Tensor,
    top_k: int = 32,
    epsilon: float = 0.05,
    iterations: int = 50,
) -> Tensor:
    """Debiased entropic OT between p and q over the top-k ∪ top-k support plus a remaining-mass bucket.

    Ground cost 1 - cos(E_a, E_b) over token embedding rows (V × d); differentiable in
    logp and logq through the masses (the support choice itself is discrete).
    """
    _check_same_shape(logp, logq)
    _check_ot_args(top_k, epsilon, iterations)
    vocab = logp.shape[-1]
    lead = logp.shape[:-1]
    lp, lq = logp.reshape(-1, vocab), logq.reshape(-1, vocab)
    unit = _unit_embeddings(token_embeddings, vocab, lp.dtype)
    with torch.no_grad():
        idx, keep = _support(lp, lq, top_k)
        keep, idx = _compact(keep, idx)
        log_a, log_b = _log_masses(lp.gather(-1, idx), keep), _log_masses(lq.gather(-1, idx), keep)
        value, phi_a, phi_b = _sinkhorn_divergence(log_a, log_b, _ground_cost(unit, idx), epsilon, iterations)

    def linear_part(logx: Tensor, phi: Tensor) -> Tensor:
        # <masses, phi> as a function of logx: support masses plus bucket = 1 - their sum.
        on_support = logx.gather(-1, idx).exp() * keep
        return phi[:, -1] + (on_support * (phi[:, :-1] - phi[:, -1:])).sum(-1)

    surrogate = linear_part(lp, phi_a) + linear_part(lq, phi_b)
    return (value + surrogate - surrogate.detach()).reshape(lead)


# ----------------------------------------------------------------------------------------
# Token level: mean over masked positions, chunked.

_Pointwise = Callable[[Tensor, Tensor], Tensor]


def _pointwise(cfg: DivergenceConfig, name: str) -> _Pointwise:
    if name == "kl":
        return kl
    if name == "js":
        return js
    if name == "hellinger":
        return hellinger
    if name == "renyi":
        return lambda lp, lq: renyi(lp, lq, cfg.renyi_order)
    if name == "bhattacharyya":
        return bhattacharyya
    if name == "fdiv":
        return lambda lp, lq: f_divergence(lp, lq, cfg.f, cfg.f_alpha)
    raise ValueError(f"unknown divergence {name!r}")


def _softmax_and_lse(x: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(x) and logsumexp(x) over the last dim from one exponential pass."""
    top = x.amax(-1, keepdim=True)
    e = (x - top).exp_()
    total = e.sum(-1, keepdim=True)
    return e.div_(total), (total.log() + top).squeeze(-1)


def _closed_form(cfg: DivergenceConfig, name: str) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(logp, logq) -> (D per row, dD/dz per row) with p = softmax(z), in few passes over the vocabulary.

    Every gradient is p ⊙ (∂D/∂p - <p, ∂D/∂p>) (the softmax Jacobian) worked out by hand;
    tests check them against autograd through the distribution-level functions above.
    """

    def kl_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        p, diff = lp.exp(), lp - lq
        value = (p * diff).sum(-1)
        return value, diff.sub_(value.unsqueeze(-1)).mul_(p)

    def js_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        p, q = lp.exp(), lq.exp()
        lm = torch.logaddexp(lp, lq).sub_(math.log(2.0))
        dp = lp - lm  # ∂D/∂p = ½ (log p - log m)
        value = 0.5 * ((p * dp).sum(-1) + (q * (lq - lm)).sum(-1))
        mean = (p * dp).sum(-1, keepdim=True)
        return value, dp.sub_(mean).mul_(p).mul_(0.5)

    def hellinger_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        p = lp.exp()
        root_ratio = torch.exp(0.5 * (lq - lp))  # sqrt(q / p)
        sp = (0.5 * lp).exp_()
        squared = 0.5 * (sp - (0.5 * lq).exp_()).pow_(2).sum(-1)
        value = _safe_sqrt(squared)
        # ∂H²/∂p = ½ (1 - sqrt(q/p)), so p ⊙ (∂H²/∂p - <p, ∂H²/∂p>) = -½ p ⊙ (sqrt(q/p) - BC), BC = <p, sqrt(q/p)>
        bc = (p * root_ratio).sum(-1, keepdim=True)
        grad_sq = root_ratio.sub_(bc).mul_(p).mul_(-0.5)
        scale = torch.where(
            value > 0, 0.5 / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value)
        )
        return value, grad_sq.mul_(scale.unsqueeze(-1))

    def renyi_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        a = float(cfg.renyi_order)
        if a == 1.0:
            return kl_(lp, lq)
        w, lse = _softmax_and_lse(a * lp + (1.0 - a) * lq)
        return lse / (a - 1.0), w.sub_(lp.exp()).mul_(a / (a - 1.0))

    def bhattacharyya_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        w, lse = _softmax_and_lse(0.5 * (lp + lq))
        return -lse, w.sub_(lp.exp()).mul_(-0.5)

    def fdiv_(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
        if cfg.f == "jeffreys":
            p, q, diff = lp.exp(), lq.exp(), lp - lq
            value = ((p - q) * diff).sum(-1)
            kl_pq = (p * diff).sum(-1, keepdim=True)
            return value, diff.sub_(kl_pq).add_(1.0).mul_(p).sub_(q)
        if cfg.f == "chi2":
            p, q = lp.exp(), lq.exp()
            ratio = (lp - lq).exp_()
            value = (q * (ratio - 1.0).pow_(2)).sum(-1)
            return value, ratio.sub_(1.0 + value.unsqueeze(-1)).mul_(p).mul_(2.0)
        if cfg.f == "total_variation":
            p, q = lp.exp(), lq.exp()
            sign = torch.sign(p - q).mul_(0.5)
            value = 0.5 * (p - q).abs_().sum(-1)
            mean = (p * sign).sum(-1, keepdim=True)
            return value, sign.sub_(mean).mul_(p)
        a = float(cfg.f_alpha)
        if a == 1.0:
            return kl_(lp, lq)
        if a == 0.0:
            # D = KL(q || p): ∂D/∂z = p - q
            q = lq.exp()
            return (q * (lq - lp)).sum(-1), lp.exp().sub_(q)
        w, lse = _softmax_and_lse(a * lp + (1.0 - a) * lq)
        total = lse.exp()
        return torch.expm1(lse) / (a * (a - 1.0)), w.sub_(lp.exp()).mul_((total / (a - 1.0)).unsqueeze(-1))

    table = {
        "kl": kl_,
        "js": js_,
        "hellinger": hellinger_,
        "renyi": renyi_,
        "bhattacharyya": bhattacharyya_,
        "fdiv": fdiv_,
    }
    if name not in table:
        raise ValueError(f"unknown divergence {name!r}")
    return table[name]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _chunks(positions: Tensor, cfg: DivergenceConfig, policy: _Logits) -> list[Tensor]:
    """Positions a chunk at a time: `cfg.chunk_positions`, or the LM head's chunk for this hidden size."""
    size = cfg.chunk_positions
    if size is None:
        size = head_chunk_rows(policy.hidden.shape[-1]) if policy.hidden is not None else HEAD_CHUNK_ROWS
    return list(positions.split(size))


class _Logits:
    """Next-token logits by (batch, time) position: a stored (B × T × V) tensor, or formed on demand
    from hidden states (B × T × H) and the LM head weight (V × H), so that only a chunk of rows ever
    exists. With `with_grad`, `put_grad` turns d(value)/d(logits) of a chunk into the gradient with
    respect to what is stored (logits; or hidden states and, when it trains, the head weight)."""

    def __init__(
        self,
        logits: Tensor | None = None,
        *,
        hidden: Tensor | None = None,
        weight: Tensor | None = None,
        with_grad: bool = False,
        transform: LogitTransform = IDENTITY,
    ):
        self.logits, self.hidden, self.weight, self.transform = logits, hidden, weight, transform
        base = logits if logits is not None else hidden
        self.vocab = logits.shape[-1] if logits is not None else weight.shape[0]
        self.dtype = (
            _compute_dtype(logits)
            if logits is not None
            else torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        )
        self.device = base.device
        self.grad = self.grad_weight = None
        if with_grad:
            self.grad = torch.zeros_like(base)
            if logits is None and weight.requires_grad:
                self.grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))

    def rows(self, pos: Tensor) -> Tensor:
        """The (n × V) logits at positions pos (n × 2), in the compute dtype; copies only those rows.
        Formed from hidden states, they are the model's own: its `transform` of W h (lm_head.py)."""
        if self.logits is not None:
            return self.logits[pos[:, 0], pos[:, 1]].to(self.dtype)
        z = (self.hidden[pos[:, 0], pos[:, 1]] @ self.weight.T).to(self.dtype)
        return z if self.transform.identity else self.transform.apply(z)

    def put_grad(self, pos: Tensor, grad: Tensor, logits: Tensor) -> None:
        """Take d(value)/d(logits) of the chunk at `pos`, whose logits (`rows(pos)`) are `logits`."""
        if self.logits is not None:
            self.grad[pos[:, 0], pos[:, 1]] = grad.to(self.grad.dtype)
            return
        if not self.transform.identity:
            grad = grad * self.transform.slope(logits)
        h = self.hidden[pos[:, 0], pos[:, 1]]
        self.grad[pos[:, 0], pos[:, 1]] = (grad.to(self.weight.dtype) @ self.weight).to(self.grad.dtype)
        if self.grad_weight is not None:
            self.grad_weight += grad.T @ h.to(grad.dtype)


def _pointwise_value_and_grad(cfg: DivergenceConfig, policy: _Logits, ref: _Logits, positions: Tensor) -> Tensor:
    """Sum of the divergence over the given positions; when the policy carries a gradient buffer,
    d(sum)/d(policy logits) goes into it."""
    total = torch.zeros((), dtype=policy.dtype, device=policy.device)
    fn = _pointwise(cfg, cfg.name)
    value_and_grad = _closed_form(cfg, cfg.name)
    for pos in _chunks(positions, cfg, policy):
        z = policy.rows(pos)
        logp = torch.log_softmax(z, dim=-1)
        logq = torch.log_softmax(ref.rows(pos), dim=-1)
        if policy.grad is None:
            total += fn(logp, logq).sum()
            continue
        values, grad = value_and_grad(logp, logq)
        total += values.sum()
        policy.put_grad(pos, grad, z)
    return total


def _wasserstein_value_and_grad(
    cfg: DivergenceConfig, embeddings: Tensor, policy: _Logits, ref: _Logits, positions: Tensor
) -> Tensor:
    """Sum of the Sinkhorn divergence over rows: supports per chunk, one Sinkhorn for all rows,
    then the envelope gradient p ⊙ (ψ - <p, ψ>) per chunk (when the policy carries a gradient buffer)."""
    dtype = policy.dtype
    unit = _unit_embeddings(embeddings, policy.vocab, dtype)
    chunks = _chunks(positions, cfg, policy)
    parts = []  # per chunk: support indices, which count, their log-probs under p and q
    for pos in chunks:
        logp = torch.log_softmax(policy.rows(pos), dim=-1)
        logq = torch.log_softmax(ref.rows(pos), dim=-1)
        idx, keep = _support(logp, logq, cfg.ot_top_k)
        parts.append((idx, keep, logp.gather(-1, idx), logq.gather(-1, idx)))
    idx, keep, lp_s, lq_s = (torch.cat(column) for column in zip(*parts))
    keep, idx, lp_s, lq_s = _compact(keep, idx, lp_s, lq_s)
    sizes = [len(pos) for pos in chunks]
    idxs, keeps = idx.split(sizes), keep.split(sizes)
    costs = torch.cat([_ground_cost(unit, idx_c) for idx_c in idxs])
    value, phi_a, _ = _sinkhorn_divergence(
        _log_masses(lp_s, keep), _log_masses(lq_s, keep), costs, cfg.ot_epsilon, cfg.ot_iterations
    )
    if policy.grad is not None:
        # <a, phi> = phi_bucket + sum_v p_v psi_v with psi_v = phi_s - phi_bucket at support token v.
        start = 0
        for pos, idx, keep in zip(chunks, idxs, keeps):
            phi = phi_a[start : start + len(pos)]
            start += len(pos)
            z = policy.rows(pos)
            p = torch.softmax(z, dim=-1)
            shifted = (phi[:, :-1] - phi[:, -1:]) * keep
            psi = torch.zeros_like(p).scatter_add_(-1, idx, shifted)
            mean_psi = (p.gather(-1, idx) * shifted).sum(-1, keepdim=True)
            policy.put_grad(pos, p * (psi - mean_psi), z)
    return value.sum()


class _ChunkedTokenDivergence(torch.autograd.Function):
    """Mean divergence over the (batch, time) `positions`; gradient to the policy only. The policy is
    given as logits (B × T × V), or as hidden states (B × T × H) and the head weight (V × H)."""

    @staticmethod
    def forward(ctx, policy: Tensor, weight: Tensor | None, positions: Tensor, evaluate, transform):  # type: ignore[override]
        if weight is None:
            source = _Logits(policy, with_grad=True)
        else:
            source = _Logits(hidden=policy, weight=weight, with_grad=True, transform=transform)
        total = evaluate(source, positions)
        ctx.save_for_backward(source.grad, source.grad_weight)
        ctx.count = len(positions)
        return total / len(positions)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.count
        grad_weight = None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype)
        return grad * scale.to(grad.dtype), grad_weight, None, None, None


def _resolve_cfg(cfg_or_name: DivergenceConfig | str, cfg: DivergenceConfig | None) -> DivergenceConfig:
    if isinstance(cfg_or_name, DivergenceConfig):
        return cfg_or_name
    if isinstance(cfg_or_name, str):
        base = cfg if cfg is not None else DivergenceConfig()
        return base.model_copy(update={"name": DivergenceConfig(name=cfg_or_name).name})
    raise TypeError(f"expected a DivergenceConfig or a divergence name, got {type(cfg_or_name).__name__}")


def _flatten_inputs(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if policy_logits.ndim != 3:
        raise ValueError(f"logits must be (B x T x V), got shape {tuple(policy_logits.shape)}")
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}"
        )
    if mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"mask must be (B x T) = {tuple(policy_logits.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must be boolean (or 0/1)")
        mask = mask.bool()
    positions = mask.nonzero()  # (n × 2) batch, time
    if len(positions) == 0:
        raise ValueError("mask selects no positions: the divergence mean over zero tokens is undefined")
    return policy_logits, ref_logits.detach(), positions


def _evaluator(cfg: DivergenceConfig, output_embeddings: Tensor | None) -> Callable[[_Logits, _Logits, Tensor], Tensor]:
    """The chunked sum over positions for cfg.name (value, and gradient when the policy carries a buffer)."""
    if cfg.name == "wasserstein":
        if output_embeddings is None:
            raise ValueError("the wasserstein divergence needs output_embeddings (V x d) for its ground cost")
        _check_ot_args(cfg.ot_top_k, cfg.ot_epsilon, cfg.ot_iterations)
        return lambda pol, rf, pos: _wasserstein_value_and_grad(cfg, output_embeddings, pol, rf, pos)
    _pointwise(cfg, cfg.name)  # unknown names fail here, before any work
    return lambda pol, rf, pos: _pointwise_value_and_grad(cfg, pol, rf, pos)


def _mean_divergence(
    cfg: DivergenceConfig,
    policy: Tensor,
    weight: Tensor | None,
    ref: _Logits,
    positions: Tensor,
    output_embeddings: Tensor | None,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    evaluate = _evaluator(cfg, output_embeddings)
    grad_wanted = policy.requires_grad or (weight is not None and weight.requires_grad)
    if torch.is_grad_enabled() and grad_wanted:
        return _ChunkedTokenDivergence.apply(
            policy, weight, positions, lambda pol, pos: evaluate(pol, ref, pos), transform
        )
    source = _Logits(policy) if weight is None else _Logits(hidden=policy, weight=weight, transform=transform)
    with torch.no_grad():
        return evaluate(source, ref, positions) / len(positions)


def token_divergence(
    cfg_or_name: DivergenceConfig | DivergenceName,
    policy_logits: Tensor,
    ref_logits: Tensor,
    mask: Tensor,
    *,
    output_embeddings: Tensor | None = None,
    cfg: DivergenceConfig | None = None,
) -> Tensor:
    """L_div = mean over masked positions of D(π_θ(·|ctx_t) || π_ref(·|ctx_t)) -> scalar.

    `cfg_or_name` is a DivergenceConfig, or a name whose parameters come from `cfg`
    (defaults otherwise). Positions are processed `chunk_positions` at a time (auto: 256 for
    stored logits); the value does not depend on the chunk size. Gradient flows to `policy_logits` only.
    `output_embeddings` (V × d, the LM head rows) is required for wasserstein.
    """
    cfg = _resolve_cfg(cfg_or_name, cfg)
    if cfg.name == "none":
        return torch.zeros((), dtype=_compute_dtype(policy_logits), device=policy_logits.device)
    policy, ref, positions = _flatten_inputs(policy_logits, ref_logits, mask)
    return _mean_divergence(cfg, policy, None, _Logits(ref), positions, output_embeddings)


def _flatten_hidden(
    policy_hidden: Tensor, ref_hidden: Tensor, head_weight: Tensor, ref_head_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(N × H) rows as one (1 × N × H) sequence, and every position of it."""
    if policy_hidden.ndim != 2 or head_weight.ndim != 2 or policy_hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(
            f"expected hidden states (N x H) and a head weight (V x H), got {tuple(policy_hidden.shape)} "
            f"and {tuple(head_weight.shape)}"
        )
    if ref_head_weight.shape != head_weight.shape:
        raise ValueError(
            f"policy and reference head weights differ in shape: {tuple(head_weight.shape)} vs "
            f"{tuple(ref_head_weight.shape)}"
        )
    if ref_hidden.shape != policy_hidden.shape:
        raise ValueError(
            f"policy and reference hidden states differ in shape: {tuple(policy_hidden.shape)} vs "
            f"{tuple(ref_hidden.shape)}"
        )
    n = policy_hidden.shape[0]
    if n == 0:
        raise ValueError("no positions: the divergence mean over zero tokens is undefined")
    positions = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], dim=1).to(policy_hidden.device)
    return policy_hidden[None], ref_hidden.detach()[None], positions


def token_divergence_from_hidden(
    cfg_or_name: DivergenceConfig | DivergenceName,
    policy_hidden: Tensor,
    ref_hidden: Tensor,
    head_weight: Tensor,
    *,
    ref_head_weight: Tensor | None = None,
    output_embeddings: Tensor | None = None,
    cfg: DivergenceConfig | None = None,
    transform: LogitTransform = IDENTITY,
) -> Tensor:
    """`token_divergence` over every row, with logits (`transform` of z = W h) formed a chunk at a time
    from the final hidden states (N × H) of policy and reference and the head weight W (V × H; the
    reference's own `ref_head_weight` when it differs, as after full fine-tuning of a tied head): the
    same value and gradient (to the policy's hidden states, and to W when it trains) without any N × V
    tensor."""
    cfg = _resolve_cfg(cfg_or_name, cfg)
    if cfg.name == "none":
        return torch.zeros((), dtype=_compute_dtype(policy_hidden), device=policy_hidden.device)
    ref_head_weight = head_weight if ref_head_weight is None else ref_head_weight
    policy, ref, positions = _flatten_hidden(policy_hidden, ref_hidden, head_weight, ref_head_weight)
    ref_logits = _Logits(hidden=ref, weight=ref_head_weight.detach(), transform=transform)
    return _mean_divergence(cfg, policy, head_weight, ref_logits, positions, output_embeddings, transform)


@torch.no_grad()
def _all_divergences(
    policy: _Logits, ref: _Logits, positions: Tensor, cfg: DivergenceConfig, output_embeddings: Tensor | None
) -> dict[str, float]:
    if output_embeddings is None:
        raise ValueError("all_token_divergences needs output_embeddings (V x d) for div_wasserstein")
    names = [name for name in ALL_DIVERGENCES if name != "wasserstein"]
    fns = {name: _pointwise(cfg, name) for name in names}
    totals = {name: 0.0 for name in names}
    for pos in _chunks(positions, cfg, policy):
        logp = torch.log_softmax(policy.rows(pos), dim=-1)
        logq = torch.log_softmax(ref.rows(pos), dim=-1)
        for name in names:
            totals[name] += float(fns[name](logp, logq).sum())
    count = len(positions)
    out = {divergence_metric(name): totals[name] / count for name in names}
    out[divergence_metric("wasserstein")] = (
        float(_wasserstein_value_and_grad(cfg, output_embeddings, policy, ref, positions)) / count
    )
    return {divergence_metric(name): out[divergence_metric(name)] for name in ALL_DIVERGENCES}


def all_token_divergences(
    policy_logits: Tensor,
    ref_logits: Tensor,
    mask: Tensor,
    cfg: DivergenceConfig,
    output_embeddings: Tensor | None,
) -> dict[str, float]:
    """All seven divergences (div_kl, ..., div_fdiv) for eval logging, whichever one regularises."""
    policy, ref, positions = _flatten_inputs(policy_logits, ref_logits, mask)
    return _all_divergences(_Logits(policy), _Logits(ref), positions, cfg, output_embeddings)


def all_token_divergences_from_hidden(
    policy_hidden: Tensor,
    ref_hidden: Tensor,
    head_weight: Tensor,
    cfg: DivergenceConfig,
    output_embeddings: Tensor | None,
    *,
    ref_head_weight: Tensor | None = None,
    transform: LogitTransform = IDENTITY,
) -> dict[str, float]:
    """`all_token_divergences` over every row of (N × H) final hidden states, logits (`transform` of
    W h) formed a chunk at a time."""
    ref_head_weight = head_weight if ref_head_weight is None else ref_head_weight
    policy, ref, positions = _flatten_hidden(policy_hidden, ref_hidden, head_weight, ref_head_weight)
    return _all_divergences(
        _Logits(hidden=policy, weight=head_weight.detach(), transform=transform),
        _Logits(hidden=ref, weight=ref_head_weight.detach(), transform=transform),
        positions,
        cfg,
        output_embeddings,
    )
