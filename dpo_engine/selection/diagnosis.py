"""`diagnose`: metrics, recommendation, bootstrap confidence and per-pair data in one object.

The `Diagnosis` keeps the per-pair arrays and the bootstrap metric table, so the page can redraw
figures and `recommend_again` can re-apply edited thresholds (confidence included) without
re-embedding or re-sampling. `to_json_dict` is the stable JSON contract of diagnosis.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.selection.metrics import (
    DIVERGENCE_METRICS,
    KERNEL_METRICS,
    METRIC_NAMES,
    Distance,
    PairQuantities,
    SelectionMetrics,
    bootstrap_metrics,
    chunk_bounds,
    chunk_energy,
    chunk_wasserstein,
    compute_metrics,
    overlap_histograms,
    pair_quantities,
)
from dpo_engine.selection.rules import (
    DIVERGENCE_RULES,
    KERNEL_RULES,
    NearThreshold,
    RuleEvaluation,
    Thresholds,
    evaluate_rules,
    near_thresholds,
    recommendation_shares,
)

UNCERTAIN_BELOW = 0.5

DIAGNOSIS_JSON = "diagnosis.json"
DIAGNOSIS_PAIRS = "diagnosis_pairs.npz"


class PairData(BaseModel):
    """Per-pair and per-chunk arrays for figures and the label-noise table (dataset order)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    dp: np.ndarray
    dn: np.ndarray
    margins: np.ndarray  # s_i = dn~_i - dp~_i
    log_ratio: np.ndarray
    tat: np.ndarray
    nag: np.ndarray
    chunk_bounds: np.ndarray  # (T x 2) start, end
    chunk_w1: np.ndarray  # (T - 1) plug-in W1 between consecutive chunks' margins (descriptive)
    chunk_energy: np.ndarray  # (T - 1) unbiased energy distance between consecutive chunks (smoothness terms)
    hist_edges: np.ndarray  # 51 edges over the pooled similarity range
    hist_chosen: np.ndarray  # counts of 1 - dp per bin
    hist_rejected: np.ndarray  # counts of 1 - dn per bin
    bootstrap: np.ndarray  # (n_bootstrap x 8) metrics per resample, METRIC_NAMES order

    def quantities(self) -> PairQuantities:
        """The per-pair quantities the metrics were computed from (no second embedding pass)."""
        return PairQuantities(dp=self.dp, dn=self.dn, log_ratio=self.log_ratio, tat=self.tat, nag=self.nag)

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, name)) for name in type(self).model_fields}


class Confidence(BaseModel):
    kernel: dict[str, float]
    divergence: dict[str, float]


class Recommendation(BaseModel):
    """The verdict of the point estimate, and how far the bootstrap backs it.

    ``confidence`` maps every choice to the share of resamples whose rules give it; the shown
    choice is the point estimate's. When its share is below one half the verdict is *uncertain*:
    ``*_verdict`` then reads "uncertain between X (a%) and Y (b%)" and names the conditions that sit
    near their thresholds (``*_near_thresholds``). The runner-up is the most frequent other choice
    among the resamples (the rules' closest non-firing rule when no resample picked another).
    """

    kernel: str
    divergence: str
    kernel_rule: str
    divergence_rule: str
    kernel_runner_up: str | None
    divergence_runner_up: str | None
    confidence: Confidence
    kernel_uncertain: bool = False
    divergence_uncertain: bool = False
    kernel_runner_up_share: float | None = None
    divergence_runner_up_share: float | None = None
    kernel_verdict: str = ""
    divergence_verdict: str = ""
    kernel_near_thresholds: list[NearThreshold] = Field(default_factory=list)
    divergence_near_thresholds: list[NearThreshold] = Field(default_factory=list)


