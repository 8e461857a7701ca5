"""Recommendation rules (METHOD.md 1.4): every branch, precedence, thresholds, runner-up, confidence."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_engine.selection import Diagnosis, Thresholds, diagnose, recommend_again
from dpo_engine.selection.metrics import SelectionMetrics
from dpo_engine.selection.rules import (
    DIVERGENCE_RULES,
    DIVERGENCES,
    KERNEL_RULES,
    KERNELS,
    recommend_divergence,
    recommend_kernel,
    recommendation_shares,
)

NEUTRAL = dict(
    pnd=0.5,
    pnav=0.3,
    tat=0.5,
    nag=-0.2,  # matches no kernel rule
    support_overlap=0.45,
    drift_magnitude=0.1,
    kurtosis=2.5,
    smoothness=0.2,  # matches no divergence rule
)


def metrics(**changes) -> SelectionMetrics:
    return SelectionMetrics(**{**NEUTRAL, **changes})


def test_neutral_metrics_fall_back():
    assert recommend_kernel(metrics()).recommended == "hmk"
    assert recommend_divergence(metrics()).recommended == "kl"


@pytest.mark.parametrize(
    ("changes", "kernel"),
    [
        (dict(pnav=0.6, tat=0.2), "rbf"),
        (dict(nag=0.01, pnd=-0.02), "polynomial"),
        (dict(nag=0.2, pnav=0.1), "mahalanobis"),
        (dict(tat=0.8, pnd=0.05), "spectral"),
        (dict(), "hmk"),
    ],
)
def test_each_kernel_branch_fires(changes, kernel):
    result = recommend_kernel(metrics(**changes))
    assert result.recommended == kernel
    fired = [r for r in result.rules if r.fired]
    assert len(fired) == 1 and fired[0].name == kernel
    assert all(c.passed for c in fired[0].conditions)


@pytest.mark.parametrize(
    ("changes", "divergence"),
    [
        (dict(support_overlap=0.97), "bhattacharyya"),
        (dict(drift_magnitude=0.4), "wasserstein"),
        (dict(kurtosis=4.5), "renyi"),
        (dict(support_overlap=0.2), "js"),
        (dict(smoothness=0.01), "hellinger"),
        (dict(), "kl"),
    ],
)
def test_each_divergence_branch_fires(changes, divergence):
    assert recommend_divergence(metrics(**changes)).recommended == divergence


def test_first_match_wins_and_shadowed_rule_is_runner_up():
    m = metrics(pnav=0.6, tat=0.2, nag=0.01, pnd=0.01)  # rbf and polynomial both match
    result = recommend_kernel(m)
    assert result.recommended == "rbf"
    assert result.runner_up == "polynomial" and result.runner_up_distance == 0.0
    assert [r.matched for r in result.rules][:2] == [True, True]
    d = recommend_divergence(metrics(support_overlap=0.97, drift_magnitude=0.5))
    assert d.recommended == "bhattacharyya" and d.runner_up == "wasserstein"


def test_runner_up_is_the_closest_failing_rule():
    # pnav misses rbf by 0.01 (tat passes); everything else is far from firing
    result = recommend_kernel(metrics(pnav=0.49, tat=0.2, nag=-0.5, pnd=0.9))
    assert result.recommended == "hmk"
    assert result.runner_up == "rbf"
    assert result.runner_up_distance == pytest.approx(0.01)
    assert result.gap_unit == "metric_units"
    # rbf misses by 0.01 in pnav, polynomial by 0.03 in pnd: rbf is closer in metric units...
    close = metrics(pnav=0.49, tat=0.2, nag=0.01, pnd=0.18)
    assert recommend_kernel(close).runner_up == "rbf"
    # ...but pnav is known to 0.001 and pnd only to 0.1: in standard errors polynomial is closer
    se = {"pnav": 0.001, "pnd": 0.1, "nag": 0.1, "tat": 0.01}
    scaled = recommend_kernel(close, standard_errors=se)
    assert scaled.runner_up == "polynomial" and scaled.gap_unit == "bootstrap_se"
    assert scaled.runner_up_distance == pytest.approx(0.3)


def test_thresholds_change_the_outcome_as_documented():
    m = metrics(pnav=0.4, tat=0.2)
    assert recommend_kernel(m).recommended == "hmk"
    assert recommend_kernel(m, Thresholds(eps1=0.35)).recommended == "rbf"
    assert recommend_kernel(metrics(tat=0.65, pnd=0.05)).recommended == "hmk"
    assert recommend_kernel(metrics(tat=0.65, pnd=0.05), Thresholds(eps4=0.6)).recommended == "spectral"
    # raising kurt silences Renyi; JS then fires for low overlap
    low = metrics(kurtosis=4.5, support_overlap=0.2)
    assert recommend_divergence(low).recommended == "renyi"
    assert recommend_divergence(low, Thresholds(kurt=5.0)).recommended == "js"
    # Hellinger is reachable only between overlap_lo and overlap_hi ... or by moving them
    smooth = metrics(smoothness=0.01, support_overlap=0.25)
    assert recommend_divergence(smooth).recommended == "js"
    assert recommend_divergence(smooth, Thresholds(overlap_lo=0.1)).recommended == "hellinger"
    assert recommend_divergence(metrics(drift_magnitude=0.25), Thresholds(drift=0.2)).recommended == "wasserstein"


def test_undefined_smoothness_never_fires_hellinger():
    result = recommend_divergence(metrics(smoothness=None))
    assert result.recommended == "kl"
    hellinger = next(r for r in result.rules if r.name == "hellinger")
    assert hellinger.conditions[0].value is None and not hellinger.conditions[0].passed


def test_condition_report_carries_value_threshold_comparison():
    result = recommend_kernel(metrics(nag=-0.03, pnd=0.02), Thresholds(tol=0.05))
    poly = next(r for r in result.rules if r.name == "polynomial")
    nag, pnd = poly.conditions
    assert (nag.metric, nag.absolute, nag.value, nag.comparison, nag.threshold_name, nag.threshold, nag.passed) == (
        "nag",
        True,
        0.03,
        "<",
        "tol",
        0.05,
        True,
    )
    assert pnd.passed and result.recommended == "polynomial"
    assert "tol" in result.rule and "polynomial" in result.rule


def test_threshold_assignments_validate():
    assert Thresholds.from_assignments({"eps1": "0.7"}).eps1 == 0.7
    with pytest.raises(ValueError, match="unknown threshold nope"):
        Thresholds.from_assignments({"nope": 1})
    with pytest.raises(ValueError, match="must be a number"):
        Thresholds.from_assignments({"tol": "abc"})
    with pytest.raises(ValueError, match="finite"):
        Thresholds.from_assignments({"tol": "nan"})


def test_vectorised_shares_agree_with_rule_by_rule_evaluation():
    rng = np.random.default_rng(0)
    table = np.column_stack(
        [
            rng.uniform(-0.2, 0.2, 500),
            rng.uniform(0, 1, 500),
            rng.uniform(0, 1, 500),
            rng.uniform(-0.1, 0.1, 500),
            rng.uniform(0, 1, 500),
            rng.uniform(0, 0.5, 500),
            rng.uniform(2, 4, 500),
            rng.uniform(0, 0.1, 500),
        ]
    )
    table[::7, 7] = np.nan  # undefined smoothness in some rows
    thresholds = Thresholds()
    kernel_share, divergence_share = recommendation_shares(table, thresholds)
    picks_k = [recommend_kernel(SelectionMetrics.from_row(row), thresholds).recommended for row in table]
    picks_d = [recommend_divergence(SelectionMetrics.from_row(row), thresholds).recommended for row in table]
    for name in KERNELS:
        assert kernel_share[name] == pytest.approx(picks_k.count(name) / 500)
    for name in DIVERGENCES:
        assert divergence_share[name] == pytest.approx(picks_d.count(name) / 500)
    assert set(kernel_share) == set(KERNELS) and set(divergence_share) == set(DIVERGENCES)
    assert {r.name for r in KERNEL_RULES} <= set(KERNELS) and {r.name for r in DIVERGENCE_RULES} <= set(DIVERGENCES)


def _synthetic_diagnosis(n_bootstrap: int = 100) -> Diagnosis:
    rng = np.random.default_rng(1)
    n, d = 200, 12
    p = rng.standard_normal((n, d))
    c = p + 0.8 * rng.standard_normal((n, d))
    r = p + 1.0 * rng.standard_normal((n, d))
    return diagnose(p, c, r, n_bootstrap=n_bootstrap, seed=5)


def test_diagnosis_json_contract():
    data = _synthetic_diagnosis().to_json_dict()
    for key in (
        "n_pairs",
        "embedder",
        "distance",
        "kernel_metrics",
        "divergence_metrics",
        "recommendation",
        "rules",
        "thresholds",
    ):
        assert key in data
    assert set(data["kernel_metrics"]) == {"pnd", "pnav", "tat", "nag"}
    assert set(data["divergence_metrics"]) == {"support_overlap", "drift_magnitude", "kurtosis", "smoothness"}
    rec = data["recommendation"]
    assert {"kernel", "divergence", "kernel_rule", "divergence_rule", "confidence"} <= set(rec)
    assert sum(rec["confidence"]["kernel"].values()) == pytest.approx(1.0)
    assert sum(rec["confidence"]["divergence"].values()) == pytest.approx(1.0)
    for rule in data["rules"]["kernel"] + data["rules"]["divergence"]:
        for cond in rule["conditions"]:
            assert {"value", "threshold", "passed"} <= set(cond)
    assert data["thresholds"] == Thresholds().model_dump()


def test_recommend_again_follows_new_thresholds_without_recomputing_metrics():
    d = _synthetic_diagnosis()
    m = d.metrics
    # choose thresholds that force RBF and Wasserstein for these exact metrics
    forced = Thresholds(eps1=m.pnav / 2, eps2=m.tat + 0.1, drift=m.drift_magnitude / 2, overlap_hi=1.0)
    again = recommend_again(d, forced)
    assert again.recommendation.kernel == "rbf" and again.recommendation.divergence == "wasserstein"
    assert again.metrics == d.metrics and again.thresholds == forced
    np.testing.assert_array_equal(again.pairs.bootstrap, d.pairs.bootstrap)
    shares_k, shares_d = recommendation_shares(d.pairs.bootstrap, forced)
    assert again.recommendation.confidence.kernel == shares_k
    assert again.recommendation.confidence.divergence == shares_d
    kernel_eval, divergence_eval = recommend_again(m.model_dump(), {"eps1": m.pnav / 2, "eps2": m.tat + 0.1})
    assert kernel_eval.recommended == "rbf"
    assert d.recommendation.kernel == recommend_kernel(m).recommended  # the original is unchanged


def test_save_and_load_diagnosis_round_trip(tmp_path):
    from dpo_engine.selection import load_diagnosis

    d = _synthetic_diagnosis(n_bootstrap=30)
    d.save(tmp_path)
    back = load_diagnosis(tmp_path)
    assert back.to_json_dict() == d.to_json_dict()
    np.testing.assert_array_equal(back.pairs.margins, d.pairs.margins)
    with pytest.raises(FileNotFoundError, match="diagnosis.json"):
        load_diagnosis(tmp_path / "nothing")


def test_a_verdict_most_resamples_disagree_with_is_marked_uncertain():
    d = _synthetic_diagnosis(n_bootstrap=100)
    point = d.metrics.support_overlap
    thresholds = Thresholds(overlap_hi=point - 0.001)  # the point estimate just passes: bhattacharyya
    pairs = d.pairs.model_copy(deep=True)
    column = list(type(d.metrics).model_fields).index("support_overlap")
    pairs.bootstrap[:70, column] = point - 0.01  # 70% of resamples fall below the threshold
    pairs.bootstrap[70:, column] = point
    again = recommend_again(d.model_copy(update={"pairs": pairs}), thresholds)
    rec = again.recommendation
    assert rec.divergence == "bhattacharyya" and rec.confidence.divergence["bhattacharyya"] == pytest.approx(0.3)
    assert rec.divergence_uncertain
    others = {k: v for k, v in rec.confidence.divergence.items() if k != "bhattacharyya"}
    assert rec.divergence_runner_up == max(others, key=others.get)
    assert rec.divergence_runner_up_share == pytest.approx(max(others.values()))
    assert rec.divergence_verdict.startswith("uncertain between")
    assert "bhattacharyya (30%)" in rec.divergence_verdict
    assert f"{rec.divergence_runner_up} ({rec.divergence_runner_up_share:.0%})" in rec.divergence_verdict
    assert any(
        item.metric == "support_overlap" and item.threshold_name == "overlap_hi"
        for item in rec.divergence_near_thresholds
    )
    data = again.to_json_dict()["recommendation"]
    assert data["divergence_uncertain"] is True and isinstance(data["kernel_uncertain"], bool)
    assert "support_overlap" in data["divergence_verdict"]


def test_a_verdict_most_resamples_back_is_not_uncertain():
    rec = _synthetic_diagnosis().recommendation
    for kind in ("kernel", "divergence"):
        share = getattr(rec.confidence, kind)[getattr(rec, kind)]
        assert getattr(rec, f"{kind}_uncertain") == (share < 0.5)
        if share >= 0.5:
            assert getattr(rec, f"{kind}_verdict") == f"{getattr(rec, kind)} ({share:.0%} of resamples)"
