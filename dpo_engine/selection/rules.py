"""Recommendation rules of METHOD.md 1.4: first matching rule wins, every condition reported.

A rule is a list of conditions ``metric <op> threshold``; the report keeps each condition's value,
threshold and outcome so the user sees why a kernel or divergence was chosen and how far the
runner-up was from firing. Distances to a threshold are measured in bootstrap standard errors of
the metric when a bootstrap is available (a scale every metric shares), else in metric units.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.names import ALL_DIVERGENCES
from dpo_engine.selection.metrics import METRIC_NAMES, SelectionMetrics

KERNELS: tuple[str, ...] = ("rbf", "polynomial", "spectral", "mahalanobis", "hmk")
DIVERGENCES: tuple[str, ...] = ALL_DIVERGENCES
FALLBACK_KERNEL = "hmk"
FALLBACK_DIVERGENCE = "kl"

Comparison = Literal[">", "<", "<=", ">="]
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


class Thresholds(BaseModel):
    """Every threshold of the rules (METHOD.md 1.4 defaults); all are user settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps1: float = Field(0.5, description="RBF: PNAV above this")
    eps2: float = Field(0.3, description="RBF: TAT below this")
    eps3: float = Field(0.2, description="Mahalanobis: PNAV below this")
    eps4: float = Field(0.7, description="Spectral: TAT above this")
    eps5: float = Field(0.1, description="Spectral: PND below this")
    tol: float = Field(0.15, description="Polynomial: |NAG| and |PND| below this (distances within ~15% of each other)")
    overlap_hi: float = Field(
        0.95, description="Bhattacharyya: support overlap above this (two normals less than 0.07 SD apart)"
    )
    drift: float = Field(0.3, description="Wasserstein: drift magnitude above this")
    kurt: float = Field(
        4.0,
        description="Renyi: kurtosis above this (excess 1, a Student t with 10 dof); JS and Hellinger need at most "
        "this",
    )
    overlap_lo: float = Field(0.3, description="Jensen-Shannon: support overlap below this (normals ~1.5 SD apart)")
    smooth_lo: float = Field(
        0.03, description="Hellinger: smoothness below this (neighbouring tenths of the file < ~0.45 margin SD apart)"
    )

    @classmethod
    def from_assignments(cls, assignments: Mapping[str, object]) -> "Thresholds":
        """Build from NAME=VALUE settings, with a one-line error for unknown names or bad values."""
        unknown = sorted(set(assignments) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown threshold {', '.join(unknown)}; known: {', '.join(cls.model_fields)}")
        values: dict[str, float] = {}
        for name, raw in assignments.items():
            try:
                value = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"threshold {name} must be a number, got {raw!r}") from None
            if not np.isfinite(value):
                raise ValueError(f"threshold {name} must be finite, got {raw!r}")
            values[name] = value
        return cls(**values)


class ConditionSpec(BaseModel):
    """``metric <comparison> threshold``; ``absolute`` compares |metric|; ``threshold_name`` None = fixed 0."""

    model_config = ConfigDict(frozen=True)

    metric: str
    comparison: Comparison
    threshold_name: str | None
    absolute: bool = False


class RuleSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    conditions: tuple[ConditionSpec, ...]


def _c(metric: str, comparison: Comparison, threshold_name: str | None, absolute: bool = False) -> ConditionSpec:
    return ConditionSpec(metric=metric, comparison=comparison, threshold_name=threshold_name, absolute=absolute)


KERNEL_RULES: tuple[RuleSpec, ...] = (
    RuleSpec(name="rbf", conditions=(_c("pnav", ">", "eps1"), _c("tat", "<", "eps2"))),
    RuleSpec(name="polynomial", conditions=(_c("nag", "<", "tol", True), _c("pnd", "<", "tol", True))),
    RuleSpec(name="mahalanobis", conditions=(_c("nag", ">", None), _c("pnav", "<", "eps3"))),
    RuleSpec(name="spectral", conditions=(_c("tat", ">", "eps4"), _c("pnd", "<", "eps5"))),
    RuleSpec(name=FALLBACK_KERNEL, conditions=()),
)
DIVERGENCE_RULES: tuple[RuleSpec, ...] = (
    RuleSpec(name="bhattacharyya", conditions=(_c("support_overlap", ">", "overlap_hi"),)),
    RuleSpec(name="wasserstein", conditions=(_c("drift_magnitude", ">", "drift"),)),
    RuleSpec(name="renyi", conditions=(_c("kurtosis", ">", "kurt"),)),
    RuleSpec(name="js", conditions=(_c("support_overlap", "<", "overlap_lo"), _c("kurtosis", "<=", "kurt"))),
    RuleSpec(name="hellinger", conditions=(_c("smoothness", "<", "smooth_lo"), _c("kurtosis", "<=", "kurt"))),
    RuleSpec(name=FALLBACK_DIVERGENCE, conditions=()),
)


