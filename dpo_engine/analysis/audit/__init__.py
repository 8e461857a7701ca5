"""The data audit of the diagnosis: length bias, duplicates and conflicts, train/held-out leakage (METHOD.md 1.5)."""

from dpo_engine.analysis.audit.findings import (
    AUDIT_FLAGGED,
    DataAudit,
    Finding,
    SplitSettings,
    audit_data,
    flagged_with_texts,
    summary_lines,
)
from dpo_engine.analysis.audit.length import LengthBias, length_bias, wilson_interval
from dpo_engine.analysis.audit.neighbours import near_neighbours, near_pairs, nearest_in

__all__ = [
    "AUDIT_FLAGGED",
    "DataAudit",
    "Finding",
    "LengthBias",
    "SplitSettings",
    "audit_data",
    "flagged_with_texts",
    "length_bias",
    "near_neighbours",
    "near_pairs",
    "nearest_in",
    "summary_lines",
    "wilson_interval",
]
