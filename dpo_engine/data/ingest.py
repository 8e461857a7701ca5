"""Ingestion entry point: bytes or a file in, canonical table plus validation report out.

Nothing is stored here: the report is shown first, then `IngestResult.finalize` applies the
user's choice of which flagged rows to drop, and `DatasetStore.add` persists the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dpo_engine.data.errors import DataFormatError, NoUsableRowsError
from dpo_engine.data.layouts import extract, resolve
from dpo_engine.data.readers import read_records, read_source
from dpo_engine.data.report import (
    FLAG_REASONS,
    REASON_PRIORITY,
    UNUSABLE_REASONS,
    IngestOptions,
    Issue,
    ValidationReport,
)
from dpo_engine.data.validate import flag_rows

CANONICAL_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source_row")


def pair_id_for(row: int) -> str:
    """Stable, readable pair id from the 1-based input row ("p000042")."""
    return f"p{row:06d}"


def content_hash(table: pd.DataFrame) -> str:
    """sha256 of the canonical content (ids, texts, category), independent of pandas internals."""
    h = hashlib.sha256()
    cols = [c for c in ("pair_id", "prompt", "chosen", "rejected", "category") if c in table.columns]
    h.update(json.dumps(cols).encode())
    for values in zip(*(table[c].tolist() for c in cols)):
        h.update(json.dumps(values, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class IngestResult:
    """The usable rows (flagged ones included), their flags, and the validation report.

    `table` holds the canonical columns; `flags` has one boolean column per flag reason, on the
    same index, saying which rows carry which flag.
    """

    table: pd.DataFrame
    flags: pd.DataFrame
    report: ValidationReport

    def flagged_mask(self, reasons: Iterable[str] | None = None) -> pd.Series:
        """Rows carrying any of `reasons` (all flag reasons when None)."""
        chosen = list(FLAG_REASONS if reasons is None else reasons)
        unknown = sorted(set(chosen) - set(FLAG_REASONS))
        if unknown:
            raise ValueError(f"unknown flag reason(s) {', '.join(unknown)}; choose from {', '.join(FLAG_REASONS)}")
        if not chosen:
            return pd.Series(False, index=self.table.index)
        return self.flags[chosen].any(axis=1)

    def finalize(self, drop_flagged: bool | Iterable[str] = True) -> tuple[pd.DataFrame, dict[str, int]]:
        """Kept rows and the dropped-row counts by reason (each dropped row counted once).

        `drop_flagged`: True drops every flagged row, False keeps them all, an iterable of reasons
        drops only rows with those flags. Unusable rows are always dropped. A dropped row with
        several problems counts under the first of REASON_PRIORITY, so
        n_rows_in == len(kept) + sum(dropped.values()).
        """
        if drop_flagged is True:
            reasons: list[str] = list(FLAG_REASONS)
        elif drop_flagged is False:
            reasons = []
        elif isinstance(drop_flagged, str):
            reasons = [drop_flagged]
        else:
            reasons = list(drop_flagged)
        drop = self.flagged_mask(reasons)
        reasons = [r for r in FLAG_REASONS if r in set(reasons)]  # priority order for attribution
        dropped = {r: 0 for r in REASON_PRIORITY}
        for reason, n in self._unusable_primary_counts().items():
            dropped[reason] += n
        if drop.any():
            sub = self.flags.loc[drop, reasons]
            primary = sub.idxmax(axis=1)  # first True column in priority order
            for reason, n in primary.value_counts().items():
                dropped[str(reason)] += int(n)
        kept = self.table.loc[~drop].reset_index(drop=True)
        return kept, {r: n for r, n in dropped.items() if n}

    def _unusable_primary_counts(self) -> dict[str, int]:
        per_row: dict[int, str] = {}
        rank = {r: i for i, r in enumerate(REASON_PRIORITY)}
        for issue in self.report.issues:
            if issue.unusable:
                cur = per_row.get(issue.row)
                if cur is None or rank[issue.reason] < rank[cur]:
                    per_row[issue.row] = issue.reason
        counts: dict[str, int] = {}
        for reason in per_row.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def preview(self, n: int = 5) -> pd.DataFrame:
        """First `n` canonical rows with a `flags` column listing each row's flag reasons."""
        head = self.table.head(n).copy()
        flags = self.flags.loc[head.index]
        head["flags"] = [", ".join(r for r in FLAG_REASONS if row[r]) for _, row in flags.iterrows()]
        return head


def load_preferences(
    source: str | Path | bytes,
    *,
    filename: str | None = None,
    fmt: str = "auto",
    layout: str = "auto",
    mapping: dict[str, str] | None = None,
    options: IngestOptions = IngestOptions(),
) -> IngestResult:
    """Read, interpret and validate preference pairs; raise DataFormatError for unusable input.

    `source` is a path or the file's bytes (then `filename` gives the extension hint).
    `fmt`: auto|jsonl|json|csv|parquet (gzip is recognised in any case); `layout`:
    auto|flat|conversational|hh; `mapping`: canonical field -> source column.
    """
    try:
        return _load(source, filename, fmt, layout, mapping, options)
    except DataFormatError:
        raise
    except RecursionError as exc:
        raise DataFormatError("the data is nested too deeply to read") from exc
    except MemoryError as exc:
        raise DataFormatError("the file is too large to load into memory") from exc


def _load(
    source: str | Path | bytes,
    filename: str | None,
    fmt: str,
    layout: str,
    mapping: dict[str, str] | None,
    options: IngestOptions,
) -> IngestResult:
    data, name = read_source(source, filename)
    raw = read_records(data, name, fmt)
    if raw.n_rows_in == 0 and not raw.columns:
        raise DataFormatError("the file contains no rows")
    resolved = resolve(raw.columns, raw.records, layout, mapping, options.detect_sample_rows)
    if raw.n_rows_in == 0:
        raise DataFormatError("the file contains a header but no rows")
    ext = extract(raw.records, raw.rows, resolved)

    table = pd.DataFrame(
        {
            "pair_id": [pair_id_for(r) for r in ext.rows],
            "prompt": pd.Series(ext.prompt, dtype=object),
            "chosen": pd.Series(ext.chosen, dtype=object),
            "rejected": pd.Series(ext.rejected, dtype=object),
            "source_row": pd.Series(ext.rows, dtype="int64"),
        }
    )
    if ext.category is not None:
        table["category"] = pd.Series(ext.category, dtype=object)
    flags, flag_issues = flag_rows(table, max_chars=options.max_chars, had_decode_errors=raw.had_decode_errors)

    issues: list[Issue] = sorted(raw.malformed + ext.issues + flag_issues, key=lambda i: i.row)
    counts = {r: 0 for r in REASON_PRIORITY}
    for reason in REASON_PRIORITY:
        counts[reason] = len({i.row for i in issues if i.reason == reason})
    n_unusable = len({i.row for i in issues if i.reason in UNUSABLE_REASONS})
    report = ValidationReport(
        detected_format=raw.format,
        detected_layout=resolved.layout,
        mapping=resolved.mapping,
        columns_found=[str(c) for c in raw.columns],
        n_rows_in=raw.n_rows_in,
        n_unusable=n_unusable,
        n_flagged=int(flags.any(axis=1).sum()),
        n_usable=len(table),
        counts=counts,
        issues=issues,
        warnings=raw.warnings + resolved.warnings,
    )
    if len(table) == 0:
        first = ", ".join(f"row {i.row}: {i.message}" for i in issues[:3])
        raise NoUsableRowsError(f"no usable rows ({report.summary()}); e.g. {first}", report=report)
    return IngestResult(table=table, flags=flags, report=report)
