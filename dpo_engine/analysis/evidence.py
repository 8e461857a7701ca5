"""Held-out comparisons of training methods over seeds and pairs, with honest intervals.

Every run of an evidence study is evaluated on the same held-out pairs (a fixed split), so a
method's result is a (seeds x pairs) table of per-pair values. Its uncertainty has two sources:
which seed trained the run, and which pairs happened to be held out. With a handful of seeds a
bootstrap over seeds is far too narrow (three seeds give ten distinct resamples, and never reach
beyond the observed seeds), so the interval is built from the two variances separately:

    statistic ± t(0.975, df) · sqrt(var_seeds / n_seeds + var_pairs)

`var_seeds` is the sample variance of the per-seed statistics; `var_pairs` is the bootstrap
variance of the seed-averaged statistic when only the held-out pairs are resampled (the same draw
for every seed, since the pairs are shared). df is Welch-Satterthwaite's for that sum: close to
n_seeds - 1 when the seed-to-seed spread dominates (a wide interval when seeds are few, as it
should be), close to n_pairs - 1 when pair sampling dominates (with one seed the seed term is
absent). Two methods are compared on the same pairs and seeds (paired).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

N_RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "per_seed": list(self.per_seed)}


def two_level_interval(
    statistic: Callable[[int, np.ndarray], float],
    n_seeds: int,
    n_pairs: int,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Interval of mean over seeds of statistic(seed, pair_rows), from the seed and pair variances."""
    if n_pairs < 2 or n_seeds < 1:
        raise ValueError(f"need at least 1 seed and 2 pairs, got {n_seeds} and {n_pairs}")
    every = np.arange(n_pairs)
    per_seed = np.array([statistic(s, every) for s in range(n_seeds)], dtype=float)
    point = float(per_seed.mean())
    draws = np.random.default_rng(seed).integers(0, n_pairs, (n_resamples, n_pairs))
    resampled = np.array([np.mean([statistic(s, rows) for s in range(n_seeds)]) for rows in draws])
    var_pairs = float(resampled.var(ddof=1))
    var_seeds = float(per_seed.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    total = var_seeds + var_pairs
    # Welch-Satterthwaite: the degrees of freedom of the sum follow whichever variance dominates
    denom = (var_seeds**2 / (n_seeds - 1) if n_seeds > 1 else 0.0) + var_pairs**2 / (n_pairs - 1)
    df = total**2 / denom if denom > 0 else n_pairs - 1
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * np.sqrt(total)
    return Interval(point, point - half, point + half, tuple(per_seed.tolist()))


def seeds_pairs_interval(table: np.ndarray, **kwargs) -> Interval:
    """Mean of a (seeds x pairs) table and its 95 % interval over seeds and pairs."""
    table = np.asarray(table, dtype=float)
    if table.ndim != 2:
        raise ValueError(f"need a (seeds x pairs) table, got shape {table.shape}")
    return two_level_interval(lambda s, rows: table[s, rows].mean(), *table.shape, **kwargs)


def paired_difference(a: np.ndarray, b: np.ndarray, **kwargs) -> Interval:
    """Mean of a - b for two (seeds x pairs) tables on the same pairs and seeds, with the same interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired tables differ in shape: {a.shape} vs {b.shape}")
    return seeds_pairs_interval(a - b, **kwargs)


Snapshots = list[tuple[np.ndarray, np.ndarray]]  # per seed: (chosen, rejected), each (pairs x k)


def dbs_change(
    first: Snapshots,
    last: Snapshots,
    *,
    baseline: tuple[Snapshots, Snapshots] | None = None,
    n_resamples: int = 200,
    seed: int = 0,
) -> Interval:
    """Change of the Davies-Bouldin score of chosen vs rejected representations from the first to
    the last snapshot, averaged over seeds, with the two-level interval. With `baseline` (another
    method's first and last snapshots on the same pairs and seeds), the change minus its change.

    Both snapshots are scored on the same pair draw: a draw repeats pairs, and repeated points
    shrink a cluster's scatter, which biases a resampled score low; in a change that bias largely
    cancels, and only the spread of the resampled changes is used."""
    from dpo_engine.analysis.dbs import davies_bouldin

    def change(snaps: tuple[Snapshots, Snapshots], s: int, rows: np.ndarray) -> float:
        (c1, r1), (c0, r0) = snaps[1][s], snaps[0][s]
        return davies_bouldin(c1[rows], r1[rows]) - davies_bouldin(c0[rows], r0[rows])

    def statistic(s: int, rows: np.ndarray) -> float:
        own = change((first, last), s, rows)
        return own - change(baseline, s, rows) if baseline is not None else own

    return two_level_interval(statistic, len(first), first[0][0].shape[0], n_resamples=n_resamples, seed=seed)
