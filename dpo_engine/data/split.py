"""The train/held-out split, and when two texts count as the same: shared by training and the data audit.

A pair-level split can put one prompt on both sides, so held-out accuracy partly measures
memorised prompts. Splitting by prompt group keeps every pair of a (normalised) prompt on one side.
The audit calls the same functions, so the leakage it reports is that of the split training will use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import pandas as pd

SplitBy = Literal["pair", "prompt"]
SPLIT_BY: tuple[str, ...] = ("pair", "prompt")


def normalise_text(text: object) -> str:
    """Case-folded, whitespace runs collapsed to one space, ends stripped: the key of 'the same text'."""
    return " ".join(str(text).split()).casefold()


def text_keys(texts: Iterable[object]) -> np.ndarray:
    """Integer key per text, equal exactly when the normalised texts are equal (first occurrence order)."""
    normalised = pd.Series([normalise_text(t) for t in texts], dtype=object)
    codes, _ = pd.factorize(normalised, sort=False)
    return codes.astype(np.int64)


def _n_eval(n: int, eval_fraction: float, min_eval_pairs: int) -> int:
    return min(max(int(round(eval_fraction * n)), min_eval_pairs), n - 1)


def split_train_eval(n: int, *, eval_fraction: float, min_eval_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split; at least min_eval_pairs (but never all) pairs go to evaluation."""
    if n < 2:
        raise ValueError(f"need at least 2 pairs to split into train and eval, got {n}")
    n_eval = _n_eval(n, eval_fraction, min_eval_pairs)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def split_by_group(
    groups: np.ndarray, *, eval_fraction: float, min_eval_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out split of whole groups: no group has pairs on both sides.

    ``groups`` are integer labels numbered by first occurrence (as `text_keys` gives them). Groups
    are drawn in a seeded random order until the held-out part holds at least the pair split's
    count; it never takes every group. When every group is a single pair this is the pair split
    exactly, because the group permutation is then the pair permutation.
    """
    groups = np.asarray(groups, dtype=np.int64)
    n = len(groups)
    if n < 2:
        raise ValueError(f"need at least 2 pairs to split into train and eval, got {n}")
    n_groups = int(groups.max()) + 1
    if n_groups < 2:
        raise ValueError(
            "every pair has the same prompt, so a split by prompt cannot hold any out; use data.split_by='pair'"
        )
    target = _n_eval(n, eval_fraction, min_eval_pairs)
    order = np.random.default_rng(seed).permutation(n_groups)
    sizes = np.bincount(groups, minlength=n_groups)[order]
    taken = min(int(np.searchsorted(np.cumsum(sizes), target)) + 1, n_groups - 1)
    held_out = np.zeros(n_groups, dtype=bool)
    held_out[order[:taken]] = True
    mask = held_out[groups]
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_pairs(
    prompts: Iterable[object],
    *,
    split_by: SplitBy,
    eval_fraction: float,
    min_eval_pairs: int,
    seed: int,
    keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), sorted: the split training uses for ``data.split_by``.

    ``keys`` are `text_keys` of the prompts when the caller has them already."""
    prompts = list(prompts)
    if split_by == "pair":
        return split_train_eval(len(prompts), eval_fraction=eval_fraction, min_eval_pairs=min_eval_pairs, seed=seed)
    if split_by == "prompt":
        keys = text_keys(prompts) if keys is None else keys
        return split_by_group(keys, eval_fraction=eval_fraction, min_eval_pairs=min_eval_pairs, seed=seed)
    raise ValueError(f"unknown split_by {split_by!r}: use one of {', '.join(SPLIT_BY)}")
