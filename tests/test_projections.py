"""Snapshot projections: deterministic under a seed, Procrustes-aligned, cached on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import procrustes as scipy_procrustes
from scipy.stats import special_ortho_group

from dpo_engine.analysis.projections import (
    ProjectionConfig,
    cached_projection,
    frame_displacement,
    procrustes_align,
    project_snapshots,
)
from dpo_engine.report.rundata import Snapshot, load_run


def _drifting_snapshots(n_pairs=40, dim=16, n_steps=4, seed=0):
    """Two clusters that separate a little more at every step (like training does)."""
    rng = np.random.default_rng(seed)
    base_c = rng.normal(size=(n_pairs, dim))
    base_r = rng.normal(size=(n_pairs, dim))
    direction = rng.normal(size=dim)
    snaps = []
    for t in range(n_steps):
        chosen = base_c + 0.4 * t * direction + 0.05 * rng.normal(size=(n_pairs, dim))
        rejected = base_r - 0.4 * t * direction + 0.05 * rng.normal(size=(n_pairs, dim))
        snaps.append(
            Snapshot(
                step=10 * t,
                chosen=chosen.astype(np.float32),
                rejected=rejected.astype(np.float32),
                pair_ids=np.array([f"p{i}" for i in range(n_pairs)]),
            )
        )
    return snaps


def test_procrustes_recovers_a_known_similarity_transform():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(30, 2))
    rotation = special_ortho_group.rvs(2, random_state=3)
    moving = 2.5 * target @ rotation + np.array([4.0, -1.0])
    aligned = procrustes_align(moving, target)
    np.testing.assert_allclose(aligned, target, atol=1e-9)


def test_procrustes_matches_scipy_disparity():
    rng = np.random.default_rng(2)
    target = rng.normal(size=(50, 2))
    moving = rng.normal(size=(50, 2)) + target
    aligned = procrustes_align(moving, target)
    # scipy standardises both sets and returns the residual sum of squares of the best fit
    _, _, disparity = scipy_procrustes(target, moving)
    t0 = target - target.mean(0)
    residual = np.sum((aligned - target) ** 2) / np.sum(t0**2)
    assert residual == pytest.approx(disparity, rel=1e-9)


def test_fixed_seed_gives_identical_coordinates():
    snaps = _drifting_snapshots(n_steps=2)
    a = project_snapshots(snaps, ProjectionConfig(seed=7))
    b = project_snapshots(snaps, ProjectionConfig(seed=7))
    pd.testing.assert_frame_equal(a, b)
    assert set(a["label"]) == {"chosen", "rejected"}
    assert len(a) == 2 * 2 * 40


def test_alignment_reduces_frame_to_frame_displacement():
    snaps = _drifting_snapshots()
    aligned = project_snapshots(snaps, ProjectionConfig(align=True))
    raw = project_snapshots(snaps, ProjectionConfig(align=False))
    moved_aligned, moved_raw = frame_displacement(aligned), frame_displacement(raw)
    assert len(moved_aligned) == 3
    assert sum(moved_aligned) < sum(moved_raw)
    # independent check with scipy: alignment moves a frame only by a similarity transform, so its
    # shape disparity to the previous frame is exactly the best one scipy finds for the raw frame
    for prev, cur in zip(sorted(aligned.step.unique()), sorted(aligned.step.unique())[1:]):
        a_prev = aligned[aligned.step == prev][["x", "y"]].to_numpy()
        a_cur = aligned[aligned.step == cur][["x", "y"]].to_numpy()
        r_cur = raw[raw.step == cur][["x", "y"]].to_numpy()
        _, _, best = scipy_procrustes(a_prev, r_cur)
        _, _, got = scipy_procrustes(a_prev, a_cur)
        assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_umap_option_and_3d():
    snaps = _drifting_snapshots(n_pairs=20, n_steps=2)
    table = project_snapshots(snaps, ProjectionConfig(method="umap", dim=3))
    assert {"x", "y", "z"} <= set(table.columns)
    assert np.isfinite(table[["x", "y", "z"]].to_numpy()).all()


def test_bad_snapshot_gives_clear_error():
    snap = _drifting_snapshots(n_pairs=10, n_steps=1)[0]
    snap.chosen[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        project_snapshots([snap])


def test_cache_round_trip_and_invalidation(tmp_path):
    run_dir = tmp_path / "run-x"
    (run_dir / "snapshots").mkdir(parents=True)
    for snap in _drifting_snapshots(n_pairs=15, n_steps=2):
        np.savez(
            run_dir / "snapshots" / f"step_{snap.step}.npz",
            chosen=snap.chosen.astype(np.float16),
            rejected=snap.rejected.astype(np.float16),
            pair_ids=snap.pair_ids,
        )
    run = load_run(run_dir)
    cold, hit_cold = cached_projection(run)
    warm, hit_warm = cached_projection(run)
    assert (hit_cold, hit_warm) == (False, True)
    pd.testing.assert_frame_equal(cold, warm, check_dtype=False)
    # a rewritten snapshot is a different input: recomputed, not served stale
    snap = _drifting_snapshots(n_pairs=15, n_steps=2, seed=5)[1]
    np.savez(run_dir / "snapshots" / "step_10.npz", chosen=snap.chosen, rejected=snap.rejected, pair_ids=snap.pair_ids)
    _, hit_after = cached_projection(load_run(run_dir))
    assert hit_after is False
