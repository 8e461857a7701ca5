"""The eight selection metrics of METHOD.md 1.2-1.3, and their bootstrap.

Every metric is an estimator of a quantity of the data distribution, not of the sample size: its
expectation moves with n only by O(1/n) (METHOD.md 1.3 derives each one). Everything is computed
from a handful of per-pair quantities (distances dp, dn, the log-ratio, the triangle ratio, the gap
ratio) derived once from the embeddings; a bootstrap resample is a vector of pair multiplicities,
so 200 resamples cost a few matrix products instead of 200 passes over the embeddings, and the
point estimate is the same function at multiplicity one (`weighted_metrics` serves both).

Estimators (METHOD.md 1.3 and its departures table):
- support overlap: weighted Jaccard ``int min(f, g) / int max(f, g)`` of Gaussian kernel density
  estimates of P = 1 - dp and Q = 1 - dn, each with Silverman's rule-of-thumb bandwidth, evaluated
  by linear binning on a fine grid (numerical integration). Resamples reuse the full sample's
  bandwidths and grid, so a resample's density is unbiased for the sample's density.
- drift magnitude: ``sqrt(max(0, mean^2 - var / n))`` of the scale-normalised gaps dp~ - dn~ (an
  unbiased estimate of the squared mean, then its root), instead of ``|mean|`` whose noise floor
  sigma * sqrt(2 / (pi n)) falls with n.
- kurtosis: the adjusted (``bias=False``) Pearson kurtosis of the margins.
- smoothness: mean over consecutive file-order chunks of the unbiased energy distance
  ``2 int (F_t - F_t+1)^2`` between the chunks' margin distributions: the plug-in value minus its
  exact expectation when the file order carries no information, so exchangeable data read 0 at
  every n and drifting data read the drift.
- PND, PNAV, TAT, NAG: means of per-pair quantities (unbiased, or O(1/n) through the scale m).
Bootstrap resamples get a second application of the same small-sample corrections (the
resample's own noise floor is subtracted once more), so the bootstrap distribution is centred on
the point estimate (tested on the HH sample).

Conventions decided here (METHOD.md leaves them open):
- Ratios carry ``EPS`` in numerator and denominator (PND's log-ratio and the scale normalisation
  ``dp~ = (dp + EPS) / (m + EPS)``), except TAT and NAG, whose numerators are differences or
  distances that must read 0 for a degenerate pair: with EPS on top, a pair whose three texts
  embed identically would score TAT = 1 and NAG = 1 (maximally separated / rejected-farther)
  instead of 0. They keep EPS in the denominator only; METHOD.md 1.1 is corrected here.
- Kurtosis of margins with zero spread (all margins equal), or of fewer than 4 pairs, is reported
  as 3.0, the normal reference: such data has no tails, so the heavy-tail rule must not fire, and
  the value must never be NaN.
- Smoothness needs at least two chunks of at least ``MIN_CHUNK_PAIRS`` pairs, i.e. 40 pairs.
  Below that it is undefined: reported as ``None`` (JSON null), and any rule that needs it fails.
- Bootstrap resamples are stratified by chunk: each chunk of the file-order split is resampled
  with replacement within itself, so the chunk structure that smoothness measures survives the
  resampling. Every metric of a resample uses the same resample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.signal
import scipy.sparse
import scipy.stats
from pydantic import BaseModel, ConfigDict

EPS = 1e-6
N_BINS = 50  # histogram bins of the overlap figure (the metric itself uses the KDE grid)
KDE_GRID = 2048  # grid points of the overlap's numerical integration
KDE_REACH = 5.0  # the grid extends this many bandwidths past the data
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
    """Plug-in W1 between consecutive chunks' margins (length T - 1): descriptive, for the figure."""
    return np.array(
        [
            scipy.stats.wasserstein_distance(margins[a0:a1], margins[b0:b1])
            for (a0, a1), (b0, b1) in zip(bounds[:-1], bounds[1:])
        ],
        dtype=np.float64,
    )


