"""The eight selection metrics against independent computations on embeddings with known geometry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from dpo_engine.selection.metrics import (
    EPS,
    METRIC_NAMES,
    OverlapEstimator,
    bootstrap_counts,
    bootstrap_metrics,
    chunk_bounds,
    compute_metrics,
    pair_quantities,
    weighted_metrics,
)


def embeddings_with_distances(dp: np.ndarray, dn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors with prescribed cosine distances: prompt e1, chosen in the e1-e2 plane, rejected in e1-e3."""
    n = len(dp)
    a, b = np.arccos(1.0 - dp), np.arccos(1.0 - dn)
    prompt = np.zeros((n, 3))
    prompt[:, 0] = 1.0
    chosen = np.column_stack([np.cos(a), np.sin(a), np.zeros(n)])
    rejected = np.column_stack([np.cos(b), np.zeros(n), np.sin(b)])
    return prompt, chosen, rejected


def random_unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_chosen_equal_to_prompt_gives_zero_dp_and_full_gap():
    rng = np.random.default_rng(1)
    p, r = random_unit(rng, 30), random_unit(rng, 30)
    q = pair_quantities(p, p.copy(), r)
    assert np.all(q.dp == 0.0)
    dn = np.array([scipy.spatial.distance.cosine(a, b) for a, b in zip(p, r)])
    np.testing.assert_allclose(q.dn, dn, atol=1e-12)
    np.testing.assert_allclose(q.nag, dn / (dn + EPS))  # (dn - 0) / (dn + 0 + eps)
    m = compute_metrics(q)
    np.testing.assert_allclose(m.pnd, np.mean(np.log(EPS / (dn + EPS))), rtol=1e-9)
    assert np.isfinite(m.as_row()[:7]).all()


def test_identical_responses_do_not_produce_nan():
    rng = np.random.default_rng(2)
    p = random_unit(rng, 50)
    m = compute_metrics(pair_quantities(p, p.copy(), p.copy()))
    assert m.pnd == 0.0 and m.pnav == 0.0 and m.drift_magnitude == 0.0
    # Identical texts are perfectly balanced: NAG and TAT must read 0. With METHOD.md's eps in the
    # numerator as well they would read eps / eps = 1 ("rejected maximally farther", "fully
    # separated"); the corrected forms keep eps in the denominator only.
    assert m.nag == 0.0 and m.tat == 0.0
    assert m.support_overlap == 1.0 and m.kurtosis == 3.0 and m.smoothness == 0.0


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ([0, 1, 0], [0, 0, 1], 0.5),  # all three orthogonal: sqrt2 / (sqrt2 + sqrt2)
        ([0, 1, 0], [0, -1, 0], 2 / (2 * np.sqrt(2))),  # antipodal responses, both orthogonal to the prompt
        ([0, 1, 0], [0, 1, 0], 0.0),  # identical responses
    ],
)
def test_tat_orthogonal_constructions(chosen, rejected, expected):
    p = np.array([[1.0, 0, 0]] * 3)
    q = pair_quantities(p, np.array([chosen] * 3, float), np.array([rejected] * 3, float))
    np.testing.assert_allclose(q.tat, expected, atol=1e-6)


def test_tat_is_one_when_prompt_lies_between_responses():
    p = np.array([[1.0, 0.0]] * 4)
    c = np.array([[1.0, 1.0]] * 4)
    r = np.array([[1.0, -1.0]] * 4)
    np.testing.assert_allclose(compute_metrics(pair_quantities(p, c, r)).tat, 1.0, rtol=1e-5)


def test_kernel_metrics_match_hand_computation_on_random_embeddings():
    rng = np.random.default_rng(3)
    n = 120
    p, c, r = random_unit(rng, n), random_unit(rng, n), random_unit(rng, n)
    dp = np.array([scipy.spatial.distance.cosine(a, b) for a, b in zip(p, c)])
    dn = np.array([scipy.spatial.distance.cosine(a, b) for a, b in zip(p, r)])
    m_scale = np.mean(np.concatenate([dp, dn]))
    dpt, dnt = (dp + EPS) / (m_scale + EPS), (dn + EPS) / (m_scale + EPS)
    tat = [
        scipy.spatial.distance.euclidean(ci, ri)
        / (scipy.spatial.distance.euclidean(ci, pi) + scipy.spatial.distance.euclidean(ri, pi) + EPS)
        for pi, ci, ri in zip(p, c, r)
    ]
    m = compute_metrics(pair_quantities(p, c, r))
    np.testing.assert_allclose(m.pnd, np.mean(np.log((dp + EPS) / (dn + EPS))), rtol=1e-9)
    np.testing.assert_allclose(m.pnav, np.mean((dpt - dnt) ** 2), rtol=1e-9)
    np.testing.assert_allclose(m.tat, np.mean(tat), rtol=1e-9)
    np.testing.assert_allclose(m.nag, np.mean((dn - dp) / (dn + dp + EPS)), rtol=1e-9)
    gap = dpt - dnt  # drift: unbiased squared mean, then its root
    np.testing.assert_allclose(m.drift_magnitude, np.sqrt(max(0.0, gap.mean() ** 2 - gap.var(ddof=1) / n)), rtol=1e-9)
    assert -1.0 <= m.nag <= 1.0 and 0.0 <= m.tat <= 1.0


