"""The dataset registry: canonical tables stored as Parquet with a meta.json beside each.

Layout: `<workspace>/datasets/<dataset_id>/data.parquet` and `meta.json`. A dataset is written
into a hidden temporary directory and renamed into place, so a crash never leaves half a dataset
that `list()` would show. Ids are readable and unique: slug of the name plus 6 hex of the
content hash; `content_hash` is the embedding cache key.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from dpo_engine.data.errors import DataFormatError, DatasetExists, DatasetNotFound, WorkspaceFull
from dpo_engine.data.file_cache import cached_file_table, file_key
from dpo_engine.data.ingest import (
    ContentHasher,
    IngestResult,
    StagedIngest,
    canonical_schema,
    drop_reasons,
    load_preferences,
    split_kept,
    unusable_counts,
)
from dpo_engine.data.report import REASON_PRIORITY
from dpo_engine.workspace import Workspace, current_user, disk_full_message

log = logging.getLogger(__name__)

SAMPLE_DATASET_NAME = "hh-harmless-sample"
SAMPLE_SOURCE = "assets/sample_hh.jsonl.gz"
ExportFormat = Literal["jsonl", "csv", "parquet"]


def assets_dir() -> Path:
    """The repository's assets folder (dpo_engine/../assets)."""
    return Path(__file__).resolve().parents[2] / "assets"


def sample_path() -> Path:
    return assets_dir() / "sample_hh.jsonl.gz"


class DatasetInfo(BaseModel):
    """What meta.json records about a stored dataset."""

    id: str
    name: str
    n_pairs: int
    source: str
    created_at: datetime
    content_hash: str
    n_rows_in: int
    dropped: dict[str, int] = Field(default_factory=dict)
    n_flagged_kept: int = 0
    warnings: list[str] = Field(default_factory=list)
    detected_format: str
    detected_layout: str
    mapping: dict[str, str] = Field(default_factory=dict)
    has_category: bool = False
    submitted_by: str | None = None  # who added it (signed-in user, else the OS user); None before it was recorded


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40].strip("-") or "dataset"