def _chunk_energy_terms(values: np.ndarray, counts: np.ndarray, first: tuple[int, int], second: tuple[int, int]):
    """Weighted 1-D energy terms of two chunks, per row of ``counts`` (pair multiplicities).

    Returns (V, W_a, W_b, m_a, m_b): V = 2 int (F_a - F_b)^2 (the plug-in energy distance, i.e.
    ``scipy.stats.energy_distance`` squared), W = 2 int F (1 - F) = the plug-in mean absolute
    difference of one chunk, m = the chunk's size.
    """
    (a0, a1), (b0, b1) = first, second
    merged = np.concatenate([values[a0:a1], values[b0:b1]])
    order = np.argsort(merged, kind="stable")
    steps = np.diff(merged[order])
    ca, cb = counts[:, a0:a1], counts[:, b0:b1]
    wa = ca / ca.sum(axis=1, keepdims=True)
    wb = cb / cb.sum(axis=1, keepdims=True)
    zeros_a, zeros_b = np.zeros_like(wb), np.zeros_like(wa)
    cdf_a = np.cumsum(np.concatenate([wa, zeros_a], axis=1)[:, order], axis=1)[:, :-1]
    cdf_b = np.cumsum(np.concatenate([zeros_b, wb], axis=1)[:, order], axis=1)[:, :-1]
    v = 2.0 * ((cdf_a - cdf_b) ** 2) @ steps
    w_a = 2.0 * (cdf_a * (1.0 - cdf_a)) @ steps
    w_b = 2.0 * (cdf_b * (1.0 - cdf_b)) @ steps
    return v, w_a, w_b, a1 - a0, b1 - b0


def energy_drift(values: np.ndarray, counts: np.ndarray, bounds: list[tuple[int, int]], resample: bool) -> np.ndarray:
    """Mean over consecutive chunks of the unbiased energy distance of their values (per row of counts).

    Point estimate: U = V - W_a / (m_a - 1) - W_b / (m_b - 1), the U-statistic of
    2 E|X - Y| - E|X - X'| - E|Y - Y'|; its expectation is exactly 0 when the two chunks are drawn
    from one distribution (exchangeable file order), whatever their size. A bootstrap resample
    drawn from the sample has expectation V (not U), so it subtracts the noise floor once more,
    with its own unbiased estimate: the resample values are then centred on U.
    """
    if len(bounds) < 2:
        return np.full(counts.shape[0], np.nan)
    total = np.zeros(counts.shape[0])
    for first, second in zip(bounds[:-1], bounds[1:]):
        v, w_a, w_b, m_a, m_b = _chunk_energy_terms(values, counts, first, second)
        floor = w_a / (m_a - 1) + w_b / (m_b - 1)
        if resample:
            floor = floor + m_a * w_a / (m_a - 1) ** 2 + m_b * w_b / (m_b - 1) ** 2
        total += v - floor
    return total / (len(bounds) - 1)


def chunk_energy(margins: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Unbiased energy distance between each pair of consecutive chunks (length T - 1), for the figure."""
    ones = np.ones((1, margins.shape[0]))
    out = []
    for first, second in zip(bounds[:-1], bounds[1:]):
        v, w_a, w_b, m_a, m_b = _chunk_energy_terms(margins, ones, first, second)
        out.append(float(v[0] - w_a[0] / (m_a - 1) - w_b[0] / (m_b - 1)))
    return np.array(out, dtype=np.float64)


def overlap_histograms(dp: np.ndarray, dn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges and counts of P = 1 - dp and Q = 1 - dn on 50 equal bins over the pooled range (figure only)."""
    sim_p, sim_q = 1.0 - dp, 1.0 - dn
    lo = float(min(sim_p.min(), sim_q.min()))
    hi = float(max(sim_p.max(), sim_q.max()))
    if hi <= lo:  # every value identical: one point mass, widen so numpy can bin it
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, N_BINS + 1)
    p_counts, _ = np.histogram(sim_p, bins=edges)
    q_counts, _ = np.histogram(sim_q, bins=edges)
    return edges, p_counts.astype(np.float64), q_counts.astype(np.float64)


