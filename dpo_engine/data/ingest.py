"""Ingestion: bytes or a file in, canonical pairs plus a validation report out, batch by batch.

Nothing is stored here: the report is shown first, then the user's choice of which flagged rows
to drop is applied and `DatasetStore.add` persists the result. `load_preferences` keeps the
result in memory (small files, tests, the CLI's file inputs); `stage_preferences` writes it to a
staging Parquet file batch by batch, so that memory stays bounded by a batch whatever the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dpo_engine.data.errors import DataFormatError, NoUsableRowsError, WorkspaceFull
from dpo_engine.data.layouts import Resolved, extract, resolve
from dpo_engine.data.readers import RecordBatch, RecordReader, open_records
from dpo_engine.data.report import (
    FLAG_REASONS,
    MAX_LISTED_ISSUES,
    REASON_PRIORITY,
    UNUSABLE_REASONS,
    IngestOptions,
    Issue,
    ValidationReport,
)
from dpo_engine.data.validate import flag_rows
from dpo_engine.workspace import disk_full_message

CANONICAL_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "source_row")


def pair_id_for(row: int) -> str:
    """Stable, readable pair id from the 1-based input row ("p000042")."""
    return f"p{row:06d}"


class ContentHasher:
    """sha256 of the canonical content (ids, texts, category), fed batch by batch."""

    def __init__(self, has_category: bool):
        self.columns = ["pair_id", "prompt", "chosen", "rejected"] + (["category"] if has_category else [])
        self._h = hashlib.sha256()
        self._h.update(json.dumps(self.columns).encode())

    def update(self, table: pd.DataFrame) -> None:
        for values in zip(*(table[c].tolist() for c in self.columns)):
            self._h.update(json.dumps(values, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            self._h.update(b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def content_hash(table: pd.DataFrame) -> str:
    """sha256 of the canonical content (ids, texts, category), independent of pandas internals."""
    hasher = ContentHasher("category" in table.columns)
    hasher.update(table)
    return hasher.hexdigest()


def drop_reasons(drop_flagged: bool | str | Iterable[str]) -> list[str]:
    """The flag reasons whose rows a drop choice removes, in priority order.

    True drops every flagged row, False keeps them all, a reason or an iterable of reasons drops
    only rows with those flags. Unusable rows are always dropped."""
    if drop_flagged is True:
        chosen: list[str] = list(FLAG_REASONS)
    elif drop_flagged is False:
        chosen = []
    elif isinstance(drop_flagged, str):
        chosen = [drop_flagged]
    else:
        chosen = list(drop_flagged)
    unknown = sorted(set(chosen) - set(FLAG_REASONS))
    if unknown:
        raise ValueError(f"unknown flag reason(s) {', '.join(unknown)}; choose from {', '.join(FLAG_REASONS)}")
    return [r for r in FLAG_REASONS if r in set(chosen)]


def unusable_counts(report: ValidationReport) -> dict[str, int]:
    """Unusable rows by reason, each row counted once under the first of REASON_PRIORITY."""
    if report.dropped_unusable is not None:
        return dict(report.dropped_unusable)
    return _primary_unusable(report.issues)


def _primary_unusable(issues: Iterable[Issue]) -> dict[str, int]:
    per_row: dict[int, str] = {}
    rank = {r: i for i, r in enumerate(REASON_PRIORITY)}
    for issue in issues:
        if issue.unusable:
            cur = per_row.get(issue.row)
            if cur is None or rank[issue.reason] < rank[cur]:
                per_row[issue.row] = issue.reason
    counts: dict[str, int] = {}
    for reason in per_row.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def split_kept(
    table: pd.DataFrame, flags: pd.DataFrame, reasons: list[str]
) -> tuple[pd.DataFrame, dict[str, int], int]:
    """(kept rows, dropped flagged rows by primary reason, flagged rows kept) of one batch."""
    drop = flags[reasons].any(axis=1) if reasons else pd.Series(False, index=table.index)
    dropped: dict[str, int] = {}
    if drop.any():
        primary = flags.loc[drop, reasons].idxmax(axis=1)  # first True column in priority order
        dropped = {str(r): int(n) for r, n in primary.value_counts().items()}
    flagged_kept = int(flags.loc[~drop].any(axis=1).sum())
    return table.loc[~drop].reset_index(drop=True), dropped, flagged_kept


def _add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        total[reason] = total.get(reason, 0) + n


def _in_priority_order(counts: dict[str, int]) -> dict[str, int]:
    return {r: counts[r] for r in REASON_PRIORITY if counts.get(r)}


@dataclass
class IngestResult:
    """The usable rows (flagged ones included), their flags, and the validation report.

    `table` holds the canonical columns; `flags` has one boolean column per flag reason, on the
    same index, saying which rows carry which flag.
    """

    table: pd.DataFrame
    flags: pd.DataFrame
    report: ValidationReport

    @property
    def has_category(self) -> bool:
        return "category" in self.table.columns

    def iter_batches(self) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
        """(table, flags) batches of the usable rows: here a single one."""
        yield self.table, self.flags

    def flagged_mask(self, reasons: Iterable[str] | None = None) -> pd.Series:
        """Rows carrying any of `reasons` (all flag reasons when None)."""
        chosen = drop_reasons(True if reasons is None else list(reasons))
        if not chosen:
            return pd.Series(False, index=self.table.index)
        return self.flags[chosen].any(axis=1)

    def finalize(self, drop_flagged: bool | Iterable[str] = True) -> tuple[pd.DataFrame, dict[str, int]]:
        """Kept rows and the dropped-row counts by reason (each dropped row counted once).

        A dropped row with several problems counts under the first of REASON_PRIORITY, so
        n_rows_in == len(kept) + sum(dropped.values())."""
        kept, dropped, _ = split_kept(self.table, self.flags, drop_reasons(drop_flagged))
        _add_counts(dropped, unusable_counts(self.report))
        return kept, _in_priority_order(dropped)

    def preview(self, n: int = 5) -> pd.DataFrame:
        """First `n` canonical rows with a `flags` column listing each row's flag reasons."""
        return preview_rows(self.table.head(n), self.flags.loc[self.table.head(n).index])


