"""The evidence study's intervals (dpo_engine.analysis.evidence) against scipy and by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpo_engine import rundir
from dpo_engine.analysis.dbs import davies_bouldin
from dpo_engine.analysis.evidence import dbs_change, paired_difference, seeds_pairs_interval
from dpo_engine.train.trainer import train
from tests.test_train import make_config, toy_pairs


def test_one_seed_matches_the_t_interval_of_a_mean():
    values = np.random.default_rng(3).normal(0.2, 1.0, 80)
    ours = seeds_pairs_interval(values[None, :], n_resamples=20000)
    ref = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert ours.mean == pytest.approx(values.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.02) and ours.high == pytest.approx(ref.high, abs=0.02)


@pytest.mark.parametrize("seed_sd", [0.03, 0.15])
def test_interval_covers_the_true_accuracy_at_its_nominal_rate(seed_sd):
    """Pairs are a sample and every seed's run has its own accuracy (slightly, or mostly: seed_sd
    0.15 makes seed-to-seed spread dominate, where a bootstrap over three seeds covers far too
    rarely); the interval must cover the population mean at least about 95 % of the time."""
    rng = np.random.default_rng(0)
    hits, reps = 0, 200
    for _ in range(reps):
        pair_p = np.clip(rng.normal(0.6, 0.25, 64), 0, 1)  # per-pair chance of a correct margin
        seed_shift = rng.normal(0, seed_sd, (3, 1))
        table = (rng.random((3, 64)) < np.clip(pair_p + seed_shift, 0, 1)).astype(float)
        ci = seeds_pairs_interval(table, n_resamples=300, seed=int(rng.integers(1 << 30)))
        hits += ci.low <= 0.6 <= ci.high
    assert hits / reps >= 0.9


def test_paired_difference_is_narrower_than_unpaired_for_correlated_runs():
    rng = np.random.default_rng(5)
    base = rng.normal(0, 1, (3, 64))
    a, b = base + 0.1 + rng.normal(0, 0.1, base.shape), base + rng.normal(0, 0.1, base.shape)
    paired = paired_difference(a, b)
    unpaired_width = seeds_pairs_interval(a).high - seeds_pairs_interval(a).low
    assert paired.mean == pytest.approx((a - b).mean())
    assert paired.low > 0, "a shift of 0.1 with small pair noise is detectable when paired"
    assert paired.high - paired.low < 0.3 * unpaired_width
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference(a, b[:, :10])


def test_dbs_change_detects_separation_and_reads_zero_when_nothing_changes():
    rng = np.random.default_rng(2)
    chosen = [rng.normal(0, 1, (40, 8)) for _ in range(3)]
    rejected = [c + rng.normal(0, 1, c.shape) for c in chosen]
    first = list(zip(chosen, rejected))
    separated = [(c, r + 3.0) for c, r in first]
    moved = dbs_change(first, separated, n_resamples=150)
    expected = np.mean([davies_bouldin(c, r) - davies_bouldin(c0, r0) for (c, r), (c0, r0) in zip(separated, first)])
    assert moved.mean == pytest.approx(expected)
    assert moved.high < 0  # separated clusters: the score falls, and the interval says so
    still = dbs_change(first, first, n_resamples=50)
    assert still.mean == still.low == still.high == 0.0
    noise = [(c + rng.normal(0, 0.05, c.shape), r + rng.normal(0, 0.05, r.shape)) for c, r in first]
    unchanged = dbs_change(first, noise, n_resamples=150)
    assert unchanged.low <= 0 <= unchanged.high  # a small perturbation is not reported as a change
    same_as_baseline = dbs_change(first, separated, baseline=(first, separated), n_resamples=50)
    assert (
        same_as_baseline.mean == same_as_baseline.low == same_as_baseline.high == 0.0
    )  # no change beyond the baseline's


def test_split_seed_fixes_the_held_out_pairs_across_training_seeds(workspace, tmp_path):
    ids = {}
    for seed in (0, 1):
        cfg = make_config(
            data={"split_seed": 7}, optimisation={"max_steps": 1, "seed": seed}, monitoring={"snapshot_every": 100}
        )
        assert train(cfg, tmp_path / f"s{seed}", workspace=workspace, pairs=toy_pairs())["status"] == "succeeded"
        ids[seed] = sorted(rundir.read_eval_margins(tmp_path / f"s{seed}")[0].index)
    assert ids[0] == ids[1]
    cfg = make_config(optimisation={"max_steps": 1, "seed": 1}, monitoring={"snapshot_every": 100})
    assert train(cfg, tmp_path / "own", workspace=workspace, pairs=toy_pairs())["status"] == "succeeded"
    assert sorted(rundir.read_eval_margins(tmp_path / "own")[0].index) != ids[0]  # default: the training seed splits