def silverman_bandwidth(x: np.ndarray) -> float:
    """0.9 min(sd, IQR / 1.349) n^(-1/5); the sd alone when the IQR is 0; a tiny positive floor."""
    n = x.shape[0]
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25])
    iqr = float(q75 - q25) / 1.349
    spread = min(sd, iqr) if iqr > 0 else sd
    scale = max(1.0, float(np.abs(x).max()))
    return max(0.9 * spread * n ** (-0.2), 1e-6 * scale)


def _gaussian_on_grid(mass: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """Convolve binned masses (rows x G) with a N(0, h^2) density: a KDE evaluated on the grid."""
    step = grid[1] - grid[0]
    reach = int(np.ceil(KDE_REACH * h / step))
    offsets = np.arange(-reach, reach + 1) * step
    kernel = np.exp(-0.5 * (offsets / h) ** 2) / (h * np.sqrt(2 * np.pi))
    return scipy.signal.fftconvolve(mass, kernel[None, :], mode="same", axes=1)


def _linear_bins(x: np.ndarray, grid: np.ndarray) -> scipy.sparse.csr_matrix:
    """(n x G) linear-binning weights: each value's unit mass split between its two grid neighbours."""
    step = grid[1] - grid[0]
    pos = (x - grid[0]) / step
    left = np.clip(np.floor(pos).astype(np.int64), 0, grid.shape[0] - 2)
    frac = np.clip(pos - left, 0.0, 1.0)
    rows = np.repeat(np.arange(x.shape[0]), 2)
    cols = np.column_stack([left, left + 1]).ravel()
    vals = np.column_stack([1.0 - frac, frac]).ravel()
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(x.shape[0], grid.shape[0]))


