"""Cluster separation of chosen vs rejected representations: the Davies-Bouldin score (METHOD.md 3).

Always computed on the full-dimensional stored vectors (never on a 2-D projection), so the number
a page shows next to a t-SNE frame is the one the run logged. Lower = better separated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def davies_bouldin(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """DBS of the two clusters, evaluated on exactly the given vectors (float16 snapshots are upcast)."""
    from sklearn.metrics import davies_bouldin_score

    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must both be (n x k), got {chosen.shape} and {rejected.shape}")
    if len(chosen) < 2:
        raise ValueError("the Davies-Bouldin score needs at least 2 pairs")
    x = np.concatenate([chosen, rejected]).astype(np.float32)
    labels = np.r_[np.zeros(len(chosen), dtype=int), np.ones(len(rejected), dtype=int)]
    return float(davies_bouldin_score(x, labels))


def snapshot_dbs(run_dir: str | Path, step: int) -> float:
    """DBS of a stored snapshot of a run."""
    from dpo_engine.rundir import load_snapshot

    snap = load_snapshot(Path(run_dir), step)
    return davies_bouldin(snap["chosen"], snap["rejected"])
