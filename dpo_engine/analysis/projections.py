"""2-D / 3-D maps of probe-set representations across snapshots, aligned so points do not jump.

Each snapshot (chosen and rejected representations of the same probe pairs) is embedded on its
own with t-SNE (default) or UMAP and one fixed seed. Independent embeddings are only defined up
to rotation, reflection, scale and shift, so frame t+1 is mapped onto frame t by the orthogonal
Procrustes solution (scipy.linalg.orthogonal_procrustes) on the points both frames share. The
result is cached as Parquet inside the run directory, keyed by the snapshot files and settings,
so a page re-render reads it back instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg import orthogonal_procrustes

CACHE_DIR_NAME = "projections"
PCA_DIMS = 50


class ProjectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["tsne", "umap"] = Field("tsne", description="Dimensionality reduction used for the map.")
    dim: Literal[2, 3] = Field(2, description="Dimensions of the map.")
    seed: int = Field(0, description="Random seed: the same seed gives the same coordinates.")
    perplexity: float = Field(
        30.0, gt=1.0, description="t-SNE perplexity (lowered automatically for small probe sets)."
    )
    n_neighbors: int = Field(
        15, ge=2, description="UMAP neighbourhood size (lowered automatically for small probe sets)."
    )
    align: bool = Field(True, description="Align successive snapshots with orthogonal Procrustes.")
    max_iter: int = Field(
        500, ge=250, description="t-SNE optimisation iterations (500 is enough for maps of a few thousand points)."
    )


def embed_points(points: np.ndarray, config: ProjectionConfig) -> np.ndarray:
    """Map n × k points to n × dim with the configured method and seed."""
    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    if n < 4:
        raise ValueError(f"a projection needs at least 4 points, got {n}")
    if not np.isfinite(points).all():
        raise ValueError("snapshot contains non-finite values; the run probably diverged")
    if points.shape[1] > PCA_DIMS and n > PCA_DIMS:
        # the usual t-SNE/UMAP preprocessing: neighbour search in 50 dims is far cheaper than in 256
        from sklearn.decomposition import PCA

        points = PCA(n_components=PCA_DIMS, random_state=config.seed).fit_transform(points)
    if config.method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(config.perplexity, (n - 1) / 3.0)
        from threadpoolctl import threadpool_limits

        tsne = TSNE(
            n_components=config.dim,
            perplexity=perplexity,
            init="pca",
            random_state=config.seed,
            max_iter=config.max_iter,
        )
        # One OpenMP thread: in a process that also runs torch, two OpenMP runtimes otherwise fight
        # over a small CPU and the fit slows down by an order of magnitude.
        with threadpool_limits(limits=1, user_api="openmp"):
            return tsne.fit_transform(points)
    import umap

    reducer = umap.UMAP(
        n_components=config.dim, n_neighbors=min(config.n_neighbors, n - 1), random_state=config.seed, n_jobs=1
    )
    return np.asarray(reducer.fit_transform(points), dtype=np.float64)


def procrustes_align(moving: np.ndarray, target: np.ndarray, apply_to: np.ndarray | None = None) -> np.ndarray:
    """Similarity transform (rotation/reflection, scale, shift) that best maps `moving` onto `target`.

    Rows of `moving` and `target` correspond; the fitted transform is applied to `apply_to`
    (default: `moving` itself), so it can be fitted on shared points and applied to all.
    """
    apply_to = moving if apply_to is None else apply_to
    mu_m, mu_t = moving.mean(axis=0), target.mean(axis=0)
    a, b = moving - mu_m, target - mu_t
    norm_a = float(np.sum(a * a))
    if norm_a == 0.0:
        return np.broadcast_to(mu_t, apply_to.shape).copy()
    rotation, singular_sum = orthogonal_procrustes(a, b)
    return (singular_sum / norm_a) * (apply_to - mu_m) @ rotation + mu_t


def frame_displacement(frames: pd.DataFrame) -> list[float]:
    """Mean distance a point moves between consecutive frames (a measure of 'jumping')."""
    axes = [c for c in ("x", "y", "z") if c in frames]
    steps = sorted(frames["step"].unique())
    out = []
    for prev, cur in zip(steps, steps[1:]):
        a = frames[frames.step == prev].set_index(["pair_id", "label"])[axes]
        b = frames[frames.step == cur].set_index(["pair_id", "label"])[axes]
        common = a.index.intersection(b.index)
        out.append(float(np.linalg.norm(a.loc[common].to_numpy() - b.loc[common].to_numpy(), axis=1).mean()))
    return out


def project_snapshots(snapshots, config: ProjectionConfig = ProjectionConfig()) -> pd.DataFrame:
    """Long table step, pair_id, label (chosen/rejected), x, y[, z] for a sequence of snapshots.

    `snapshots` are objects with .step, .chosen, .rejected, .pair_ids (see report.rundata.Snapshot).
    """
    axes = ["x", "y", "z"][: config.dim]
    frames = []
    previous: pd.DataFrame | None = None
    for snap in snapshots:
        ids = np.asarray(snap.pair_ids).astype(str)
        points = np.vstack([snap.chosen, snap.rejected])
        coords = embed_points(points, config)
        frame = pd.DataFrame(coords, columns=axes)
        frame.insert(0, "label", ["chosen"] * len(ids) + ["rejected"] * len(ids))
        frame.insert(0, "pair_id", np.concatenate([ids, ids]))
        frame.insert(0, "step", int(snap.step))
        if config.align and previous is not None:
            key_prev = previous.set_index(["pair_id", "label"])[axes]
            key_cur = frame.set_index(["pair_id", "label"])[axes]
            common = key_cur.index.intersection(key_prev.index)
            if len(common) >= config.dim + 1:
                frame[axes] = procrustes_align(
                    key_cur.loc[common].to_numpy(), key_prev.loc[common].to_numpy(), apply_to=key_cur.to_numpy()
                )
        frames.append(frame)
        previous = frame
    if not frames:
        return pd.DataFrame(columns=["step", "pair_id", "label", *axes])
    return pd.concat(frames, ignore_index=True)


def _cache_key(run_dir: Path, steps: list[int], config: ProjectionConfig, max_pairs: int | None) -> str:
    parts = [config.model_dump_json(), str(max_pairs)]
    for step in steps:
        stat = (run_dir / "snapshots" / f"step_{step}.npz").stat()
        parts.append(f"{step}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def projection_cache_file(
    run, config: ProjectionConfig = ProjectionConfig(), *, steps: list[int] | None = None, max_pairs: int | None = None
) -> Path:
    """Where the projection of these snapshots with these settings is (or will be) cached."""
    steps = list(run.snapshot_steps if steps is None else steps)
    key = _cache_key(Path(run.run_dir), steps, config, max_pairs)
    return Path(run.run_dir) / CACHE_DIR_NAME / f"{config.method}_{config.dim}d_{key}.parquet"


def cached_projection(
    run, config: ProjectionConfig = ProjectionConfig(), *, steps: list[int] | None = None, max_pairs: int | None = None
) -> tuple[pd.DataFrame, bool]:
    """Project a run's snapshots, reading/writing the cache in <run_dir>/projections/.

    `run` is a report.rundata.RunData. Returns (table, from_cache). `max_pairs` keeps the first N
    probe pairs of every snapshot (fast previews of large probe sets).
    """
    steps = list(run.snapshot_steps if steps is None else steps)
    if not steps:
        return project_snapshots([], config), False
    cache_file = projection_cache_file(run, config, steps=steps, max_pairs=max_pairs)
    cache_dir = cache_file.parent
    if cache_file.exists():
        try:
            return pd.read_parquet(cache_file), True
        except Exception:  # a torn cache file is recomputed, never trusted
            cache_file.unlink(missing_ok=True)

    def load(step):
        snap = run.load_snapshot(step)
        if max_pairs is not None:
            snap.chosen, snap.rejected, snap.pair_ids = (
                snap.chosen[:max_pairs],
                snap.rejected[:max_pairs],
                snap.pair_ids[:max_pairs],
            )
        return snap

    table = project_snapshots((load(step) for step in steps), config)
    try:
        cache_dir.mkdir(exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        table.to_parquet(tmp, index=False)
        tmp.replace(cache_file)
    except OSError:  # a read-only run directory still gets its projection, just uncached
        pass
    return table, False