def _kde(x: np.ndarray, weights: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """Weighted Gaussian KDEs of ``x`` on the grid, one per row of ``weights`` (rows sum to 1)."""
    mass = np.asarray((_linear_bins(x, grid).T @ weights.T).T)
    return _gaussian_on_grid(mass, grid, h)


def _normal_pdf(x: np.ndarray, var: float | np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x**2 / var) / np.sqrt(2 * np.pi * var)


@dataclass(frozen=True)
class OverlapEstimator:
    """Support overlap of P = 1 - dp and Q = 1 - dn as the weighted Jaccard of their KDEs.

    Fixed by the full sample: the integration grid, Silverman bandwidths and the plug-in bias of
    the overlap integral. Where the two densities cross, the estimated curves are noisy and
    ``min(f^, g^)`` is smaller on average than ``min(f, g)``: with d = f^ - g^ ~ N(D, s^2) per grid
    point, E min = (f + g) / 2 - E|d| / 2, so the integral is biased by
    beta = sum (|D| - E|d|) / 2 * step, with E|d| = s sqrt(2/pi) exp(-D^2 / 2s^2) + D (1 - 2 Phi(-D/s)).
    s^2 = var f^ + var g^ - 2 cov(f^, g^) is the exact sampling variance of KDEs of n pairs
    (var f^(x) = (mean_i K_h(x - p_i)^2 - f^(x)^2) / n, the covariance likewise over each pair's
    p_i, q_i), and each of its terms is itself a KDE (products of Gaussians are Gaussians), so it
    is evaluated on the same grid. The point estimate subtracts beta; a resample, whose own
    min-noise adds about beta again, subtracts 2 beta.
    """

    grid: np.ndarray
    sim_p: np.ndarray
    sim_q: np.ndarray
    h_p: float
    h_q: float
    bias: float

    @classmethod
    def of(cls, sim_p: np.ndarray, sim_q: np.ndarray) -> "OverlapEstimator":
        n = sim_p.shape[0]
        h_p, h_q = silverman_bandwidth(sim_p), silverman_bandwidth(sim_q)
        lo = min(sim_p.min() - KDE_REACH * h_p, sim_q.min() - KDE_REACH * h_q)
        hi = max(sim_p.max() + KDE_REACH * h_p, sim_q.max() + KDE_REACH * h_q)
        grid = np.linspace(lo, hi, KDE_GRID)
        step = grid[1] - grid[0]
        uniform = np.full((1, n), 1.0 / n)
        f = _kde(sim_p, uniform, grid, h_p)[0]
        g = _kde(sim_q, uniform, grid, h_q)[0]
        # mean_i K_h(x - p_i)^2 = KDE with bandwidth h / sqrt(2), times 1 / (2 h sqrt(pi)).
        f2 = _kde(sim_p, uniform, grid, h_p / np.sqrt(2))[0] / (2 * h_p * np.sqrt(np.pi))
        g2 = _kde(sim_q, uniform, grid, h_q / np.sqrt(2))[0] / (2 * h_q * np.sqrt(np.pi))
        # mean_i K_hp(x - p_i) K_hq(x - q_i): Gaussians at m_i with variance s2, weights c_i.
        var_sum = h_p**2 + h_q**2
        centres = (sim_p * h_q**2 + sim_q * h_p**2) / var_sum
        s2 = h_p**2 * h_q**2 / var_sum
        c = _normal_pdf(sim_p - sim_q, var_sum)
        fg = _kde(centres, c[None, :] / n, grid, float(np.sqrt(s2)))[0]
        var_d = np.clip((f2 - f**2 + g2 - g**2 - 2 * (fg - f * g)) / n, 0.0, None)
        sd = np.sqrt(var_d)
        gap = f - g
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(sd > 0, gap / np.where(sd > 0, sd, 1.0), np.sign(gap) * np.inf)
        expected_abs = np.where(
            sd > 0,
            sd * np.sqrt(2 / np.pi) * np.exp(-0.5 * np.minimum(ratio**2, 700.0))
            + gap * (1 - 2 * scipy.stats.norm.cdf(-ratio)),
            np.abs(gap),
        )
        bias = float(np.sum(np.abs(gap) - expected_abs) / 2 * step)
        return cls(grid=grid, sim_p=sim_p, sim_q=sim_q, h_p=h_p, h_q=h_q, bias=bias)

    def densities(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """KDEs of P and Q on the grid for each row of ``weights`` (rows sum to 1)."""
        f = _kde(self.sim_p, weights, self.grid, self.h_p)
        g = _kde(self.sim_q, weights, self.grid, self.h_q)
        return np.clip(f, 0.0, None), np.clip(g, 0.0, None)

    def jaccard(self, weights: np.ndarray, resample: bool) -> np.ndarray:
        """Bias-corrected int min(f, g) / int max(f, g), per row of ``weights``, clipped to [0, 1]."""
        f, g = self.densities(weights)
        step = self.grid[1] - self.grid[0]
        both = np.minimum(f, g).sum(axis=1) * step
        total = (f.sum(axis=1) + g.sum(axis=1)) * step
        both = both - (2.0 if resample else 1.0) * self.bias
        both = np.clip(both, 0.0, total / 2.0)
        return np.where(total > 0, both / np.where(total > 0, total - both, 1.0), 1.0)


def adjusted_kurtosis(g2: np.ndarray, n: int) -> np.ndarray:
    """Pearson kurtosis from the plug-in excess g2 with the small-sample adjustment (scipy's bias=False)."""
    if n < 4:
        return g2 + 3.0
    return ((n + 1) * g2 + 6.0) * (n - 1) / ((n - 2) * (n - 3)) + 3.0


def pearson_kurtosis(x: np.ndarray) -> float:
    """Adjusted Pearson kurtosis (normal = 3) via scipy; 3.0 when the values have no spread."""
    if np.ptp(x) == 0 or x.shape[0] < 4:
        return KURTOSIS_IF_CONSTANT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        k = float(scipy.stats.kurtosis(x, fisher=False, bias=False))
    return k if np.isfinite(k) else KURTOSIS_IF_CONSTANT


def weighted_metrics(q: PairQuantities, counts: np.ndarray, resample: bool = True) -> np.ndarray:
    """Metrics of samples given as pair multiplicities (rows of ``counts``): (rows x 8), METRIC_NAMES order.

    ``resample=False`` with all counts one is the point estimate (`compute_metrics`).
    ``resample=True`` treats each row as a bootstrap resample of the sample and applies the
    small-sample corrections a second time, so the resamples are centred on the point estimate.
    """
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    b, n = counts.shape
    if n != q.n:
        raise ValueError(f"counts have {n} columns for {q.n} pairs")
    weights = counts / counts.sum(axis=1, keepdims=True)
    raw = q.raw_margin
    centre, spread = raw.mean(), raw.std()
    z = (raw - centre) / spread if spread > 0 else np.zeros_like(raw)
    features = np.column_stack(
        [q.log_ratio, q.tat, q.nag, q.dp + q.dn, (q.dp - q.dn) ** 2, q.dp - q.dn, z, z**2, z**3, z**4, raw**2]
    )
    means = weights @ features
    scale = means[:, 3] / 2.0 + EPS
    out = np.empty((b, len(METRIC_NAMES)), dtype=np.float64)
    out[:, 0] = means[:, 0]
    out[:, 1] = means[:, 4] / scale**2
    out[:, 2] = means[:, 1]
    out[:, 3] = means[:, 2]

    # Drift: unbiased squared mean of the normalised gaps, then its root (clipped at 0).
    mean_gap = means[:, 5] / scale
    var_gap = np.clip(means[:, 10] - means[:, 5] ** 2, 0.0, None) / scale**2
    noise = var_gap / (n - 1) if n > 1 else np.zeros(b)
    if resample and n > 1:
        noise = noise + n * var_gap / (n - 1) ** 2
    out[:, 5] = np.sqrt(np.clip(mean_gap**2 - noise, 0.0, None))

    mu1, mu2, mu3, mu4 = means[:, 6], means[:, 7], means[:, 8], means[:, 9]
    m2 = mu2 - mu1**2
    m4 = mu4 - 4 * mu1 * mu3 + 6 * mu1**2 * mu2 - 3 * mu1**4
    tiny = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        g2 = np.where(m2 > tiny, m4 / np.where(m2 > tiny, m2, 1.0) ** 2 - 3.0, 0.0)
    kurt = adjusted_kurtosis(g2, n)
    if resample:
        kurt = adjusted_kurtosis(kurt - 3.0, n)
    out[:, 6] = np.where((m2 > tiny) & (n >= 4), kurt, KURTOSIS_IF_CONSTANT)

    out[:, 4] = OverlapEstimator.of(1.0 - q.dp, 1.0 - q.dn).jaccard(weights, resample)
    out[:, 7] = energy_drift(raw, counts, chunk_bounds(n), resample) / scale
    return out


def compute_metrics(q: PairQuantities) -> SelectionMetrics:
    """The eight metrics of METHOD.md 1.2-1.3 from per-pair quantities."""
    return SelectionMetrics.from_row(weighted_metrics(q, np.ones((1, q.n)), resample=False)[0])


def bootstrap_counts(bounds: list[tuple[int, int]], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity of every pair in each resample (n_resamples x n), stratified by chunk."""
    n = bounds[-1][1]
    idx = np.concatenate([rng.integers(a, b, size=(n_resamples, b - a)) for a, b in bounds], axis=1)
    flat = idx + (np.arange(n_resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def bootstrap_metrics(q: PairQuantities, n_bootstrap: int = 200, seed: int = 0, block: int = 25) -> np.ndarray:
    """Metrics of ``n_bootstrap`` seeded, chunk-stratified resamples (n_bootstrap x 8; NaN = undefined)."""
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    bounds = chunk_bounds(q.n)
    parts = []
    for start in range(0, n_bootstrap, block):
        size = min(block, n_bootstrap - start)
        parts.append(weighted_metrics(q, bootstrap_counts(bounds, size, rng), resample=True))
    return np.concatenate(parts) if parts else np.empty((0, len(METRIC_NAMES)))
