"""How well a linear probe tells chosen from rejected representations, on held-out folds (METHOD.md 3).

The Davies-Bouldin score needs training to read; "a straight line separates chosen from rejected
answers in x % of held-out cases" does not. The probe is a logistic regression on standardised
features, cross-validated over pairs: a pair's chosen and rejected vectors always fall into the same
fold, so a probe is never tested on the partner of a vector it was fitted on (the two share the
prompt, and keeping them apart would flatter the probe). The accuracy pools the out-of-fold
predictions; its 95 % interval is Wilson's with one trial per pair (the two predictions of a pair
are not independent, and a pair's mean correctness varies no more than one Bernoulli trial does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

FOLDS = 5
SEED = 0
CONFIDENCE = 0.95
MAX_ITER = 1000


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    low: float
    high: float
    n_pairs: int
    folds: int


def pair_folds(n_pairs: int, folds: int = FOLDS, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) over the stacked [chosen; rejected] rows, pairs shuffled once with `seed`
    and kept together: row i is pair i's chosen vector, row n_pairs + i its rejected one."""
    if n_pairs < 2:
        raise ValueError(f"a cross-validated probe needs at least 2 pairs, got {n_pairs}")
    k = min(folds, n_pairs)
    order = np.random.default_rng(seed).permutation(n_pairs)
    out = []
    for held in np.array_split(order, k):
        mask = np.zeros(n_pairs, dtype=bool)
        mask[held] = True
        test = np.flatnonzero(np.r_[mask, mask])
        out.append((np.flatnonzero(~np.r_[mask, mask]), test))
    return out


def probe_model(seed: int = SEED):
    """Standardise, then an L2-regularised logistic regression (C = 1). liblinear, because on real
    representations (nearly separable, as many dimensions as points) lbfgs needs several times longer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(solver="liblinear", max_iter=MAX_ITER, random_state=seed))


def stacked(chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [chosen; rejected] as float32 and labels 1 (chosen) / 0 (rejected)."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must both be (n x k), got {chosen.shape} and {rejected.shape}")
    x = np.concatenate([chosen, rejected]).astype(np.float32)
    y = np.r_[np.ones(len(chosen), dtype=int), np.zeros(len(rejected), dtype=int)]
    return x, y


def wilson(share: float, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a share observed over `trials` trials (the share need not be k/trials)."""
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    denom = 1 + z**2 / trials
    centre = (share + z**2 / (2 * trials)) / denom
    half = z * np.sqrt(share * (1 - share) / trials + z**2 / (4 * trials**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def linear_probe(chosen: np.ndarray, rejected: np.ndarray, *, folds: int = FOLDS, seed: int = SEED) -> ProbeResult:
    """Out-of-fold accuracy of the probe on the given vectors (float16 snapshots are upcast), with its interval."""
    x, y = stacked(chosen, rejected)
    n_pairs = len(chosen)
    splits = pair_folds(n_pairs, folds, seed)
    correct = np.zeros(len(y), dtype=bool)
    for train, test in splits:
        model = probe_model(seed).fit(x[train], y[train])
        correct[test] = model.predict(x[test]) == y[test]
    accuracy = float(correct.mean())
    low, high = wilson(accuracy, n_pairs)
    return ProbeResult(accuracy, low, high, n_pairs, len(splits))


def separation(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """How far apart chosen and rejected representations are (names.SEPARATION_METRICS): the
    Davies-Bouldin score and the linear probe with its interval. Training computes it on the stored
    float16 snapshot and the pages recompute it from that file with this same function."""
    from dpo_engine.analysis.dbs import davies_bouldin

    probe = linear_probe(chosen, rejected)
    return {
        "dbs": davies_bouldin(chosen, rejected),
        "probe_acc": probe.accuracy,
        "probe_acc_lo": probe.low,
        "probe_acc_hi": probe.high,
    }
