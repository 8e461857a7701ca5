"""The diagnosis per category or source: an average over the whole set hides the group that fails.

When the table has a ``category`` column (mapped at upload; common names such as ``source`` are
recognised by `data.layouts.COLUMN_ALIASES`), `group_breakdown` repeats the audit's numbers and the
eight metrics on each group's rows, with the same functions and the embeddings already computed.
Groups smaller than `MIN_GROUP_PAIRS` are pooled into one "other" row that lists them. Duplicate,
conflict and leakage counts are the whole-set audit's flags counted per group, so the groups add up
to the set; length bias and the metrics are computed on the group alone. No recommendation is given
per group: the rules pick one kernel and divergence for the data a run trains on, and a group is not
trained alone. The result is ``diagnosis.json["audit"]["by_group"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dpo_engine.analysis.audit import DataAudit, length_bias
from dpo_engine.analysis.audit.thresholds import MIN_GROUP_PAIRS
from dpo_engine.data.split import split_pairs
from dpo_engine.selection.metrics import METRIC_NAMES, PairQuantities, compute_metrics

GROUP_COLUMN = "category"
NO_GROUP = "(no category)"
POOLED = "other (pooled)"
# Flag kinds of the audit counted per group (leakage: the split training will use).
COUNTED = (
    "duplicate_pair",
    "conflict",
    "identical_responses",
    "near_identical_responses",
    "duplicate_prompt",
    "near_duplicate_prompt",
)
RECOMMENDATION_NOTE = (
    "No kernel or divergence is recommended per group: the rules pick one for the data a run trains on, "
    "and a group is not trained alone. Read the metrics per group to see which group pulls the set's numbers."
)


def group_labels(table: pd.DataFrame) -> pd.Series | None:
    """Each pair's group, or None when the table has no category column or a single group."""
    if GROUP_COLUMN not in table.columns:
        return None
    labels = table[GROUP_COLUMN].astype(object).where(table[GROUP_COLUMN].notna(), NO_GROUP).astype(str)
    labels = labels.reset_index(drop=True)
    return labels if labels.nunique() >= 2 else None


def group_rows(labels: pd.Series, min_pairs: int = MIN_GROUP_PAIRS) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Row indices per reported group (largest first; the pooled small groups last) and the pooled groups' sizes."""
    sizes = labels.value_counts(sort=False)
    order = sorted(sizes.index, key=lambda g: (-int(sizes[g]), g))
    kept = [g for g in order if sizes[g] >= min_pairs]
    pooled = {g: int(sizes[g]) for g in order if sizes[g] < min_pairs}
    values = labels.to_numpy()
    rows = {g: np.flatnonzero(values == g) for g in kept}
    if pooled:
        rows[POOLED] = np.flatnonzero(labels.isin(list(pooled)).to_numpy())
    return rows, pooled


def subset_quantities(q: PairQuantities, rows: np.ndarray) -> PairQuantities:
    """The per-pair quantities of some rows (what `pair_quantities` gives on those rows' embeddings)."""
    return PairQuantities(dp=q.dp[rows], dn=q.dn[rows], log_ratio=q.log_ratio[rows], tat=q.tat[rows], nag=q.nag[rows])


def _flag_counts(flagged: pd.DataFrame, group_of_row: np.ndarray, n_groups: int, finding: str) -> np.ndarray:
    rows = np.unique(flagged.loc[flagged["finding"] == finding, "row"].to_numpy(dtype=np.int64))
    return np.bincount(group_of_row[rows], minlength=n_groups)[:n_groups]


