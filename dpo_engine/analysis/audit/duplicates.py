"""Repeated and contradictory pairs: exact duplicates, shared prompts, chosen = rejected, near-duplicates
of prompts and of the two responses, and the same comparison labelled both ways.

"Exact" compares normalised texts (`dpo_engine.data.split.normalise_text`: case-folded, whitespace
collapsed), so a repeat that differs only in spacing or capitals is still a repeat. "Near" compares
sentence embeddings by cosine; prompts that are exact repeats of each other are searched once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel

from dpo_engine.analysis.audit.neighbours import near_neighbours, unit_rows
from dpo_engine.analysis.audit.thresholds import NEAR_DUPLICATE_PROMPT_COSINE, NEAR_IDENTICAL_RESPONSE_COSINE
from dpo_engine.data.split import text_keys

FLAG_COLUMNS = ("row", "finding", "detail", "related_row", "similarity")


class Duplicates(BaseModel):
    duplicate_pairs: int  # repeats of an earlier pair (the first of each is not counted)
    duplicate_pair_groups: int
    duplicate_prompt_pairs: int  # pairs whose prompt at least one other pair shares
    duplicate_prompt_groups: int
    distinct_prompts: int
    identical_responses: int
    near_identical_responses: int | None  # not identical, cosine >= threshold; None without embeddings
    near_duplicate_prompts: int | None  # distinct prompts with another prompt at cosine >= threshold
    near_duplicate_prompt_pairs: int | None  # pairs of distinct prompts at cosine >= threshold
    near_duplicate_prompt_rows: int | None  # pairs of the dataset whose prompt is one of those
    conflicts: int  # pairs whose comparison appears elsewhere with the labels the other way round


def first_rows(keys: np.ndarray) -> np.ndarray:
    """For each key value k, the first row holding it (indexable by key)."""
    first = np.full(int(keys.max()) + 1 if keys.size else 0, -1, dtype=np.int64)
    rows = np.arange(keys.size)[::-1]
    first[keys[::-1]] = rows  # the last write per key is its first row
    return first


def _flags(rows, finding: str, detail, related=None, similarity=None) -> pd.DataFrame:
    rows = np.asarray(rows, dtype=np.int64)
    return pd.DataFrame(
        {
            "row": rows,
            "finding": finding,
            "detail": detail if not isinstance(detail, str) else [detail] * len(rows),
            "related_row": pd.array(related if related is not None else [None] * len(rows), dtype="Int64"),
            "similarity": np.asarray(similarity if similarity is not None else [np.nan] * len(rows), dtype=float),
        },
        columns=list(FLAG_COLUMNS),
    )


def find_duplicates(
    table: pd.DataFrame,
    prompt_keys: np.ndarray,
    prompt_emb: np.ndarray | None = None,
    chosen_emb: np.ndarray | None = None,
    rejected_emb: np.ndarray | None = None,
) -> tuple[Duplicates, pd.DataFrame]:
    """Counts and one flag row per (pair, finding); ``prompt_keys`` are `text_keys` of the prompts."""
    n = len(table)
    responses = text_keys(list(table["chosen"]) + list(table["rejected"]))
    chosen_keys, rejected_keys = responses[:n], responses[n:]
    frame = pd.DataFrame({"p": prompt_keys, "c": chosen_keys, "r": rejected_keys, "row": np.arange(n)})
    flags = []

    first_of_pair = frame.groupby(["p", "c", "r"], sort=False)["row"].transform("first").to_numpy()
    repeat = first_of_pair != np.arange(n)
    flags.append(
        _flags(
            np.flatnonzero(repeat),
            "duplicate_pair",
            "same prompt, chosen and rejected as an earlier pair",
            first_of_pair[repeat],
        )
    )
    pair_group_sizes = frame.groupby(["p", "c", "r"], sort=False)["row"].transform("size").to_numpy()

    prompt_sizes = np.bincount(prompt_keys)
    shared = prompt_sizes[prompt_keys] > 1
    first_prompt = first_rows(prompt_keys)
    # the first pair of a prompt points to the second, every later one to the first
    occurrence = frame.groupby("p", sort=False).cumcount().to_numpy()
    second = np.full(prompt_sizes.size, -1, dtype=np.int64)
    second[prompt_keys[occurrence == 1]] = np.flatnonzero(occurrence == 1)
    shared_rows = np.flatnonzero(shared)
    keys = prompt_keys[shared_rows]
    rel = np.where(occurrence[shared_rows] == 0, second[keys], first_prompt[keys])
    flags.append(
        _flags(
            shared_rows,
            "duplicate_prompt",
            [f"prompt shared by {prompt_sizes[k]} pairs" for k in prompt_keys[shared_rows]],
            rel,
        )
    )

    identical = chosen_keys == rejected_keys
    flags.append(_flags(np.flatnonzero(identical), "identical_responses", "chosen and rejected are the same text"))

    # the same comparison with the labels the other way round (responses that differ)
    swapped = frame[~identical].rename(columns={"c": "r", "r": "c", "row": "other"})
    clash = frame[~identical].merge(swapped, on=["p", "c", "r"], how="inner")
    clash = clash.groupby("row", sort=True)["other"].first()
    flags.append(
        _flags(
            clash.index.to_numpy(),
            "conflict",
            "the same prompt and responses are labelled the other way round in another pair",
            clash.to_numpy(),
        )
    )

    near_identical = near_prompts = near_prompt_pairs = near_prompt_rows = None
    if chosen_emb is not None and rejected_emb is not None:
        cos = np.einsum("ij,ij->i", unit_rows(chosen_emb), unit_rows(rejected_emb))
        near = (cos >= NEAR_IDENTICAL_RESPONSE_COSINE) & ~identical
        near_identical = int(near.sum())
        flags.append(
            _flags(
                np.flatnonzero(near),
                "near_identical_responses",
                f"chosen and rejected embeddings at cosine >= {NEAR_IDENTICAL_RESPONSE_COSINE}",
                None,
                cos[near],
            )
        )
    if prompt_emb is not None:
        reps = first_prompt  # one embedding per distinct prompt: its first pair's
        near_prompt_pairs, best, partner = near_neighbours(np.asarray(prompt_emb)[reps], NEAR_DUPLICATE_PROMPT_COSINE)
        has = partner >= 0
        near_prompts = int(has.sum())
        row_has = has[prompt_keys]
        near_prompt_rows = int(row_has.sum())
        rows = np.flatnonzero(row_has)
        flags.append(
            _flags(
                rows,
                "near_duplicate_prompt",
                f"another prompt's embedding at cosine >= {NEAR_DUPLICATE_PROMPT_COSINE}",
                reps[partner[prompt_keys[rows]]],
                best[prompt_keys[rows]],
            )
        )

    counts = Duplicates(
        duplicate_pairs=int(repeat.sum()),
        duplicate_pair_groups=int(((pair_group_sizes > 1) & ~repeat).sum()),
        duplicate_prompt_pairs=int(shared.sum()),
        duplicate_prompt_groups=int((prompt_sizes > 1).sum()),
        distinct_prompts=int(prompt_sizes.size),
        identical_responses=int(identical.sum()),
        near_identical_responses=near_identical,
        near_duplicate_prompts=near_prompts,
        near_duplicate_prompt_pairs=near_prompt_pairs,
        near_duplicate_prompt_rows=near_prompt_rows,
        conflicts=int(clash.size),
    )
    return counts, pd.concat(flags, ignore_index=True)
