"""Length bias: whether the labels could be predicted from the responses' lengths alone.

A preference set whose chosen answers are mostly the longer ones rewards a policy for writing more,
whatever it writes. The share is counted over pairs whose lengths differ (ties are reported apart)
and carries a Wilson interval, which keeps its coverage near 0 and 1 and at small n.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel
from scipy.stats import binomtest

from dpo_engine.analysis.audit.thresholds import CONFIDENCE, HISTOGRAM_BINS, HISTOGRAM_TAIL, LENGTH_BIAS_MARGIN

LengthUnit = Literal["characters", "tokens"]


class Interval(BaseModel):
    low: float
    high: float


class Histogram(BaseModel):
    """Counts of a per-pair quantity; pairs beyond the drawn range are counted in ``below`` / ``above``."""

    edges: list[float]
    counts: list[int]
    below: int
    above: int


class LengthBias(BaseModel):
    unit: LengthUnit
    n_pairs: int
    chosen_longer: int
    chosen_shorter: int
    ties: int
    share_chosen_longer: float | None  # among pairs whose lengths differ
    interval: Interval | None
    baseline_accuracy: float | None  # "prefer the longer answer" against the labels; ties count half
    baseline_interval: Interval | None
    flagged: bool
    mean_difference: float  # chosen minus rejected
    median_difference: float
    histogram: Histogram
    advice: str

    def headline(self) -> str:
        if self.share_chosen_longer is None:
            return f"every pair has chosen and rejected of equal length in {self.unit}"
        return (
            f"chosen is the longer response in {self.share_chosen_longer:.1%} of the pairs whose lengths differ "
            f"({CONFIDENCE:.0%} interval {self.interval.low:.1%}–{self.interval.high:.1%}; {self.ties} ties); "
            f"a model that prefers the longer answer agrees with the labels in {self.baseline_accuracy:.1%} of pairs"
        )


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a binomial share (scipy's)."""
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(low=float(ci.low), high=float(ci.high))


def is_biased(interval: Interval | None) -> bool:
    return interval is not None and (
        interval.low > 0.5 + LENGTH_BIAS_MARGIN or interval.high < 0.5 - LENGTH_BIAS_MARGIN
    )


def difference_histogram(diff: np.ndarray) -> Histogram:
    """A histogram of the central part of ``diff``; the rare extremes are counted, not drawn."""
    diff = np.asarray(diff, dtype=float)
    if diff.size == 0:
        return Histogram(edges=[0.0, 1.0], counts=[0], below=0, above=0)
    lo, hi = np.quantile(diff, [HISTOGRAM_TAIL, 1 - HISTOGRAM_TAIL])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(diff, bins=HISTOGRAM_BINS, range=(lo, hi))
    return Histogram(
        edges=edges.tolist(),
        counts=counts.tolist(),
        below=int((diff < lo).sum()),
        above=int((diff > hi).sum()),
    )


def length_bias(chosen: np.ndarray, rejected: np.ndarray, unit: LengthUnit) -> LengthBias:
    """The share of pairs whose chosen response is longer, its interval, the length-only baseline."""
    diff = np.asarray(chosen, dtype=np.int64) - np.asarray(rejected, dtype=np.int64)
    n = int(diff.size)
    longer, shorter = int((diff > 0).sum()), int((diff < 0).sum())
    ties = n - longer - shorter
    untied = longer + shorter
    share = interval = accuracy = baseline = None
    if untied:
        share = longer / untied
        interval = wilson_interval(longer, untied)
        # with the ties fixed, the baseline is an affine function of the untied share: map its interval
        t = ties / n
        accuracy = (longer + 0.5 * ties) / n
        baseline = Interval(low=(1 - t) * interval.low + t / 2, high=(1 - t) * interval.high + t / 2)
    flagged = is_biased(interval)
    if not flagged:
        advice = "No length bias beyond the margin: nothing to do."
    elif share > 0.5:
        advice = (
            "The labels favour longer answers: a policy can gain reward by writing more. Rebalance (keep or add pairs "
            "whose chosen answer is the shorter one, or drop some long-chosen pairs) and compare held-out accuracy "
            "with the length-only baseline."
        )
    else:
        advice = (
            "The labels favour shorter answers: a policy can gain reward by writing less. Rebalance (keep or add "
            "pairs whose chosen answer is the longer one) and compare held-out accuracy with the length-only baseline."
        )
    return LengthBias(
        unit=unit,
        n_pairs=n,
        chosen_longer=longer,
        chosen_shorter=shorter,
        ties=ties,
        share_chosen_longer=share,
        interval=interval,
        baseline_accuracy=accuracy,
        baseline_interval=baseline,
        flagged=flagged,
        mean_difference=float(diff.mean()) if n else 0.0,
        median_difference=float(np.median(diff)) if n else 0.0,
        histogram=difference_histogram(diff),
        advice=advice,
    )