def group_breakdown(
    table: pd.DataFrame,
    q: PairQuantities,
    audit: DataAudit,
    token_counts: dict[str, np.ndarray] | None = None,
    min_pairs: int = MIN_GROUP_PAIRS,
) -> dict[str, Any] | None:
    """Audit numbers and the eight metrics per group (rows of ``table`` and ``q`` in the same order)."""
    labels = group_labels(table)
    if labels is None:
        return None
    rows, pooled = group_rows(labels, min_pairs)
    names = list(rows)
    group_of_row = np.zeros(len(table), dtype=np.int64)  # every row is in a group (small ones pooled)
    for k, name in enumerate(names):
        group_of_row[rows[name]] = k
    counts = {kind: _flag_counts(audit.flagged, group_of_row, len(names), kind) for kind in COUNTED}
    split_by = audit.split.split_by
    exact = _flag_counts(audit.flagged, group_of_row, len(names), f"leak_exact_{split_by}")
    near = _flag_counts(audit.flagged, group_of_row, len(names), f"leak_near_{split_by}")
    held_out = _held_out_per_group(table, audit, group_of_row, len(names))
    has_near = split_by in audit.leakage and audit.leakage[split_by].near is not None  # near needs embeddings
    chosen_chars = table["chosen"].astype(str).str.len().to_numpy()
    rejected_chars = table["rejected"].astype(str).str.len().to_numpy()
    groups = []
    for k, name in enumerate(names):
        idx = rows[name]
        length = {"characters": length_bias(chosen_chars[idx], rejected_chars[idx], "characters")}
        if token_counts is not None:
            length["tokens"] = length_bias(
                np.asarray(token_counts["chosen"])[idx], np.asarray(token_counts["rejected"])[idx], "tokens"
            )
        metrics = None
        if idx.size >= min_pairs:
            m = compute_metrics(subset_quantities(q, idx))
            metrics = {key: getattr(m, key) for key in METRIC_NAMES}
        groups.append(
            {
                "name": name,
                "n_pairs": int(idx.size),
                "pooled": name == POOLED,
                "length": {u: lb.model_dump(mode="json", exclude={"histogram"}) for u, lb in length.items()},
                "counts": {kind: int(counts[kind][k]) for kind in COUNTED},
                "leakage": {
                    "split_by": split_by,
                    "held_out": None if held_out is None else int(held_out[k]),
                    "exact": int(exact[k]),
                    "near": int(exact[k] + near[k]) if has_near else None,
                },
                "metrics": metrics,
            }
        )
    return {
        "column": GROUP_COLUMN,
        "min_group_pairs": min_pairs,
        "groups": groups,
        "pooled": pooled,
        "recommendation": None,
        "recommendation_note": RECOMMENDATION_NOTE,
    }


def _held_out_per_group(table: pd.DataFrame, audit: DataAudit, group_of_row: np.ndarray, n_groups: int):
    """How many of each group's pairs the training split holds out (the split the audit checked)."""
    split = audit.split
    if split.split_by not in audit.leakage:
        return None
    _, held = split_pairs(
        table["prompt"],
        split_by=split.split_by,
        eval_fraction=split.eval_fraction,
        min_eval_pairs=split.min_eval_pairs,
        seed=split.seed,
    )
    return np.bincount(group_of_row[np.asarray(held, dtype=np.int64)], minlength=n_groups)[:n_groups]


def summary_lines(by_group: dict[str, Any]) -> list[str]:
    """Plain-text lines of ``diagnosis.json["audit"]["by_group"]`` for the CLI."""
    lines = [f"by group   column {by_group['column']!r}; groups under {by_group['min_group_pairs']} pairs pooled"]
    for g in by_group["groups"]:
        lb = g["length"]["characters"]
        share = lb["share_chosen_longer"]
        length = (
            f"chosen longer {share:.0%} [{lb['interval']['low']:.0%}, {lb['interval']['high']:.0%}]"
            + (" !" if lb["flagged"] else "")
            if share is not None
            else "no unequal lengths"
        )
        c, lk = g["counts"], g["leakage"]
        lines.append(
            f"  {g['name'][:24]:<24} {g['n_pairs']:>6} pairs  {length}  dup {c['duplicate_pair']}  "
            f"conflict {c['conflict']}  held out {lk['held_out']}, leaked {lk['exact']}"
            + ("" if lk["near"] is None else f" ({lk['near']} with near-duplicates)")
        )
        if g["metrics"] is not None:
            lines.append(
                "           "
                + "  ".join(f"{k}={'n/a' if v is None else format(v, '.3g')}" for k, v in g["metrics"].items())
            )
    if by_group["pooled"]:
        lines.append("  pooled: " + ", ".join(f"{k} ({v})" for k, v in by_group["pooled"].items()))
    lines.append(f"  {by_group['recommendation_note']}")
    return lines
