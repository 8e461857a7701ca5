"""Exact cosine neighbour search in row blocks: every pair above a threshold, without an n x n matrix.

The embeddings are dense and a few hundred dimensions wide, where tree indexes prune nothing and
approximate indexes miss pairs; a block of rows times all later rows is one matrix product, so the
search is exact, and memory stays at one block (`BLOCK_BYTES`) whatever n is.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_BYTES = 64 * 2**20  # one block of similarities (float32) at most


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (zero rows stay zero, so they are similar to nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _block_rows(n_cols: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(n_cols, 1)))


def near_pair_blocks(x: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(i, j, cosine) with i < j and cosine >= threshold, one row block at a time; ``x`` has unit rows."""
    n = len(x)
    step = _block_rows(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sims = x[start:stop] @ x[start:].T  # rows start..stop against columns start..n
        local = np.arange(stop - start)
        sims[:, : stop - start][local[:, None] >= local[None, :]] = -np.inf  # keep j > i only
        rows, cols = np.nonzero(sims >= threshold)
        yield rows + start, cols + start, sims[rows, cols]


def near_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, cosine), i < j, with cosine >= threshold, sorted by (i, j)."""
    x = unit_rows(x)
    parts = list(near_pair_blocks(x, threshold)) or [(np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32))]
    i, j, c = (np.concatenate(p) for p in zip(*parts))
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), c[order]


def _keep_best(best: np.ndarray, partner: np.ndarray, i: np.ndarray, j: np.ndarray, c: np.ndarray) -> None:
    """best[i] = max(best[i], c) over the hits, partner[i] = the j that gave it (in place)."""
    if i.size == 0:
        return
    order = np.lexsort((c, i))
    last = np.r_[i[order][1:] != i[order][:-1], True]
    top = order[last]
    better = c[top] > best[i[top]]
    best[i[top][better]] = c[top][better]
    partner[i[top][better]] = j[top][better]


def near_neighbours(x: np.ndarray, threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(number of pairs with cosine >= threshold, each row's best such cosine (-inf: none), its partner (-1)).

    Streams the blocks, so the hits are never all held at once."""
    x = unit_rows(x)
    n = len(x)
    best = np.full(n, -np.inf, dtype=np.float32)
    partner = np.full(n, -1, dtype=np.int64)
    count = 0
    for i, j, c in near_pair_blocks(x, threshold):
        count += int(i.size)
        _keep_best(best, partner, i, j, c)
        _keep_best(best, partner, j, i, c)
    return count, best, partner


def nearest_in(query: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the largest cosine to any base row and that row's index (-inf, -1 for no base)."""
    query, base = unit_rows(query), unit_rows(base)
    best = np.full(len(query), -np.inf, dtype=np.float32)
    where = np.full(len(query), -1, dtype=np.int64)
    if len(base) == 0:
        return best, where
    step = _block_rows(len(base))
    for start in range(0, len(query), step):
        sims = query[start : start + step] @ base.T
        where[start : start + step] = sims.argmax(axis=1)
        best[start : start + step] = sims[np.arange(len(sims)), where[start : start + step]]
    return best, where
