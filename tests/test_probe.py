"""The linear probe of chosen vs rejected representations: its folds, its accuracy against an independent
recomputation, its interval, and its place in the eval row."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.model_selection import cross_val_score

from dpo_engine import rundir
from dpo_engine.analysis.probe import linear_probe, pair_folds, probe_model, stacked, wilson
from tests.test_train import make_config, toy_pairs


def _pooled_cross_val_score(chosen, rejected, seed=0):
    x, y = stacked(chosen, rejected)
    folds = pair_folds(len(chosen), seed=seed)
    scores = cross_val_score(probe_model(seed), x, y, cv=folds, scoring="accuracy")
    return float(np.average(scores, weights=[len(test) for _, test in folds]))


def _clouds(n, dim, shift, seed):
    rng = np.random.default_rng(seed)
    chosen = rng.normal(size=(n, dim))
    rejected = rng.normal(size=(n, dim))
    chosen[:, 0] += shift
    rejected[:, 0] -= shift
    return chosen, rejected


def test_folds_keep_each_pair_together_and_cover_every_row_once():
    n = 13
    folds = pair_folds(n, folds=5, seed=3)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(2 * n))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 2 * n
        pairs = set(test[test < n])
        assert {i - n for i in test[test >= n]} == pairs  # chosen and rejected of a pair on the same side
    assert [t.tolist() for _, t in pair_folds(n, folds=5, seed=3)] == [t.tolist() for _, t in folds]  # fixed seed
    assert len(pair_folds(3, folds=5)) == 3
    with pytest.raises(ValueError):
        pair_folds(1)


def test_separable_representations_give_accuracy_near_one():
    chosen, rejected = _clouds(128, 32, 3.0, seed=0)
    result = linear_probe(chosen, rejected)
    assert result.accuracy == pytest.approx(_pooled_cross_val_score(chosen, rejected))
    assert result.accuracy > 0.97 and result.low > 0.9 and result.high == pytest.approx(1.0, abs=0.01)
    assert result.n_pairs == 128 and result.folds == 5


def test_inseparable_representations_give_chance_with_an_interval_covering_it():
    chosen, rejected = _clouds(128, 32, 0.0, seed=1)
    result = linear_probe(chosen, rejected)
    assert result.accuracy == pytest.approx(_pooled_cross_val_score(chosen, rejected))
    assert abs(result.accuracy - 0.5) < 0.1
    assert result.low < 0.5 < result.high


def test_float16_snapshots_and_shape_errors():
    chosen, rejected = _clouds(16, 8, 2.0, seed=2)
    half = linear_probe(chosen.astype(np.float16), rejected.astype(np.float16))
    assert 0 <= half.low <= half.accuracy <= half.high <= 1
    with pytest.raises(ValueError):
        linear_probe(chosen, rejected[:-1])


def test_wilson_interval_matches_scipy_for_whole_counts():
    for k, n in ((0, 10), (7, 20), (64, 128), (128, 128)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_eval_rows_with_snapshots_carry_the_probe(workspace, tmp_path):
    from dpo_engine.train.trainer import train

    cfg = make_config(optimisation={"max_steps": 2}, monitoring={"eval_every": 2, "snapshot_every": 2})
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "succeeded", summary["error"]
    evals = {r["step"]: r for r in rundir.read_jsonl(tmp_path / "run" / rundir.EVAL)}
    assert sorted(evals) == [0, 2]
    for step, row in evals.items():
        assert set(rundir.SNAPSHOT_EVAL_KEYS) <= set(row)
        assert row["probe_acc_lo"] <= row["probe_acc"] <= row["probe_acc_hi"]
        snap = rundir.load_snapshot(tmp_path / "run", step)
        again = linear_probe(snap["chosen"], snap["rejected"])
        assert (again.accuracy, again.low, again.high) == pytest.approx(
            (row["probe_acc"], row["probe_acc_lo"], row["probe_acc_hi"])
        )