class ConditionResult(BaseModel):
    metric: str
    absolute: bool
    value: float | None  # None: the metric is undefined (smoothness on < 40 pairs); the condition fails
    comparison: Comparison
    threshold_name: str | None
    threshold: float
    passed: bool
    gap: float | None  # how far the value is from passing, in `gap_unit` (0 when passed)


class RuleResult(BaseModel):
    name: str
    conditions: list[ConditionResult]
    matched: bool  # all conditions pass (fallbacks always match)
    fired: bool  # the first matching rule
    distance: float | None  # largest gap of a failing condition (0 when matched; None if undefined)


class RuleEvaluation(BaseModel):
    """Outcome of one rule list: what fired, the runner-up, and every rule's detail."""

    recommended: str
    rule: str  # human-readable reason, e.g. "rbf: pnav 0.61 > eps1 0.5 and tat 0.21 < eps2 0.3"
    runner_up: str | None
    runner_up_distance: float | None
    gap_unit: Literal["bootstrap_se", "metric_units"]
    rules: list[RuleResult]


def _condition(
    spec: ConditionSpec, metrics: SelectionMetrics, thresholds: Thresholds, se: Mapping[str, float]
) -> ConditionResult:
    raw = getattr(metrics, spec.metric)
    threshold = 0.0 if spec.threshold_name is None else float(getattr(thresholds, spec.threshold_name))
    if raw is None:
        return ConditionResult(
            metric=spec.metric,
            absolute=spec.absolute,
            value=None,
            comparison=spec.comparison,
            threshold_name=spec.threshold_name,
            threshold=threshold,
            passed=False,
            gap=None,
        )
    value = abs(raw) if spec.absolute else float(raw)
    passed = bool(_OPS[spec.comparison](value, threshold))
    unit = se.get(spec.metric, 0.0)
    gap = 0.0 if passed else abs(value - threshold) / (unit if unit > 0 else 1.0)
    return ConditionResult(
        metric=spec.metric,
        absolute=spec.absolute,
        value=value,
        comparison=spec.comparison,
        threshold_name=spec.threshold_name,
        threshold=threshold,
        passed=passed,
        gap=gap,
    )


def _describe(rule: RuleResult) -> str:
    if not rule.conditions:
        return f"{rule.name}: no earlier rule matched (fallback)"
    parts = []
    for c in rule.conditions:
        name = f"|{c.metric}|" if c.absolute else c.metric
        threshold = c.threshold_name or "0"
        parts.append(f"{name} {c.value:.4g} {c.comparison} {threshold} {c.threshold:.4g}")
    return f"{rule.name}: " + " and ".join(parts)


def evaluate_rules(
    specs: tuple[RuleSpec, ...],
    metrics: SelectionMetrics,
    thresholds: Thresholds,
    standard_errors: Mapping[str, float] | None = None,
) -> RuleEvaluation:
    """Apply a rule list; the runner-up is the next matching rule after the winner, else the
    non-matching rule closest to matching (smallest largest gap), fallbacks excluded."""
    se = dict(standard_errors or {})
    results: list[RuleResult] = []
    fired_seen = False
    for spec in specs:
        conditions = [_condition(c, metrics, thresholds, se) for c in spec.conditions]
        matched = all(c.passed for c in conditions)
        gaps = [c.gap for c in conditions if not c.passed]
        distance = 0.0 if matched else (None if any(g is None for g in gaps) else max(gaps))
        fired = matched and not fired_seen
        fired_seen = fired_seen or fired
        results.append(
            RuleResult(name=spec.name, conditions=conditions, matched=matched, fired=fired, distance=distance)
        )
    winner = next(r for r in results if r.fired)
    shadowed = [r for r in results[results.index(winner) + 1 :] if r.matched and r.conditions]
    failing = [r for r in results if not r.matched and r.distance is not None]
    if shadowed:
        runner_up, runner_distance = shadowed[0].name, 0.0
    elif failing:
        closest = min(failing, key=lambda r: r.distance)  # type: ignore[arg-type, return-value]
        runner_up, runner_distance = closest.name, closest.distance
    elif winner is not results[-1]:
        runner_up, runner_distance = results[-1].name, None  # nothing measurable: the fallback is next
    else:
        runner_up, runner_distance = None, None
    return RuleEvaluation(
        recommended=winner.name,
        rule=_describe(winner),
        runner_up=runner_up,
        runner_up_distance=runner_distance,
        gap_unit="bootstrap_se" if se else "metric_units",
        rules=results,
    )


