"""Held-out comparisons of training methods over seeds and pairs, with honest intervals.

Every run of an evidence study is evaluated on the same held-out pairs (a fixed split), so a
method's result is a (seeds x pairs) table of per-pair reward margins. Its uncertainty has two
sources: which pairs happened to be held out and which seed trained the run. The interval is a
two-level percentile bootstrap: resample seeds with replacement, then pairs with replacement
(the same pair draw for every seed, since the pairs are shared), and take the mean. Two methods
are compared on the same draws (paired), which is what makes a small difference detectable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 4000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _draws(n_seeds: int, n_pairs: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, (n_resamples, n_seeds)), rng.integers(0, n_pairs, (n_resamples, n_pairs))


def _resampled_means(table: np.ndarray, seeds_idx: np.ndarray, pairs_idx: np.ndarray) -> np.ndarray:
    pair_means = np.stack([table[:, p].mean(axis=1) for p in pairs_idx])  # resamples x seeds
    return np.take_along_axis(pair_means, seeds_idx, axis=1).mean(axis=1)


def seeds_pairs_interval(table: np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """Mean of a (seeds x pairs) table and its two-level percentile bootstrap 95 % interval."""
    table = np.asarray(table, dtype=float)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"need a (seeds x pairs) table with at least 2 pairs, got shape {table.shape}")
    s_idx, p_idx = _draws(*table.shape, n_resamples, seed)
    means = _resampled_means(table, s_idx, p_idx)
    alpha = (1 - CONFIDENCE) / 2
    return Interval(float(table.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_difference(a: np.ndarray, b: np.ndarray, **kwargs) -> Interval:
    """Mean of a - b for two (seeds x pairs) tables on the same pairs and seeds, with the same interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired tables differ in shape: {a.shape} vs {b.shape}")
    return seeds_pairs_interval(a - b, **kwargs)


def dbs_change(first: list[tuple[np.ndarray, np.ndarray]], last: list[tuple[np.ndarray, np.ndarray]], *,
               n_resamples: int = 400, seed: int = 0) -> Interval:
    """Change of the Davies-Bouldin score of chosen vs rejected representations from the first to
    the last snapshot, averaged over seeds (one (chosen, rejected) pair of (pairs x k) arrays per
    seed and snapshot, same pairs), with a bootstrap interval over seeds and pairs.

    The score itself is not bootstrapped: a resample repeats pairs, and repeated points shrink
    the clusters' scatter, so resampled scores sit below the full-sample one. Both snapshots are
    scored on the same draw, so that shrinkage largely cancels in their difference."""
    from dpo_engine.analysis.dbs import davies_bouldin

    def change(s: int, rows) -> float:
        return davies_bouldin(last[s][0][rows], last[s][1][rows]) - davies_bouldin(first[s][0][rows], first[s][1][rows])

    n_seeds, n_pairs = len(first), first[0][0].shape[0]
    everything = np.arange(n_pairs)
    point = float(np.mean([change(s, everything) for s in range(n_seeds)]))
    s_idx, p_idx = _draws(n_seeds, n_pairs, n_resamples, seed)
    means = np.array([np.mean([change(s, p) for s in ss]) for ss, p in zip(s_idx, p_idx)])
    alpha = (1 - CONFIDENCE) / 2
    return Interval(point, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
