"""The eight selection metrics of METHOD.md 1.2-1.3, and their bootstrap.

Everything is computed from a handful of per-pair quantities (distances dp, dn, the log-ratio,
the triangle ratio, the gap ratio) that are derived once from the embeddings. The bootstrap then
only re-weights those per-pair quantities, so 200 resamples of 100,000 pairs cost a few matrix
products instead of 200 passes over the embeddings.

Conventions decided here (METHOD.md leaves them open):
- Ratios carry ``EPS`` in numerator and denominator (PND's log-ratio and the scale normalisation
  ``dp~ = (dp + EPS) / (m + EPS)``), except TAT and NAG, whose numerators are differences or
  distances that must read 0 for a degenerate pair: with EPS on top, a pair whose three texts
  embed identically would score TAT = 1 and NAG = 1 (maximally separated / rejected-farther)
  instead of 0. They keep EPS in the denominator only; METHOD.md 1.1 is corrected here.
- Kurtosis of margins with zero spread (all margins equal) is reported as 3.0, the normal
  reference: such data has no tails, so the heavy-tail rule must not fire, and the value must
  never be NaN.
- Smoothness needs at least two chunks of at least ``MIN_CHUNK_PAIRS`` pairs, i.e. 40 pairs.
  Below that it is undefined: reported as ``None`` (JSON null), and any rule that needs it fails.
- Bootstrap resamples are stratified by chunk: each chunk of the file-order split is resampled
  with replacement within itself, so the chunk structure that smoothness measures survives the
  resampling. Every metric of a resample uses the same resample. The support-overlap histogram
  of a resample uses the bin edges of the full sample (a resample's values lie inside that range).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.stats
from pydantic import BaseModel, ConfigDict

EPS = 1e-6
N_BINS = 50
MAX_CHUNKS = 10
MIN_CHUNK_PAIRS = 20
KURTOSIS_IF_CONSTANT = 3.0
MIN_PAIRS = 2

Distance = Literal["cosine", "euclidean"]
DISTANCES: tuple[str, ...] = ("cosine", "euclidean")

KERNEL_METRICS: tuple[str, ...] = ("pnd", "pnav", "tat", "nag")
DIVERGENCE_METRICS: tuple[str, ...] = ("support_overlap", "drift_magnitude", "kurtosis", "smoothness")
METRIC_NAMES: tuple[str, ...] = KERNEL_METRICS + DIVERGENCE_METRICS


class SelectionMetrics(BaseModel):
    """The eight metrics of one dataset (or one bootstrap resample)."""

    model_config = ConfigDict(frozen=True)

    pnd: float
    pnav: float
    tat: float
    nag: float
    support_overlap: float
    drift_magnitude: float
    kurtosis: float
    smoothness: float | None

    def as_row(self) -> np.ndarray:
        """Values in METRIC_NAMES order; an undefined smoothness becomes NaN."""
        return np.array(
            [np.nan if getattr(self, k) is None else getattr(self, k) for k in METRIC_NAMES], dtype=np.float64
        )

    @classmethod
    def from_row(cls, row: np.ndarray) -> "SelectionMetrics":
        values = {k: float(v) for k, v in zip(METRIC_NAMES, row)}
        if not np.isfinite(values["smoothness"]):
            values["smoothness"] = None
        return cls(**values)


@dataclass(frozen=True)
class PairQuantities:
    """Per-pair quantities every metric is a (weighted) function of."""

    dp: np.ndarray  # d(prompt, chosen), clipped at 0
    dn: np.ndarray  # d(prompt, rejected), clipped at 0
    log_ratio: np.ndarray  # log((dp + EPS) / (dn + EPS))
    tat: np.ndarray  # ||c - r|| / (||c - p|| + ||r - p|| + EPS), in [0, 1]
    nag: np.ndarray  # (dn - dp) / (dn + dp + EPS), in [-1, 1]

    @property
    def n(self) -> int:
        return int(self.dp.shape[0])

    @property
    def raw_margin(self) -> np.ndarray:
        """dn - dp: the margin before scale normalisation (kurtosis and W1 shapes only need this)."""
        return self.dn - self.dp

    @property
    def scale(self) -> float:
        """m + EPS, with m the mean of all dp and dn values."""
        return float((self.dp.mean() + self.dn.mean()) / 2.0) + EPS

    @property
    def margin(self) -> np.ndarray:
        """Scale-normalised margins s_i = dn~_i - dp~_i."""
        return self.raw_margin / self.scale


def _check_embeddings(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(a) for a in (prompt, chosen, rejected)]
    arrays = [a if a.dtype in (np.float32, np.float64) else a.astype(np.float64) for a in arrays]
    for name, a in zip(("prompt", "chosen", "rejected"), arrays):
        if a.ndim != 2:
            raise ValueError(f"{name} embeddings must be a 2-D array (n_pairs x dim), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} embeddings contain NaN or infinite values")
    if not (arrays[0].shape == arrays[1].shape == arrays[2].shape):
        raise ValueError(
            "prompt, chosen and rejected embeddings must have the same shape, got "
            f"{arrays[0].shape}, {arrays[1].shape}, {arrays[2].shape}"
        )
    if arrays[0].shape[0] < MIN_PAIRS:
        raise ValueError(f"diagnosis needs at least {MIN_PAIRS} pairs, got {arrays[0].shape[0]}")
    return tuple(arrays)


def _row_norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x)).astype(np.float64)


def row_distance(a: np.ndarray, b: np.ndarray, distance: Distance = "cosine") -> np.ndarray:
    """d(a_i, b_i) for each row: 1 - cos (cosine) or ||a - b|| (euclidean), clipped at 0.

    Computed in the inputs' precision (float32 embeddings stay float32 for speed), returned as float64.
    """
    if distance == "cosine":
        norms = _row_norm(a) * _row_norm(b)
        if np.any(norms == 0):
            raise ValueError("cosine distance is undefined for an all-zero embedding")
        d = 1.0 - np.einsum("ij,ij->i", a, b).astype(np.float64) / norms
    elif distance == "euclidean":
        d = _row_norm(a - b)
    else:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return np.clip(d, 0.0, None)


def pair_quantities(
    prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, distance: Distance = "cosine"
) -> PairQuantities:
    """Derive the per-pair quantities from n x dim embeddings (rows in dataset order)."""
    p, c, r = _check_embeddings(prompt, chosen, rejected)
    dp = row_distance(p, c, distance)
    dn = row_distance(p, r, distance)
    cr, cp, rp = _row_norm(c - r), _row_norm(c - p), _row_norm(r - p)
    return PairQuantities(
        dp=dp,
        dn=dn,
        log_ratio=np.log((dp + EPS) / (dn + EPS)),
        tat=cr / (cp + rp + EPS),
        nag=(dn - dp) / (dn + dp + EPS),
    )


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """File-order chunks for smoothness: T = min(10, n // 20) near-equal chunks; one chunk below 40 pairs."""
    t = min(MAX_CHUNKS, n // MIN_CHUNK_PAIRS)
    if t < 2:
        return [(0, n)]
    edges = np.linspace(0, n, t + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def chunk_wasserstein(margins: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """W1 between consecutive chunks' margins (length T - 1; empty when there is one chunk)."""
    return np.array(
        [
            scipy.stats.wasserstein_distance(margins[a0:a1], margins[b0:b1])
            for (a0, a1), (b0, b1) in zip(bounds[:-1], bounds[1:])
        ],
        dtype=np.float64,
    )


def overlap_histograms(dp: np.ndarray, dn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges and counts of P = 1 - dp and Q = 1 - dn on 50 equal bins over the pooled range."""
    sim_p, sim_q = 1.0 - dp, 1.0 - dn
    lo = float(min(sim_p.min(), sim_q.min()))
    hi = float(max(sim_p.max(), sim_q.max()))
    if hi <= lo:  # every value identical: one point mass, widen so numpy can bin it
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, N_BINS + 1)
    p_counts, _ = np.histogram(sim_p, bins=edges)
    q_counts, _ = np.histogram(sim_q, bins=edges)
    return edges, p_counts.astype(np.float64), q_counts.astype(np.float64)


def weighted_jaccard(p: np.ndarray, q: np.ndarray) -> float:
    """sum min(p, q) / sum max(p, q) of two normalised histograms (1 when both are empty)."""
    p = p / p.sum() if p.sum() > 0 else p
    q = q / q.sum() if q.sum() > 0 else q
    den = np.maximum(p, q).sum()
    return float(np.minimum(p, q).sum() / den) if den > 0 else 1.0


def pearson_kurtosis(x: np.ndarray) -> float:
    """Pearson kurtosis (normal = 3) via scipy; 3.0 when the values have no spread."""
    if np.ptp(x) == 0:
        return KURTOSIS_IF_CONSTANT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        k = float(scipy.stats.kurtosis(x, fisher=False, bias=True))
    return k if np.isfinite(k) else KURTOSIS_IF_CONSTANT


def compute_metrics(q: PairQuantities) -> SelectionMetrics:
    """The eight metrics of METHOD.md 1.2-1.3 from per-pair quantities."""
    scale = q.scale
    dp_t = (q.dp + EPS) / scale
    dn_t = (q.dn + EPS) / scale
    margins = dn_t - dp_t
    _, p_counts, q_counts = overlap_histograms(q.dp, q.dn)
    bounds = chunk_bounds(q.n)
    w1 = chunk_wasserstein(margins, bounds)
    return SelectionMetrics(
        pnd=float(q.log_ratio.mean()),
        pnav=float(np.mean((dp_t - dn_t) ** 2)),
        tat=float(q.tat.mean()),
        nag=float(q.nag.mean()),
        support_overlap=weighted_jaccard(p_counts, q_counts),
        drift_magnitude=float(abs(np.mean(dp_t - dn_t))),
        kurtosis=pearson_kurtosis(margins),
        smoothness=float(w1.mean()) if w1.size else None,
    )


def bootstrap_counts(bounds: list[tuple[int, int]], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity of every pair in each resample (n_resamples x n), stratified by chunk."""
    n = bounds[-1][1]
    idx = np.concatenate([rng.integers(a, b, size=(n_resamples, b - a)) for a, b in bounds], axis=1)
    flat = idx + (np.arange(n_resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def weighted_metrics(q: PairQuantities, counts: np.ndarray) -> np.ndarray:
    """Metrics of resamples given as pair multiplicities (rows of ``counts``): (n_resamples x 8).

    With all counts equal to one this reproduces ``compute_metrics`` (a test checks it).
    """
    counts = np.atleast_2d(counts)
    b, n = counts.shape
    if n != q.n:
        raise ValueError(f"counts have {n} columns for {q.n} pairs")
    weights = counts / counts.sum(axis=1, keepdims=True)
    raw = q.raw_margin
    centre, spread = raw.mean(), raw.std()
    z = (raw - centre) / spread if spread > 0 else np.zeros_like(raw)
    features = np.column_stack(
        [q.log_ratio, q.tat, q.nag, q.dp + q.dn, (q.dp - q.dn) ** 2, q.dp - q.dn, z, z**2, z**3, z**4]
    )
    means = weights @ features
    scale = means[:, 3] / 2.0 + EPS
    out = np.empty((b, len(METRIC_NAMES)), dtype=np.float64)
    out[:, 0] = means[:, 0]
    out[:, 1] = means[:, 4] / scale**2
    out[:, 2] = means[:, 1]
    out[:, 3] = means[:, 2]
    out[:, 5] = np.abs(means[:, 5]) / scale

    mu1, mu2, mu3, mu4 = means[:, 6], means[:, 7], means[:, 8], means[:, 9]
    m2 = mu2 - mu1**2
    m4 = mu4 - 4 * mu1 * mu3 + 6 * mu1**2 * mu2 - 3 * mu1**4
    tiny = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 6] = np.where(m2 > tiny, m4 / np.where(m2 > tiny, m2, 1.0) ** 2, KURTOSIS_IF_CONSTANT)

    edges, _, _ = overlap_histograms(q.dp, q.dn)
    inner = edges[1:-1]
    bin_p = np.searchsorted(inner, 1.0 - q.dp, side="right")
    bin_q = np.searchsorted(inner, 1.0 - q.dn, side="right")
    rows = (np.arange(b) * N_BINS)[:, None]
    hist_p = np.bincount((rows + bin_p).ravel(), weights=weights.ravel(), minlength=b * N_BINS).reshape(b, N_BINS)
    hist_q = np.bincount((rows + bin_q).ravel(), weights=weights.ravel(), minlength=b * N_BINS).reshape(b, N_BINS)
    out[:, 4] = np.minimum(hist_p, hist_q).sum(axis=1) / np.maximum(hist_p, hist_q).sum(axis=1)

    bounds = chunk_bounds(n)
    if len(bounds) < 2:
        out[:, 7] = np.nan
    else:
        w1_sum = np.zeros(b)
        for (a0, a1), (b0, b1) in zip(bounds[:-1], bounds[1:]):
            values = np.concatenate([raw[a0:a1], raw[b0:b1]])
            order = np.argsort(values, kind="stable")
            wa = counts[:, a0:a1] / counts[:, a0:a1].sum(axis=1, keepdims=True)
            wb = counts[:, b0:b1] / counts[:, b0:b1].sum(axis=1, keepdims=True)
            signed = np.concatenate([wa, -wb], axis=1)[:, order]
            cdf_gap = np.cumsum(signed, axis=1)[:, :-1]
            w1_sum += np.abs(cdf_gap) @ np.diff(values[order])
        out[:, 7] = w1_sum / (len(bounds) - 1) / scale
    return out


def bootstrap_metrics(q: PairQuantities, n_bootstrap: int = 200, seed: int = 0, block: int = 25) -> np.ndarray:
    """Metrics of ``n_bootstrap`` seeded, chunk-stratified resamples (n_bootstrap x 8; NaN = undefined)."""
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    bounds = chunk_bounds(q.n)
    parts = []
    for start in range(0, n_bootstrap, block):
        size = min(block, n_bootstrap - start)
        parts.append(weighted_metrics(q, bootstrap_counts(bounds, size, rng)))
    return np.concatenate(parts) if parts else np.empty((0, len(METRIC_NAMES)))