def recommend_kernel(
    metrics: SelectionMetrics, thresholds: Thresholds = Thresholds(), standard_errors: Mapping[str, float] | None = None
) -> RuleEvaluation:
    return evaluate_rules(KERNEL_RULES, metrics, thresholds, standard_errors)


def recommend_divergence(
    metrics: SelectionMetrics, thresholds: Thresholds = Thresholds(), standard_errors: Mapping[str, float] | None = None
) -> RuleEvaluation:
    return evaluate_rules(DIVERGENCE_RULES, metrics, thresholds, standard_errors)


def _first_match_vectorised(specs: tuple[RuleSpec, ...], table: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Index of the first matching rule for every row of a (n x 8) metric table."""
    column = {name: i for i, name in enumerate(METRIC_NAMES)}
    choice = np.full(table.shape[0], len(specs) - 1)
    undecided = np.ones(table.shape[0], dtype=bool)
    for k, spec in enumerate(specs):
        if not spec.conditions:
            break
        ok = np.ones(table.shape[0], dtype=bool)
        for c in spec.conditions:
            values = table[:, column[c.metric]]
            values = np.abs(values) if c.absolute else values
            threshold = 0.0 if c.threshold_name is None else getattr(thresholds, c.threshold_name)
            with np.errstate(invalid="ignore"):
                ok &= np.isfinite(values) & _OPS[c.comparison](values, threshold)
        hit = ok & undecided
        choice[hit] = k
        undecided &= ~hit
    return choice


def recommendation_shares(table: np.ndarray, thresholds: Thresholds) -> tuple[dict[str, float], dict[str, float]]:
    """Share of rows (bootstrap resamples) recommending each kernel and each divergence."""
    n = table.shape[0]
    kernel_share = {k: 0.0 for k in KERNELS}
    divergence_share = {d: 0.0 for d in DIVERGENCES}
    if n == 0:
        return kernel_share, divergence_share
    for specs, shares in ((KERNEL_RULES, kernel_share), (DIVERGENCE_RULES, divergence_share)):
        picks = _first_match_vectorised(specs, table, thresholds)
        for k, spec in enumerate(specs):
            shares[spec.name] = float(np.mean(picks == k))
    return kernel_share, divergence_share


class NearThreshold(BaseModel):
    """A condition whose metric sits within ``NEAR_SE`` bootstrap standard errors of its threshold."""

    rule: str
    metric: str
    value: float
    comparison: Comparison
    threshold_name: str | None
    threshold: float
    distance_se: float  # |value - threshold| / standard error

    def describe(self) -> str:
        name = self.threshold_name or "0"
        side = "above" if self.value > self.threshold else "below"
        return (
            f"{self.metric} {self.value:.3g} is {self.distance_se:.1f} SE {side} {name} {self.threshold:.3g} "
            f"({self.rule} needs {self.comparison} {self.threshold:.3g})"
        )


NEAR_SE = 2.0


def near_thresholds(
    evaluation: RuleEvaluation, standard_errors: Mapping[str, float], rules: tuple[str, ...] | None = None
) -> list[NearThreshold]:
    """Conditions (of the named rules, or all) whose value is within NEAR_SE standard errors of the threshold.

    These are the conditions a bootstrap resample can flip, i.e. the reason a verdict is uncertain.
    Sorted nearest first; each (metric, threshold) appears once.
    """
    found: dict[tuple[str, str | None], NearThreshold] = {}
    for rule in evaluation.rules:
        if rules is not None and rule.name not in rules:
            continue
        for c in rule.conditions:
            se = standard_errors.get(c.metric, 0.0)
            if c.value is None or se <= 0:
                continue
            distance = abs(c.value - c.threshold) / se
            key = (c.metric, c.threshold_name)
            if distance < NEAR_SE and key not in found:
                found[key] = NearThreshold(
                    rule=rule.name,
                    metric=f"|{c.metric}|" if c.absolute else c.metric,
                    value=c.value,
                    comparison=c.comparison,
                    threshold_name=c.threshold_name,
                    threshold=c.threshold,
                    distance_se=distance,
                )
    return sorted(found.values(), key=lambda item: item.distance_se)
