"""The data audit as one object: length bias, repeats and conflicts, leakage, each with what to do.

`audit_data` takes the preference table, and optionally the diagnosis's sentence embeddings and the
token pre-flight's token counts; `DataAudit.to_json_dict` is ``diagnosis.json["audit"]`` and
`DataAudit.flagged` lists every flagged pair once per finding (``audit_flagged.parquet``); label-noise
candidates come from per-pair signals the caller computes (`label_noise`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.analysis.audit import thresholds as limits
from dpo_engine.analysis.audit.duplicates import Duplicates, find_duplicates
from dpo_engine.analysis.audit.label_noise import LabelNoise, label_noise
from dpo_engine.analysis.audit.leakage import Leakage, leakage
from dpo_engine.analysis.audit.length import Interval, LengthBias, length_bias
from dpo_engine.data.split import SPLIT_BY, SplitBy, split_pairs, text_keys

AUDIT_FLAGGED = "audit_flagged.parquet"
TEXT_COLUMNS = ("prompt", "chosen", "rejected")


class SplitSettings(BaseModel):
    """The held-out split the Train form will use (TrainConfig's data.* defaults; seed = optimisation.seed)."""

    model_config = ConfigDict(extra="forbid")

    split_by: SplitBy = "prompt"
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    min_eval_pairs: int = Field(32, ge=1)
    seed: int = 0


class Finding(BaseModel):
    """One line of the audit's summary table."""

    key: str
    title: str
    count: int  # pairs concerned
    share: float  # of the pairs (of the held-out pairs for leakage)
    interval: Interval | None = None  # where the number is an estimate
    severity: str  # "warning" (act on it), "info" (know it), "ok"
    action: str


class DataAudit(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    n_pairs: int
    thresholds: dict[str, float]
    length: dict[str, LengthBias]  # "characters", and "tokens" when a tokenizer was available
    duplicates: Duplicates
    split: SplitSettings
    leakage: dict[str, Leakage]  # one per split_by; split.split_by is the one training will use
    findings: list[Finding]
    label_noise: LabelNoise | None = None  # absent when no label-noise signal was computed
    flagged: pd.DataFrame = Field(exclude=True)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flagged_with_texts(self, table: pd.DataFrame) -> pd.DataFrame:
        """The flagged rows with pair ids and texts, for export (CSV, JSONL)."""
        return flagged_with_texts(self.flagged, table)


def flagged_with_texts(flagged: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    rows = flagged["row"].to_numpy()
    related = flagged["related_row"]
    out = flagged.copy()
    if "pair_id" in table.columns:
        ids = table["pair_id"].astype(str).to_numpy()
        out.insert(1, "pair_id", ids[rows])
        out.insert(
            out.columns.get_loc("related_row") + 1,
            "related_pair_id",
            [ids[int(r)] if pd.notna(r) else None for r in related],
        )
    for column in TEXT_COLUMNS:
        out[column] = table[column].astype(str).to_numpy()[rows]
    return out


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def _findings(n: int, length: dict[str, LengthBias], dup: Duplicates, leaks: dict[str, Leakage], used: str):
    out = []
    for unit, lb in length.items():
        out.append(
            Finding(
                key=f"length_bias_{unit}",
                title=f"chosen is the longer response ({unit}; pairs of unequal length)",
                count=lb.chosen_longer,
                share=lb.share_chosen_longer if lb.share_chosen_longer is not None else 0.0,
                interval=lb.interval,
                severity="warning" if lb.flagged else "ok",
                action=lb.advice,
            )
        )
        if lb.baseline_accuracy is not None:
            out.append(
                Finding(
                    key=f"length_baseline_{unit}",
                    title=f"accuracy of 'prefer the longer answer' ({unit}; ties count half)",
                    count=round(lb.baseline_accuracy * n),
                    share=lb.baseline_accuracy,
                    interval=lb.baseline_interval,
                    severity="warning" if lb.flagged else "ok",
                    action="The bar a trained policy's held-out reward accuracy has to clear to show more than "
                    "length preference.",
                )
            )

    def add(key, title, count, severity_if_any, action, total=n):
        if count is None:
            return
        out.append(
            Finding(
                key=key,
                title=title,
                count=count,
                share=_share(count, total),
                severity=severity_if_any if count else "ok",
                action=action if count else "Nothing to do.",
            )
        )

    add(
        "duplicate_pair",
        "exact duplicate pairs (repeats of an earlier pair)",
        dup.duplicate_pairs,
        "warning",
        "Drop the repeats (keep the first of each): a repeated pair counts twice in the loss.",
    )
    add(
        "conflict",
        "conflicting pairs (same comparison labelled both ways)",
        dup.conflicts,
        "warning",
        "Fix the label if one is wrong, else drop both: the two pairs cancel each other in the loss.",
    )
    add(
        "identical_responses",
        "chosen and rejected identical (normalised text)",
        dup.identical_responses,
        "warning",
        "Drop: the pair carries no preference (or fix the response that was meant to differ).",
    )
    add(
        "near_identical_responses",
        f"chosen and rejected near-identical (cosine >= {limits.NEAR_IDENTICAL_RESPONSE_COSINE})",
        dup.near_identical_responses,
        "warning",
        "Read them: if the responses say the same thing, drop the pair or fix the response; the label is noise.",
    )
    add(
        "duplicate_prompt",
        "pairs whose prompt another pair shares",
        dup.duplicate_prompt_pairs,
        "info",
        "Several pairs per prompt are normal; keep them, but split by prompt (data.split_by = prompt) so no "
        "prompt sits on both sides of the split.",
    )
    add(
        "near_duplicate_prompt",
        f"pairs with a near-duplicate prompt (cosine >= {limits.NEAR_DUPLICATE_PROMPT_COSINE})",
        dup.near_duplicate_prompt_rows,
        "info",
        "Check them: a reworded repeat of a prompt acts like a duplicate prompt; drop the repeats or keep them "
        "on one side of the split.",
    )
    for split_by, lk in leaks.items():
        mark = " (the split training will use)" if split_by == used else " (for comparison)"
        add(
            f"leak_exact_{split_by}",
            f"held-out pairs whose prompt is trained on, split by {split_by}{mark}",
            lk.exact,
            "warning",
            "Split by prompt (data.split_by = prompt), which keeps every prompt on one side.",
            lk.n_held_out,
        )
        add(
            f"leak_near_{split_by}",
            f"held-out pairs with a training prompt at cosine >= {limits.NEAR_DUPLICATE_PROMPT_COSINE}, "
            f"split by {split_by}{mark}",
            lk.near,
            "warning",
            "Split by prompt first; reworded prompts left after that: drop them from one side or accept that "
            "held-out accuracy partly measures memory.",
            lk.n_held_out,
        )
    return out


def _label_noise_finding(n: int, ln: LabelNoise) -> Finding:
    if ln.shown is None:
        return Finding(
            key="label_noise",
            title="label-noise ranking not shown: no signal computed here beat chance at finding flipped labels",
            count=0,
            share=0.0,
            severity="info",
            action="No ranking is shown: none of the signals computed for this diagnosis found flipped labels "
            "reliably (METHOD.md 1.6).",
        )
    q = ln.measured["signals"][ln.shown]
    return Finding(
        key="label_noise",
        title=f"label-noise candidates, ranked by the {ln.shown} signal (measured: {q['precision']:.0%} of the top "
        f"{q['k']} were flipped labels, random {q['random_precision']:.0%})",
        count=ln.n_flagged,
        share=_share(ln.n_flagged, n),
        severity="info",
        action="Read them, most suspicious first: swap the labels of pairs that are mislabeled, drop pairs that are "
        "ambiguous. A listed pair is a candidate, not a verdict.",
    )


def audit_data(
    table: pd.DataFrame,
    *,
    prompt_emb: np.ndarray | None = None,
    chosen_emb: np.ndarray | None = None,
    rejected_emb: np.ndarray | None = None,
    token_counts: dict[str, np.ndarray] | None = None,
    split: SplitSettings | None = None,
    label_noise_signals: dict[str, np.ndarray] | None = None,
    label_noise_model: str | None = None,
) -> DataAudit:
    """Audit a preference table (rows in dataset order, as diagnosed and as training reads them).

    ``label_noise_signals`` maps signal names (`label_noise.SIGNALS`) to per-pair scores."""
    split = split or SplitSettings()
    n = len(table)
    length = {
        "characters": length_bias(
            table["chosen"].astype(str).str.len().to_numpy(),
            table["rejected"].astype(str).str.len().to_numpy(),
            "characters",
        )
    }
    if token_counts is not None:
        length["tokens"] = length_bias(token_counts["chosen"], token_counts["rejected"], "tokens")
    prompt_keys = text_keys(table["prompt"])
    dup, flagged = find_duplicates(table, prompt_keys, prompt_emb, chosen_emb, rejected_emb)
    leaks, leak_flags = {}, []
    for split_by in SPLIT_BY:
        try:
            train_idx, held_out_idx = split_pairs(
                table["prompt"],
                split_by=split_by,
                eval_fraction=split.eval_fraction,
                min_eval_pairs=split.min_eval_pairs,
                seed=split.seed,
                keys=prompt_keys,
            )
        except ValueError:  # e.g. a single prompt cannot be split by prompt
            continue
        leaks[split_by], rows = leakage(prompt_keys, train_idx, held_out_idx, split_by, prompt_emb)
        leak_flags.append(rows)
    findings = _findings(n, length, dup, leaks, split.split_by)
    noise = None
    if label_noise_signals:
        noise, noise_flags = label_noise(label_noise_signals, model=label_noise_model)
        findings.append(_label_noise_finding(n, noise))
        if len(noise_flags):
            leak_flags.append(noise_flags)
    flagged = pd.concat([flagged, *leak_flags], ignore_index=True)
    return DataAudit(
        n_pairs=n,
        thresholds={
            "confidence": limits.CONFIDENCE,
            "length_bias_margin": limits.LENGTH_BIAS_MARGIN,
            "near_duplicate_prompt_cosine": limits.NEAR_DUPLICATE_PROMPT_COSINE,
            "near_identical_response_cosine": limits.NEAR_IDENTICAL_RESPONSE_COSINE,
            "label_noise_max_pairs": limits.LABEL_NOISE_MAX_PAIRS,
            "label_noise_lift": limits.LABEL_NOISE_LIFT,
        },
        length=length,
        duplicates=dup,
        split=split,
        leakage=leaks,
        findings=findings,
        label_noise=noise,
        flagged=flagged,
    )


def summary_lines(audit: dict[str, Any]) -> list[str]:
    """Plain-text lines of ``diagnosis.json["audit"]`` for the CLI."""
    lines = [
        f"audit      {audit['n_pairs']} pairs; split by {audit['split']['split_by']} "
        f"(seed {audit['split']['seed']}, eval fraction {audit['split']['eval_fraction']:g})"
    ]
    for f in audit["findings"]:
        interval = f.get("interval")
        ci = f" [{interval['low']:.1%}, {interval['high']:.1%}]" if interval else ""
        mark = {"warning": "!", "info": "i", "ok": " "}.get(f["severity"], " ")
        lines.append(f"  {mark} {f['title']}: {f['count']} ({f['share']:.1%}{ci})")
        if f["severity"] == "warning":
            lines.append(f"      {f['action']}")
    return lines