def preview_rows(table: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """Canonical rows with a `flags` column listing each row's flag reasons."""
    head = table.copy()
    head["flags"] = [", ".join(r for r in FLAG_REASONS if row[r]) for _, row in flags.iterrows()]
    return head


Progress = Callable[[float, str], None]
# Rows read at most while looking for the first records that settle the mapping (a file that
# starts with this many unparsable rows is judged on what it had by then).
_MAX_SAMPLE_SEARCH_ROWS = 100_000


class _Pipeline:
    """Reads batches, settles the mapping on the first rows, extracts and flags batch by batch.

    Iterate `batches()` for (table, flags) per batch; `report()` afterwards has the counts.
    """

    def __init__(
        self,
        reader: RecordReader,
        layout: str,
        mapping: dict[str, str] | None,
        options: IngestOptions,
        progress: Progress | None,
    ):
        self.reader, self.layout, self.mapping, self.options = reader, layout, mapping, options
        self.progress = progress
        self.resolved: Resolved | None = None
        self.issues: list[Issue] = []  # the first MAX_LISTED_ISSUES
        self.n_unlisted = 0
        self.rows_by_reason = {r: 0 for r in REASON_PRIORITY}
        self.dropped_unusable: dict[str, int] = {}
        self.n_rows_in = self.n_usable = self.n_flagged = self.n_unusable = 0
        self.flag_counts = {r: 0 for r in FLAG_REASONS}
        self._seen: dict[bytes, int] = {}

    def batches(self) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
        source = self.reader.batches(self.options.batch_rows)
        # The first rows settle the mapping and layout (as many as layout detection looks at).
        buffered: list[RecordBatch] = []
        for batch in source:
            buffered.append(batch)
            n_records = sum(len(b.records) for b in buffered)
            n_read = sum(len(b.records) + len(b.malformed) for b in buffered)
            if n_records >= self.options.detect_sample_rows or n_read >= _MAX_SAMPLE_SEARCH_ROWS:
                break
        sample = [rec for b in buffered for rec in b.records]
        n_in = sum(len(b.records) + len(b.malformed) for b in buffered)
        if n_in == 0 and not self.reader.columns:
            raise DataFormatError("the file contains no rows")
        self.resolved = resolve(self.reader.columns, sample, self.layout, self.mapping, self.options.detect_sample_rows)
        if n_in == 0:
            raise DataFormatError("the file contains a header but no rows")
        del sample
        for batch in _chain(buffered, source):
            yield self._process(batch)

    def _process(self, batch: RecordBatch) -> tuple[pd.DataFrame, pd.DataFrame]:
        assert self.resolved is not None
        self.n_rows_in += len(batch.records) + len(batch.malformed)
        ext = extract(batch.records, batch.rows, self.resolved)
        table = canonical_frame(ext.rows, ext.prompt, ext.chosen, ext.rejected, ext.category)
        flags, flag_issues = flag_rows(
            table,
            max_chars=self.options.max_chars,
            had_decode_errors=self.reader.had_decode_errors,
            seen=self._seen,
        )
        # A row's problems all lie in its batch, so per-batch counts of rows add up exactly.
        issues = sorted(batch.malformed + ext.issues + flag_issues, key=lambda i: i.row)
        for reason in REASON_PRIORITY:
            self.rows_by_reason[reason] += len({i.row for i in issues if i.reason == reason})
        self.n_unusable += len({i.row for i in issues if i.reason in UNUSABLE_REASONS})
        _add_counts(self.dropped_unusable, _primary_unusable(issues))
        room = MAX_LISTED_ISSUES - len(self.issues)
        self.issues.extend(issues[: max(room, 0)])
        self.n_unlisted += max(len(issues) - max(room, 0), 0)
        self.n_usable += len(table)
        self.n_flagged += int(flags.any(axis=1).sum())
        if self.progress is not None:
            self.progress(self.reader.progress, f"{self.n_rows_in:,} rows read")
        return table, flags

    def report(self) -> ValidationReport:
        assert self.resolved is not None
        decode_warning = "the file is not valid UTF-8; undecodable bytes were replaced and their rows flagged"
        report = ValidationReport(
            detected_format=self.reader.format,
            detected_layout=self.resolved.layout,
            mapping=self.resolved.mapping,
            columns_found=[str(c) for c in self.reader.columns],
            n_rows_in=self.n_rows_in,
            n_unusable=self.n_unusable,
            n_flagged=self.n_flagged,
            n_usable=self.n_usable,
            counts=dict(self.rows_by_reason),
            issues=self.issues,
            warnings=self.reader.warnings
            + self.resolved.warnings
            + ([decode_warning] if self.reader.had_decode_errors else []),
            n_issues_unlisted=self.n_unlisted,
            dropped_unusable=_in_priority_order(self.dropped_unusable),
        )
        if self.n_usable == 0:
            first = ", ".join(f"row {i.row}: {i.message}" for i in self.issues[:3])
            raise NoUsableRowsError(f"no usable rows ({report.summary()}); e.g. {first}", report=report)
        return report


def _chain(buffered: list[RecordBatch], rest: Iterator[RecordBatch]) -> Iterator[RecordBatch]:
    while buffered:
        yield buffered.pop(0)
    yield from rest


def canonical_frame(
    rows: list[int], prompt: list[str], chosen: list[str], rejected: list[str], category: list | None
) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "pair_id": pd.Series([pair_id_for(r) for r in rows], dtype=object),
            "prompt": pd.Series(prompt, dtype=object),
            "chosen": pd.Series(chosen, dtype=object),
            "rejected": pd.Series(rejected, dtype=object),
            "source_row": pd.Series(rows, dtype="int64"),
        }
    )
    if category is not None:
        table["category"] = pd.Series(category, dtype=object)
    return table