class DatasetStore:
    """Add, list, read, delete and export the datasets of one workspace."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.root = workspace.datasets_dir
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, dataset_id: str) -> Path:
        return self.root / dataset_id

    def add(
        self,
        result: IngestResult | StagedIngest,
        name: str,
        source: str,
        drop_flagged: bool | list[str] = True,
        submitted_by: str | None = None,
    ) -> DatasetInfo:
        """Apply the drop choice and store the kept rows, batch by batch; names must be unique.

        The dataset is written into a hidden folder and renamed into place: a crash or a full
        disk leaves no dataset that `list()` would show. `submitted_by` defaults to
        `current_user()` (the signed-in user in a team deployment)."""
        name = name.strip()
        if not name:
            raise ValueError("a dataset needs a non-empty name")
        if any(info.name == name for info in self.list()):
            raise DatasetExists(f"a dataset named {name!r} already exists; choose another name or delete it")
        reasons = drop_reasons(drop_flagged)
        tmp = Path(tempfile.mkdtemp(prefix=".adding.", dir=self.root))
        try:
            info = self._write(tmp, result, reasons, name, source, submitted_by)
            if self.dir(info.id).exists():
                raise DatasetExists(f"dataset id {info.id!r} already exists")
            tmp.rename(self.dir(info.id))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if message := disk_full_message(exc):
                raise WorkspaceFull(f"{message}; nothing was stored") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    def content_hash_of(self, result: IngestResult | StagedIngest, drop_flagged: bool | list[str] = True) -> str:
        """The content hash the dataset `add` would store for this drop choice (nothing is written)."""
        reasons = drop_reasons(drop_flagged)
        hasher = ContentHasher(result.has_category)
        for table, flags in result.iter_batches():
            hasher.update(split_kept(table, flags, reasons)[0])
        return hasher.hexdigest()

    def _write(
        self,
        folder: Path,
        result: IngestResult | StagedIngest,
        reasons: list[str],
        name: str,
        source: str,
        submitted_by: str | None,
    ) -> DatasetInfo:
        import pyarrow as pa
        import pyarrow.parquet as pq

        hasher = ContentHasher(result.has_category)
        dropped = unusable_counts(result.report)
        n_kept = flagged_kept = 0
        writer = None
        try:
            for table, flags in result.iter_batches():
                kept, batch_dropped, batch_flagged = split_kept(table, flags, reasons)
                for reason, n in batch_dropped.items():
                    dropped[reason] = dropped.get(reason, 0) + n
                n_kept += len(kept)
                flagged_kept += batch_flagged
                hasher.update(kept)
                arrow = pa.Table.from_pandas(kept, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(folder / "data.parquet", canonical_schema(result.has_category))
                writer.write_table(arrow.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
        dropped = {r: dropped[r] for r in REASON_PRIORITY if dropped.get(r)}
        if n_kept == 0:
            raise DataFormatError(f"nothing left to store: all {result.report.n_rows_in} rows were dropped {dropped}")
        digest = hasher.hexdigest()
        info = DatasetInfo(
            id=f"{slugify(name)}-{digest[:6]}",
            name=name,
            n_pairs=n_kept,
            source=source,
            created_at=datetime.now(timezone.utc),
            content_hash=digest,
            n_rows_in=result.report.n_rows_in,
            dropped=dropped,
            n_flagged_kept=flagged_kept,
            warnings=result.report.warnings,
            detected_format=result.report.detected_format,
            detected_layout=result.report.detected_layout,
            mapping=result.report.mapping,
            has_category=result.has_category,
            submitted_by=submitted_by or current_user(),
        )
        (folder / "meta.json").write_text(info.model_dump_json(indent=2), encoding="utf-8")
        return info

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden scratch folder beside the datasets (same disk, never listed), removed afterwards."""
        folder = Path(tempfile.mkdtemp(prefix=".staging.", dir=self.root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def list(self) -> list[DatasetInfo]:
        """All stored datasets, oldest first (unreadable entries are logged and skipped)."""
        infos: list[DatasetInfo] = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            if d.name.startswith(".") or not d.is_dir():
                continue
            meta = d / "meta.json"
            try:
                infos.append(DatasetInfo.model_validate_json(meta.read_text(encoding="utf-8")))
            except (OSError, ValidationError) as exc:
                log.warning("skipping dataset directory %s: unreadable meta.json (%s)", d, exc)
        return sorted(infos, key=lambda i: (i.created_at, i.id))

    def get(self, id_or_name: str) -> DatasetInfo:
        """A dataset by id, else by name."""
        infos = self.list()
        for info in infos:
            if info.id == id_or_name:
                return info
        for info in infos:
            if info.name == id_or_name:
                return info
        known = ", ".join(i.id for i in infos) or "none"
        raise DatasetNotFound(f"no dataset with id or name {id_or_name!r} (known: {known})")

    def load(self, id_or_name: str) -> pd.DataFrame:
        return pd.read_parquet(self.dir(self.get(id_or_name).id) / "data.parquet")

    def delete(self, id_or_name: str) -> DatasetInfo:
        info = self.get(id_or_name)
        shutil.rmtree(self.dir(info.id))
        return info

    def export(self, id_or_name: str, fmt: ExportFormat = "jsonl") -> bytes:
        """The canonical table as JSON Lines, CSV or Parquet bytes (re-ingestable as flat data)."""
        table = self.load(id_or_name)
        if fmt == "jsonl":
            return "".join(
                json.dumps(rec, ensure_ascii=False) + "\n" for rec in table.to_dict(orient="records")
            ).encode("utf-8")
        if fmt == "csv":
            return table.to_csv(index=False).encode("utf-8")
        if fmt == "parquet":
            buf = io.BytesIO()
            table.to_parquet(buf, index=False)
            return buf.getvalue()
        raise ValueError(f"unknown export format {fmt!r}; use jsonl, csv or parquet")


def ensure_sample_dataset(workspace: Workspace) -> DatasetInfo:
    """Register the bundled HH-RLHF sample under SAMPLE_DATASET_NAME unless it is there already."""
    store = DatasetStore(workspace)
    try:
        return store.get(SAMPLE_DATASET_NAME)
    except DatasetNotFound:
        pass
    result = load_preferences(sample_path())
    try:
        return store.add(result, SAMPLE_DATASET_NAME, source=SAMPLE_SOURCE, drop_flagged=True)
    except DatasetExists:  # registered concurrently by another process
        return store.get(SAMPLE_DATASET_NAME)


@dataclass
class LoadedDataset:
    """A preference table and where it came from (dropped: rows removed at ingest, by reason;
    content_hash: what names the table without hashing it again: a stored dataset's content hash, or
    for a file its path, size and modification time, `file_cache.file_key`)."""

    table: pd.DataFrame
    label: str
    source: str
    dataset_id: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    content_hash: str | None = None


def open_dataset(workspace: Workspace, dataset: str) -> LoadedDataset:
    """A stored dataset by id/name, else a file ingested with flagged rows dropped (what jobs accept)."""
    path = Path(dataset).expanduser()
    if path.is_file():
        key = file_key(path)  # before reading: a file changed meanwhile gets a new key next time
        table, dropped = cached_file_table(
            getattr(workspace, "root", None), key, path, lambda p: load_preferences(p).finalize(drop_flagged=True)
        )
        return LoadedDataset(
            table=table,
            label=path.name,
            source=str(path.resolve()),
            dropped=dropped,
            content_hash=None if key is None else f"file:{key}",
        )
    store = DatasetStore(workspace)
    try:
        info = store.get(dataset)
    except DatasetNotFound as exc:
        raise DatasetNotFound(f"{dataset!r} is neither a file nor a stored dataset ({exc})") from None
    return LoadedDataset(
        table=store.load(info.id),
        label=info.name,
        source=f"dataset:{info.id}",
        dataset_id=info.id,
        content_hash=info.content_hash,
    )
