"""Typed ingestion options and the validation report shown before anything is stored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reason = Literal[
    "malformed",
    "missing_field",
    "wrong_type",
    "empty_field",
    "identical_responses",
    "duplicate",
    "too_long",
    "bad_encoding",
]

# Rows with these problems have no usable prompt/chosen/rejected text and are always dropped.
UNUSABLE_REASONS: tuple[str, ...] = ("malformed", "missing_field", "wrong_type")
# Rows with these problems are usable; the user decides whether to drop or keep them.
FLAG_REASONS: tuple[str, ...] = ("empty_field", "identical_responses", "duplicate", "too_long", "bad_encoding")
# Order in which a dropped row with several problems is attributed to one reason, so that
# rows in = rows kept + sum(dropped counts) holds exactly.
REASON_PRIORITY: tuple[str, ...] = UNUSABLE_REASONS + FLAG_REASONS

# A report lists at most this many problems (the counts stay exact), so that it stays small enough
# to show whatever the file.
MAX_LISTED_ISSUES = 10_000

FormatName = Literal["auto", "jsonl", "json", "csv", "parquet"]
LayoutName = Literal["auto", "flat", "conversational", "hh"]


# The web app's upload limit in MB (served as Streamlit's server.maxUploadSize); the limits on
# what an upload may inflate to are derived from it.
MAX_UPLOAD_MB = 1024


class IngestOptions(BaseModel):
    """Knobs of ingestion; every default is written out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_chars: int = Field(default=20_000, gt=0, description="Texts longer than this are flagged too_long.")
    detect_sample_rows: int = Field(default=200, gt=0, description="Rows looked at when auto-detecting the layout.")
    max_decompressed_mb: int = Field(
        default=4 * MAX_UPLOAD_MB, gt=0, description="A gzip upload may inflate to at most this many MB."
    )
    max_compression_ratio: float = Field(
        default=100.0, gt=1, description="A gzip upload inflating more than this many times over is refused."
    )
    max_row_mb: int = Field(default=16, gt=0, description="A line (row) longer than this is unusable.")
    batch_rows: int = Field(default=5000, gt=0, description="Rows parsed, checked and written per step.")


class Issue(BaseModel):
    """One problem of one row (a row may have several)."""

    model_config = ConfigDict(frozen=True)

    row: int = Field(description="1-based row/line number in the input.")
    reason: Reason
    column: str | None = None
    message: str
    unusable: bool = Field(description="True: the row must be dropped; False: flagged, the user decides.")


class ValidationReport(BaseModel):
    """What ingestion found, with row numbers; produced before anything is stored."""

    detected_format: str
    detected_layout: str
    mapping: dict[str, str] = Field(description="Canonical field -> source column used.")
    columns_found: list[str]
    n_rows_in: int
    n_unusable: int
    n_flagged: int = Field(description="Usable rows with at least one flag.")
    n_usable: int
    counts: dict[str, int] = Field(description="Rows having each reason (a row may count under several).")
    issues: list[Issue] = Field(description="Problems by row, the first MAX_LISTED_ISSUES of them.")
    warnings: list[str]
    n_issues_unlisted: int = Field(default=0, description="Problems beyond MAX_LISTED_ISSUES, counted, not listed.")
    dropped_unusable: dict[str, int] | None = Field(
        default=None, description="Unusable rows, each under its first reason of REASON_PRIORITY (exact)."
    )

    def rows_with(self, reason: str) -> list[int]:
        """Row numbers that have `reason`, ascending, without repeats."""
        return sorted({i.row for i in self.issues if i.reason == reason})

    def summary(self) -> str:
        """One line for logs and CLI messages."""
        parts = [f"{self.n_rows_in} rows in", f"{self.n_usable} usable", f"{self.n_unusable} unusable"]
        parts += [f"{k}={v}" for k, v in self.counts.items() if v]
        return ", ".join(parts)
