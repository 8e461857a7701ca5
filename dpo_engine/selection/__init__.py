"""Dataset diagnosis: the eight selection metrics, the recommendation rules and their bootstrap confidence."""

from dpo_engine.selection.diagnosis import (
    Diagnosis,
    Recommendation,
    diagnose,
    diagnose_quantities,
    load_diagnosis,
    recommend_again,
)
from dpo_engine.selection.metrics import (
    METRIC_NAMES,
    PairQuantities,
    SelectionMetrics,
    bootstrap_metrics,
    compute_metrics,
    pair_quantities,
)
from dpo_engine.selection.rules import DIVERGENCES, KERNELS, RuleEvaluation, Thresholds
from dpo_engine.selection.suspicious import suspicious_pairs

__all__ = [
    "DIVERGENCES",
    "KERNELS",
    "METRIC_NAMES",
    "Diagnosis",
    "PairQuantities",
    "Recommendation",
    "RuleEvaluation",
    "SelectionMetrics",
    "Thresholds",
    "bootstrap_metrics",
    "compute_metrics",
    "diagnose",
    "diagnose_quantities",
    "load_diagnosis",
    "pair_quantities",
    "recommend_again",
    "suspicious_pairs",
]
