"""Leakage: held-out pairs whose prompt training also sees, exactly or as a near-duplicate.

A held-out prompt that is also trained on makes held-out accuracy partly a memory test. The split is
computed by `dpo_engine.data.split.split_pairs`, the function training calls, with the same settings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel

from dpo_engine.analysis.audit.duplicates import _flags, first_rows
from dpo_engine.analysis.audit.neighbours import nearest_in
from dpo_engine.analysis.audit.thresholds import NEAR_DUPLICATE_PROMPT_COSINE
from dpo_engine.data.split import SplitBy


class Leakage(BaseModel):
    split_by: SplitBy
    n_train: int
    n_held_out: int
    exact: int  # held-out pairs whose normalised prompt occurs in the training part
    exact_prompts: int  # distinct such prompts
    near: int | None  # held-out pairs with a training prompt at cosine >= threshold (exact ones included)
    share_exact: float
    share_near: float | None


def leakage(
    prompt_keys: np.ndarray,
    train_idx: np.ndarray,
    held_out_idx: np.ndarray,
    split_by: SplitBy,
    prompt_emb: np.ndarray | None = None,
) -> tuple[Leakage, pd.DataFrame]:
    """Counts and flag rows (held-out rows; related_row: a training pair with that prompt or the nearest)."""
    n_keys = int(prompt_keys.max()) + 1 if prompt_keys.size else 0
    in_train = np.zeros(n_keys, dtype=bool)
    in_train[prompt_keys[train_idx]] = True
    first_train = np.full(n_keys, -1, dtype=np.int64)
    first_train[prompt_keys[train_idx][::-1]] = train_idx[::-1]
    held_keys = prompt_keys[held_out_idx]
    exact = in_train[held_keys]
    flags = [
        _flags(
            held_out_idx[exact],
            f"leak_exact_{split_by}",
            f"held-out prompt is trained on (split by {split_by})",
            first_train[held_keys[exact]],
        )
    ]
    near_count = share_near = None
    if prompt_emb is not None:
        reps = first_rows(prompt_keys)
        train_keys = np.flatnonzero(in_train)
        query_keys = np.setdiff1d(np.unique(held_keys), train_keys)
        best, where = nearest_in(np.asarray(prompt_emb)[reps[query_keys]], np.asarray(prompt_emb)[reps[train_keys]])
        near_key = np.zeros(n_keys, dtype=bool)
        near_key[query_keys] = best >= NEAR_DUPLICATE_PROMPT_COSINE
        partner = np.full(n_keys, -1, dtype=np.int64)
        cosine = np.full(n_keys, np.nan)
        partner[query_keys] = np.where(where >= 0, first_train[train_keys[np.maximum(where, 0)]], -1)
        cosine[query_keys] = best
        near_only = near_key[held_keys]
        near_count = int((exact | near_only).sum())
        share_near = near_count / max(len(held_out_idx), 1)
        rows = held_out_idx[near_only]
        flags.append(
            _flags(
                rows,
                f"leak_near_{split_by}",
                f"a training prompt's embedding at cosine >= {NEAR_DUPLICATE_PROMPT_COSINE} (split by {split_by})",
                partner[held_keys[near_only]],
                cosine[held_keys[near_only]],
            )
        )
    result = Leakage(
        split_by=split_by,
        n_train=int(len(train_idx)),
        n_held_out=int(len(held_out_idx)),
        exact=int(exact.sum()),
        exact_prompts=int(np.unique(held_keys[exact]).size),
        near=near_count,
        share_exact=float(exact.mean()) if len(held_out_idx) else 0.0,
        share_near=share_near,
    )
    return result, pd.concat(flags, ignore_index=True)