def test_euclidean_distance_option():
    rng = np.random.default_rng(4)
    p, c, r = random_unit(rng, 50), random_unit(rng, 50), random_unit(rng, 50)
    q = pair_quantities(p, c, r, distance="euclidean")
    np.testing.assert_allclose(q.dp, [scipy.spatial.distance.euclidean(a, b) for a, b in zip(p, c)])
    np.testing.assert_allclose(q.dn, [scipy.spatial.distance.euclidean(a, b) for a, b in zip(p, r)])


def test_prescribed_distances_are_reproduced():
    rng = np.random.default_rng(5)
    dp, dn = rng.uniform(0.1, 0.9, 40), rng.uniform(0.1, 0.9, 40)
    q = pair_quantities(*embeddings_with_distances(dp, dn))
    np.testing.assert_allclose(q.dp, dp, atol=1e-12)
    np.testing.assert_allclose(q.dn, dn, atol=1e-12)


def test_kurtosis_gaussian_versus_heavy_tailed_margins():
    rng = np.random.default_rng(6)
    n = 4000
    dp = np.full(n, 0.5)
    gaussian = 0.5 + 0.05 * rng.standard_normal(n)
    heavy = np.clip(0.5 + 0.02 * rng.standard_t(3, n), 0.01, 1.5)
    results = {}
    for name, dn in (("gaussian", gaussian), ("heavy", heavy)):
        m = compute_metrics(pair_quantities(*embeddings_with_distances(dp, dn)))
        scale = np.mean(np.concatenate([dp, dn])) + EPS
        expected = scipy.stats.kurtosis((dn - dp) / scale, fisher=False, bias=False)
        np.testing.assert_allclose(m.kurtosis, expected, rtol=1e-6)
        results[name] = m.kurtosis
    assert abs(results["gaussian"] - 3.0) < 0.3
    assert results["heavy"] > 4.0


def test_support_overlap_identical_and_disjoint():
    rng = np.random.default_rng(7)
    same = rng.uniform(0.2, 0.6, 200)
    assert compute_metrics(pair_quantities(*embeddings_with_distances(same, same.copy()))).support_overlap == 1.0
    disjoint = compute_metrics(
        pair_quantities(*embeddings_with_distances(rng.uniform(0.1, 0.2, 200), rng.uniform(0.8, 0.9, 200)))
    )
    assert disjoint.support_overlap < 1e-6


def test_overlap_kde_matches_scipy_gaussian_kde_integrated_numerically():
    """The binned KDEs equal scipy's gaussian_kde with the same bandwidths, integrated by the trapezoid rule."""
    rng = np.random.default_rng(17)
    p, q = rng.normal(0.6, 0.08, 300), rng.normal(0.5, 0.12, 300)
    est = OverlapEstimator.of(p, q)
    f, g = (d[0] for d in est.densities(np.full((1, 300), 1 / 300)))
    grid = est.grid
    ref_f = scipy.stats.gaussian_kde(p, bw_method=est.h_p / p.std(ddof=1))(grid)
    ref_g = scipy.stats.gaussian_kde(q, bw_method=est.h_q / q.std(ddof=1))(grid)
    np.testing.assert_allclose(f, ref_f, atol=2e-3 * ref_f.max())
    np.testing.assert_allclose(g, ref_g, atol=2e-3 * ref_g.max())
    plug_in = np.trapezoid(np.minimum(ref_f, ref_g), grid) / np.trapezoid(np.maximum(ref_f, ref_g), grid)
    both = np.trapezoid(np.minimum(ref_f, ref_g), grid) - est.bias
    corrected = both / (np.trapezoid(ref_f + ref_g, grid) - both)
    got = est.jaccard(np.full((1, 300), 1 / 300), resample=False)[0]
    np.testing.assert_allclose(got, corrected, atol=2e-3)
    assert est.bias < 0 and got > plug_in  # the min of two noisy curves is biased low; the correction raises it


