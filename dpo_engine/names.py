"""The names every layer shares: divergences, mixture weights, and the metric keys and labels made from them.

A leaf with no heavy imports, so the run-directory readers and the pages can use it without loading
torch. `divergences.py` and `kernels.py` build their config types and outputs from these tuples, and
tests check that each implementation covers exactly its names.
"""

from __future__ import annotations

# Token-level regularisers (METHOD.md 2.6), in the order tables and plots show them.
DIVERGENCE_LABELS: dict[str, str] = {
    "kl": "KL",
    "js": "Jensen-Shannon",
    "hellinger": "Hellinger",
    "renyi": "Rényi",
    "bhattacharyya": "Bhattacharyya",
    "wasserstein": "Wasserstein",
    "fdiv": "f-divergence",
}
ALL_DIVERGENCES: tuple[str, ...] = tuple(DIVERGENCE_LABELS)


def divergence_metric(name: str) -> str:
    """The metrics.jsonl / eval.jsonl key of a divergence trace."""
    return f"div_{name}"


DIVERGENCE_METRICS: tuple[str, ...] = tuple(divergence_metric(d) for d in ALL_DIVERGENCES)
DIVERGENCE_METRIC_LABELS: dict[str, str] = {divergence_metric(d): DIVERGENCE_LABELS[d] for d in ALL_DIVERGENCES}

# Base kernels of the flat mixture and of HMK (METHOD.md 2.4), in mixture order, and their weights:
# the flat mixture reports the four λ; HMK reports the four λ within its two groups and the two τ.
MIXTURE_BASE_KERNELS: tuple[str, ...] = ("rbf", "poly", "spectral", "mahalanobis")
MIXTURE_WEIGHT_LABELS: dict[str, str] = {
    "lambda_rbf": "λ1 RBF",
    "lambda_poly": "λ2 polynomial",
    "lambda_spectral": "λ3 spectral",
    "lambda_mahalanobis": "λ4 Mahalanobis",
    "tau_local": "τ1 local",
    "tau_global": "τ2 global",
}
MIXTURE_WEIGHTS: tuple[str, ...] = tuple(MIXTURE_WEIGHT_LABELS)

# Separation of the probe set's chosen vs rejected representations at each snapshot (METHOD.md 3),
# eval.jsonl keys -> labels: the Davies-Bouldin score and the cross-validated linear probe's accuracy
# with its 95 % interval.
SEPARATION_LABELS: dict[str, str] = {
    "dbs": "Davies–Bouldin score",
    "probe_acc": "linear-probe accuracy (held-out folds)",
    "probe_acc_lo": "linear-probe accuracy, 95 % low",
    "probe_acc_hi": "linear-probe accuracy, 95 % high",
}
SEPARATION_METRICS: tuple[str, ...] = tuple(SEPARATION_LABELS)