def _guarded(fn):
    """Whole-file problems as DataFormatError; nothing else a file can cause escapes as a traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataFormatError:
            raise
        except RecursionError as exc:
            raise DataFormatError("the data is nested too deeply to read") from exc
        except MemoryError as exc:
            raise DataFormatError("the file is too large to load into memory") from exc

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = fn.__doc__, fn.__name__, fn
    return wrapper


def _pipeline(source, filename, fmt, layout, mapping, options, progress) -> _Pipeline:
    if layout not in ("auto", "flat", "conversational", "hh"):
        raise DataFormatError(f"unknown layout {layout!r}; use auto, flat, conversational or hh")
    reader = open_records(source, filename, fmt, options)
    return _Pipeline(reader, layout, mapping, options, progress)


@_guarded
def load_preferences(
    source: str | Path | bytes,
    *,
    filename: str | None = None,
    fmt: str = "auto",
    layout: str = "auto",
    mapping: dict[str, str] | None = None,
    options: IngestOptions = IngestOptions(),
    progress: Progress | None = None,
) -> IngestResult:
    """Read, interpret and validate preference pairs into memory; raise DataFormatError for unusable input.

    `source` is a path or the file's bytes (then `filename` gives the extension hint).
    `fmt`: auto|jsonl|json|csv|parquet (gzip is recognised in any case); `layout`:
    auto|flat|conversational|hh; `mapping`: canonical field -> source column.
    """
    pipeline = _pipeline(source, filename, fmt, layout, mapping, options, progress)
    tables, flags = [], []
    for table, flag in pipeline.batches():
        tables.append(table)
        flags.append(flag)
    report = pipeline.report()
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    flag = pd.concat(flags, ignore_index=True) if len(flags) > 1 else flags[0]
    return IngestResult(table=table, flags=flag, report=report)


STAGED_DATA = "staged.parquet"
STAGED_REPORT = "report.json"


@dataclass
class StagedIngest:
    """A validated file written to a staging folder: the pairs with their flags, and the report.

    Read back batch by batch (`iter_batches`) so that storing it never holds the whole file."""

    folder: Path
    report: ValidationReport
    has_category: bool

    @classmethod
    def open(cls, folder: str | Path) -> StagedIngest:
        import pyarrow.parquet as pq

        folder = Path(folder)
        report = cls.report_only(folder)
        names = pq.ParquetFile(folder / STAGED_DATA).schema_arrow.names
        return cls(folder, report, "category" in names)

    @staticmethod
    def report_only(folder: str | Path) -> ValidationReport:
        """The report a validation left, also when no pairs were staged (every row unusable)."""
        return ValidationReport.model_validate_json((Path(folder) / STAGED_REPORT).read_text(encoding="utf-8"))

    def iter_batches(self) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.folder / STAGED_DATA)
        for i in range(parquet.num_row_groups):
            frame = parquet.read_row_group(i).to_pandas()
            flag_cols = [f"flag_{r}" for r in FLAG_REASONS]
            flags = frame[flag_cols].rename(columns=lambda c: c[len("flag_") :]).astype(bool)
            yield frame.drop(columns=flag_cols), flags

    def preview(self, n: int = 5) -> pd.DataFrame:
        table, flags = next(self.iter_batches())
        return preview_rows(table.head(n), flags.head(n))

    def kept_count(self, drop_flagged: bool | Iterable[str]) -> tuple[int, dict[str, int]]:
        """How many rows a drop choice keeps, and what it drops by reason (reads only the flags)."""
        import pyarrow.parquet as pq

        reasons = drop_reasons(drop_flagged)
        flags = pq.read_table(self.folder / STAGED_DATA, columns=[f"flag_{r}" for r in FLAG_REASONS]).to_pandas()
        flags.columns = list(FLAG_REASONS)
        kept, dropped, _ = split_kept(pd.DataFrame(index=flags.index), flags, reasons)
        _add_counts(dropped, unusable_counts(self.report))
        return len(kept), _in_priority_order(dropped)


@_guarded
def stage_preferences(
    source: str | Path | bytes,
    folder: str | Path,
    *,
    filename: str | None = None,
    fmt: str = "auto",
    layout: str = "auto",
    mapping: dict[str, str] | None = None,
    options: IngestOptions = IngestOptions(),
    progress: Progress | None = None,
) -> StagedIngest:
    """Validate like `load_preferences`, writing the pairs and flags to `folder` batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = _pipeline(source, filename, fmt, layout, mapping, options, progress)
    writer = None
    target = folder / STAGED_DATA
    try:
        for table, flags in pipeline.batches():
            frame = table.copy()
            for reason in FLAG_REASONS:
                frame[f"flag_{reason}"] = flags[reason].to_numpy(dtype=bool)
            arrow = pa.Table.from_pandas(frame, schema=_staged_schema(table), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(target, arrow.schema)
            writer.write_table(arrow)
        report = pipeline.report()
        writer.close()
        (folder / STAGED_REPORT).write_text(report.model_dump_json(), encoding="utf-8")
    except BaseException as exc:
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        target.unlink(missing_ok=True)
        if message := disk_full_message(exc):
            raise WorkspaceFull(f"{message}; nothing was stored") from None
        raise
    return StagedIngest(folder, report, pipeline.resolved is not None and "category" in pipeline.resolved.mapping)


def canonical_schema(has_category: bool):
    """The Arrow schema of stored pairs (fixed, so that every batch writes the same columns)."""
    import pyarrow as pa

    fields = [pa.field(c, pa.string()) for c in ("pair_id", "prompt", "chosen", "rejected")]
    fields.append(pa.field("source_row", pa.int64()))
    if has_category:
        fields.append(pa.field("category", pa.string()))
    return pa.schema(fields)


def _staged_schema(table: pd.DataFrame):
    import pyarrow as pa

    flags = [pa.field(f"flag_{r}", pa.bool_()) for r in FLAG_REASONS]
    return pa.schema(list(canonical_schema("category" in table.columns)) + flags)
