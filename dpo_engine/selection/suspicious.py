"""Pairs whose rejected response sits much closer to the prompt than the chosen one.

Once the Diagnose page's label-noise table; the flipped-label measurement (METHOD.md 1.6) found this
ranking no better than random, so the page now shows the audit's label-noise ranking, which lists
pairs only from a signal that passed that measurement."""

from __future__ import annotations

import pandas as pd

from dpo_engine.selection.diagnosis import Diagnosis

_PREVIEW_CHARS = 300


def suspicious_pairs(table: pd.DataFrame, diagnosis: Diagnosis, n: int = 50) -> pd.DataFrame:
    """The ``n`` pairs with the lowest margin s = dn~ - dp~ (most negative first).

    A strongly negative margin means the rejected response is semantically nearer the prompt than
    the chosen one: a cheap hint that the labels may be swapped or noisy, worth a human look.
    ``table`` is the dataset the diagnosis was computed on (same rows, same order).
    """
    if len(table) != diagnosis.n_pairs:
        raise ValueError(f"table has {len(table)} rows but the diagnosis covers {diagnosis.n_pairs} pairs")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    p = diagnosis.pairs
    out = pd.DataFrame(
        {
            "row": range(len(table)),
            "pair_id": table["pair_id"].to_numpy() if "pair_id" in table.columns else range(len(table)),
            "margin": p.margins,
            "dp": p.dp,
            "dn": p.dn,
            "tat": p.tat,
            "prompt": table["prompt"].astype(str).str.slice(0, _PREVIEW_CHARS).to_numpy(),
            "chosen": table["chosen"].astype(str).str.slice(0, _PREVIEW_CHARS).to_numpy(),
            "rejected": table["rejected"].astype(str).str.slice(0, _PREVIEW_CHARS).to_numpy(),
        }
    )
    return out.sort_values(["margin", "row"], kind="stable").head(n).reset_index(drop=True)