class Diagnosis(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    n_pairs: int
    embedder: str | None = None
    distance: Distance = "cosine"
    metrics: SelectionMetrics
    thresholds: Thresholds = Field(default_factory=Thresholds)
    kernel_evaluation: RuleEvaluation
    divergence_evaluation: RuleEvaluation
    recommendation: Recommendation
    n_bootstrap: int
    seed: int
    pairs: PairData

    def standard_errors(self) -> dict[str, float]:
        return _standard_errors(self.pairs.bootstrap)

    def to_json_dict(self) -> dict[str, Any]:
        """The diagnosis.json contract (keys are stable; pages, CLI and tests rely on them)."""
        m = self.metrics
        return {
            "n_pairs": self.n_pairs,
            "embedder": self.embedder,
            "distance": self.distance,
            "kernel_metrics": {k: getattr(m, k) for k in KERNEL_METRICS},
            "divergence_metrics": {k: getattr(m, k) for k in DIVERGENCE_METRICS},
            "recommendation": self.recommendation.model_dump(),
            "rules": {
                "gap_unit": self.kernel_evaluation.gap_unit,
                "kernel": [r.model_dump() for r in self.kernel_evaluation.rules],
                "divergence": [r.model_dump() for r in self.divergence_evaluation.rules],
            },
            "thresholds": self.thresholds.model_dump(),
            "bootstrap": {
                "n_resamples": self.n_bootstrap,
                "seed": self.seed,
                "standard_errors": self.standard_errors(),
            },
        }

    def save(self, directory: str | Path) -> Path:
        """Write diagnosis.json and diagnosis_pairs.npz into ``directory``; returns the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DIAGNOSIS_JSON
        path.write_text(json.dumps(self.to_json_dict(), indent=2))
        np.savez(directory / DIAGNOSIS_PAIRS, **self.pairs.to_npz_dict())
        return path


def _standard_errors(table: np.ndarray) -> dict[str, float]:
    """Bootstrap standard deviation of each metric (empty without resamples)."""
    if table.shape[0] < 2:
        return {}
    out = {}
    for i, name in enumerate(METRIC_NAMES):
        column = table[:, i][np.isfinite(table[:, i])]
        if column.size >= 2:
            out[name] = float(column.std(ddof=1))
    return out


def _verdict(
    shown: str, shares: dict[str, float], evaluation: RuleEvaluation, se: dict[str, float], n_resamples: int
) -> tuple[bool, str | None, float | None, str, list[NearThreshold]]:
    """(uncertain, runner-up, its share, verdict text, conditions near their thresholds) of one family."""
    ranked = sorted(((share, name) for name, share in shares.items() if share > 0), reverse=True)
    others = [(share, name) for share, name in ranked if name != shown]
    if others:
        runner_up, runner_share = others[0][1], others[0][0]
    else:
        runner_up, runner_share = (
            evaluation.runner_up,
            (shares.get(evaluation.runner_up) if evaluation.runner_up else None),
        )
    if n_resamples == 0:
        return False, runner_up, runner_share, f"{shown} (no bootstrap: confidence unknown)", []
    share = shares.get(shown, 0.0)
    uncertain = share < UNCERTAIN_BELOW
    leaders = [name for _, name in ranked[:2]]
    if uncertain and shown not in leaders[:2] and leaders:
        leaders = [leaders[0], shown]
    if len(leaders) < 2 and runner_up is not None:
        leaders = [*leaders, runner_up] if shown in leaders else [shown, runner_up]
    near = near_thresholds(evaluation, se, rules=tuple(dict.fromkeys([shown, *leaders])))
    if not uncertain:
        text = f"{shown} ({share:.0%} of resamples)"
    else:
        pair = " and ".join(f"{name} ({shares.get(name, 0.0):.0%})" for name in leaders[:2])
        text = f"uncertain between {pair}; the point estimate gives {shown}"
        if near:
            text += ": " + "; ".join(item.describe() for item in near[:3])
    return uncertain, runner_up, runner_share, text, near


def _recommend(
    metrics: SelectionMetrics, thresholds: Thresholds, table: np.ndarray
) -> tuple[RuleEvaluation, RuleEvaluation, Recommendation]:
    se = _standard_errors(table)
    kernel = evaluate_rules(KERNEL_RULES, metrics, thresholds, se)
    divergence = evaluate_rules(DIVERGENCE_RULES, metrics, thresholds, se)
    kernel_share, divergence_share = recommendation_shares(table, thresholds)
    k_unc, k_run, k_run_share, k_text, k_near = _verdict(kernel.recommended, kernel_share, kernel, se, table.shape[0])
    d_unc, d_run, d_run_share, d_text, d_near = _verdict(
        divergence.recommended, divergence_share, divergence, se, table.shape[0]
    )
    recommendation = Recommendation(
        kernel=kernel.recommended,
        divergence=divergence.recommended,
        kernel_rule=kernel.rule,
        divergence_rule=divergence.rule,
        kernel_runner_up=k_run,
        divergence_runner_up=d_run,
        confidence=Confidence(kernel=kernel_share, divergence=divergence_share),
        kernel_uncertain=k_unc,
        divergence_uncertain=d_unc,
        kernel_runner_up_share=k_run_share,
        divergence_runner_up_share=d_run_share,
        kernel_verdict=k_text,
        divergence_verdict=d_text,
        kernel_near_thresholds=k_near,
        divergence_near_thresholds=d_near,
    )
    return kernel, divergence, recommendation


def diagnose_quantities(
    q: PairQuantities,
    *,
    distance: Distance = "cosine",
    thresholds: Thresholds = Thresholds(),
    n_bootstrap: int = 200,
    seed: int = 0,
    embedder: str | None = None,
) -> Diagnosis:
    """Diagnosis from precomputed per-pair quantities (see `diagnose`)."""
    metrics = compute_metrics(q)
    table = bootstrap_metrics(q, n_bootstrap=n_bootstrap, seed=seed)
    bounds = chunk_bounds(q.n)
    margins = q.margin
    edges, hist_p, hist_q = overlap_histograms(q.dp, q.dn)
    pairs = PairData(
        dp=q.dp,
        dn=q.dn,
        margins=margins,
        log_ratio=q.log_ratio,
        tat=q.tat,
        nag=q.nag,
        chunk_bounds=np.array(bounds, dtype=np.int64).reshape(-1, 2),
        chunk_w1=chunk_wasserstein(margins, bounds),
        chunk_energy=chunk_energy(margins, bounds),
        hist_edges=edges,
        hist_chosen=hist_p,
        hist_rejected=hist_q,
        bootstrap=table,
    )
    kernel, divergence, recommendation = _recommend(metrics, thresholds, table)
    return Diagnosis(
        n_pairs=q.n,
        embedder=embedder,
        distance=distance,
        metrics=metrics,
        thresholds=thresholds,
        kernel_evaluation=kernel,
        divergence_evaluation=divergence,
        recommendation=recommendation,
        n_bootstrap=n_bootstrap,
        seed=seed,
        pairs=pairs,
    )


def diagnose(
    prompt_emb: np.ndarray,
    chosen_emb: np.ndarray,
    rejected_emb: np.ndarray,
    *,
    distance: Distance = "cosine",
    thresholds: Thresholds = Thresholds(),
    n_bootstrap: int = 200,
    seed: int = 0,
    embedder: str | None = None,
) -> Diagnosis:
    """Eight metrics, the recommended kernel and divergence with reasons, and bootstrap confidence.

    Rows of the three n x dim arrays are pairs in dataset (file) order; order matters for smoothness.
    """
    q = pair_quantities(prompt_emb, chosen_emb, rejected_emb, distance)
    return diagnose_quantities(
        q, distance=distance, thresholds=thresholds, n_bootstrap=n_bootstrap, seed=seed, embedder=embedder
    )


def recommend_again(
    diagnosis_or_metrics: Diagnosis | SelectionMetrics | dict[str, float | None],
    thresholds: Thresholds | dict[str, float],
) -> Diagnosis | tuple[RuleEvaluation, RuleEvaluation]:
    """Re-apply the rules under new thresholds, without re-embedding.

    Given a `Diagnosis`, returns a copy whose recommendation, rule report and bootstrap confidence
    follow the new thresholds (metrics and resamples unchanged). Given bare metrics, returns the
    (kernel, divergence) rule evaluations.
    """
    if isinstance(thresholds, dict):
        thresholds = Thresholds.from_assignments(thresholds)
    if isinstance(diagnosis_or_metrics, Diagnosis):
        d = diagnosis_or_metrics
        kernel, divergence, recommendation = _recommend(d.metrics, thresholds, d.pairs.bootstrap)
        return d.model_copy(
            update={
                "thresholds": thresholds,
                "kernel_evaluation": kernel,
                "divergence_evaluation": divergence,
                "recommendation": recommendation,
            }
        )
    metrics = (
        diagnosis_or_metrics
        if isinstance(diagnosis_or_metrics, SelectionMetrics)
        else SelectionMetrics(**diagnosis_or_metrics)
    )
    return evaluate_rules(KERNEL_RULES, metrics, thresholds), evaluate_rules(DIVERGENCE_RULES, metrics, thresholds)


def load_diagnosis(directory: str | Path) -> Diagnosis:
    """Read diagnosis.json + diagnosis_pairs.npz written by `Diagnosis.save` (e.g. a run directory)."""
    directory = Path(directory)
    json_path, npz_path = directory / DIAGNOSIS_JSON, directory / DIAGNOSIS_PAIRS
    for path in (json_path, npz_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {directory}")
    data = json.loads(json_path.read_text())
    with np.load(npz_path) as npz:
        arrays = {name: npz[name] for name in PairData.model_fields if name in npz.files}
    if "chunk_energy" not in arrays:  # written before smoothness became the energy statistic
        arrays["chunk_energy"] = np.full_like(arrays["chunk_w1"], np.nan)
    pairs = PairData(**arrays)
    metrics = SelectionMetrics(**data["kernel_metrics"], **data["divergence_metrics"])
    thresholds = Thresholds(**data["thresholds"])
    kernel, divergence, recommendation = _recommend(metrics, thresholds, pairs.bootstrap)
    return Diagnosis(
        n_pairs=int(data["n_pairs"]),
        embedder=data.get("embedder"),
        distance=data["distance"],
        metrics=metrics,
        thresholds=thresholds,
        kernel_evaluation=kernel,
        divergence_evaluation=divergence,
        recommendation=recommendation,
        n_bootstrap=int(data["bootstrap"]["n_resamples"]),
        seed=int(data["bootstrap"]["seed"]),
        pairs=pairs,
    )