def test_smoothness_is_mean_unbiased_energy_distance_between_consecutive_chunks():
    rng = np.random.default_rng(8)
    n = 100  # 5 chunks of 20
    dp = rng.uniform(0.2, 0.4, n)
    dn = np.concatenate([rng.uniform(0.2, 0.4, 50), rng.uniform(0.5, 0.8, 50)])  # drift halfway through
    m = compute_metrics(pair_quantities(*embeddings_with_distances(dp, dn)))
    s = (dn - dp) / (np.mean(np.concatenate([dp, dn])) + EPS)
    chunks = [s[i : i + 20] for i in range(0, n, 20)]

    def u_statistic(a: np.ndarray, b: np.ndarray) -> float:  # by brute force over all pairs, diagonal excluded
        def within(x: np.ndarray) -> float:
            return np.abs(x[:, None] - x[None, :]).sum() / (len(x) * (len(x) - 1))

        return 2 * np.abs(a[:, None] - b[None, :]).mean() - within(a) - within(b)

    expected = np.mean([u_statistic(a, b) for a, b in zip(chunks[:-1], chunks[1:])])
    np.testing.assert_allclose(m.smoothness, expected, rtol=1e-9)
    # its plug-in part is scipy's energy distance squared
    terms = [scipy.stats.energy_distance(a, b) ** 2 for a, b in zip(chunks[:-1], chunks[1:])]
    assert np.mean(terms) > m.smoothness > 0


def test_chunking_rules_and_small_data():
    assert chunk_bounds(39) == [(0, 39)]
    assert chunk_bounds(40) == [(0, 20), (20, 40)]
    bounds = chunk_bounds(1001)
    assert len(bounds) == 10 and bounds[0][0] == 0 and bounds[-1][1] == 1001
    assert min(b - a for a, b in bounds) >= 20
    rng = np.random.default_rng(9)
    m = compute_metrics(
        pair_quantities(*embeddings_with_distances(rng.uniform(0.1, 0.5, 39), rng.uniform(0.1, 0.5, 39)))
    )
    assert m.smoothness is None
    assert all(np.isfinite(getattr(m, k)) for k in METRIC_NAMES if k != "smoothness")


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(10)
    p = random_unit(rng, 5)
    with pytest.raises(ValueError, match="same shape"):
        pair_quantities(p, p, p[:4])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        pair_quantities(p[:1], p[:1], p[:1])
    bad = p.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pair_quantities(p, bad, p)
    with pytest.raises(ValueError, match="unknown distance"):
        pair_quantities(p, p, p, distance="manhattan")
    with pytest.raises(ValueError, match="2-D"):
        pair_quantities(p[0], p[0], p[0])


def test_unit_weights_reproduce_the_point_metrics():
    rng = np.random.default_rng(11)
    p, c, r = random_unit(rng, 237), random_unit(rng, 237), random_unit(rng, 237)
    q = pair_quantities(p, c, r)
    got = weighted_metrics(q, np.ones((1, q.n)), resample=False)[0]
    np.testing.assert_allclose(got, compute_metrics(q).as_row(), rtol=1e-9, atol=1e-12)


def test_weighted_metrics_equal_metrics_of_the_resampled_dataset():
    rng = np.random.default_rng(12)
    n = 150
    dp, dn = rng.uniform(0.1, 0.6, n), rng.uniform(0.2, 0.9, n)
    q = pair_quantities(*embeddings_with_distances(dp, dn))
    counts = bootstrap_counts(chunk_bounds(n), 3, np.random.default_rng(0))
    assert np.all(counts.sum(axis=1) == n)
    got = weighted_metrics(q, counts, resample=False)
    for row, weights in zip(got, counts):
        idx = np.repeat(np.arange(n), weights.astype(int))  # chunk order kept: chunk sizes are preserved
        expected = compute_metrics(pair_quantities(*embeddings_with_distances(dp[idx], dn[idx]))).as_row()
        # the overlap of a resample keeps the full sample's grid and bandwidths (documented): not compared here
        keep = [i for i, name in enumerate(METRIC_NAMES) if name != "support_overlap"]
        np.testing.assert_allclose(row[keep], expected[keep], rtol=1e-7, atol=1e-10)


def test_bootstrap_is_seeded_and_varies_between_seeds():
    rng = np.random.default_rng(13)
    p, c, r = random_unit(rng, 80), random_unit(rng, 80), random_unit(rng, 80)
    q = pair_quantities(p, c, r)
    a = bootstrap_metrics(q, n_bootstrap=60, seed=3)
    assert a.shape == (60, 8)
    np.testing.assert_array_equal(a, bootstrap_metrics(q, n_bootstrap=60, seed=3))
    assert not np.array_equal(a, bootstrap_metrics(q, n_bootstrap=60, seed=4))
    assert np.isfinite(a).all()
    assert bootstrap_metrics(q, n_bootstrap=0).shape == (0, 8)
