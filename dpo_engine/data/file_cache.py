"""Parsed preference files kept in the workspace while the file is unchanged.

Reading a large JSON Lines or CSV file and checking every row takes seconds per 100k pairs, and a
file is read again by every training run, diagnosis and page that names it. The canonical table
(flagged rows dropped) and the drop counts are kept as Parquet under `<workspace>/file_cache/`,
keyed on the file's resolved path, size and modification time (`rundir.file_stamp`: a file rewritten
with the same size and time is the one change it misses, as for make). The newest `MAX_ENTRIES`
entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_engine.rundir import file_stamp

CACHE_DIR = "file_cache"
FORMAT = 1  # bump when the canonical table or the reading rules change
MAX_ENTRIES = 4
_DROPPED_KEY = b"dpo_kernels_dropped"
_OBJECT_KEY = b"dpo_kernels_object_columns"


def file_key(path: str | os.PathLike) -> str | None:
    """The cache key of a file as it is now (None when it is not a file)."""
    stamp = file_stamp(path)
    if stamp is None:
        return None
    text = f"format={FORMAT}|{stamp['path']}|{stamp['size']}|{stamp['mtime_ns']}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(entry: Path) -> tuple[pd.DataFrame, dict[str, int]] | None:
    try:
        table = pq.read_table(entry)
        meta = table.schema.metadata or {}
        dropped = json.loads(meta.get(_DROPPED_KEY, b"{}"))
        frame = table.to_pandas()
        for column in json.loads(meta.get(_OBJECT_KEY, b"[]")):  # Parquet reads text as str dtype
            values = frame[column]
            frame[column] = values.astype(object).where(values.notna(), None)
        os.utime(entry)  # most recently used
        return frame, {str(k): int(v) for k, v in dropped.items()}
    except (OSError, ValueError, pa.ArrowException):
        return None  # unreadable entry: parse the file again


def _write(entry: Path, table: pd.DataFrame, dropped: dict[str, int]) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=True)  # the kept rows' own index, as parsed
    objects = [str(c) for c in table.columns if table[c].dtype == object]
    metadata = {
        **(arrow.schema.metadata or {}),
        _DROPPED_KEY: json.dumps(dropped).encode(),
        _OBJECT_KEY: json.dumps(objects).encode(),
    }
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow.replace_schema_metadata(metadata), tmp)
        os.replace(tmp, entry)
    except OSError:  # a full or read-only workspace: the file is simply read again next time
        tmp.unlink(missing_ok=True)
        return
    try:  # keep the newest; another process may be evicting the same entries at this moment
        entries = sorted(entry.parent.glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def cached_file_table(
    root: Path | None, key: str | None, path: str | os.PathLike, parse
) -> tuple[pd.DataFrame, dict[str, int]]:
    """`parse(path)` -> (table, dropped), or what it returned before for the file `key` names (root or
    key None: no cache). Take `key` (`file_key`) before parsing, so a file that changes while it is
    read is parsed again next time."""
    entry = Path(root) / CACHE_DIR / f"{key}.parquet" if root is not None and key is not None else None
    if entry is not None and entry.is_file():
        hit = _read(entry)
        if hit is not None:
            return hit
    table, dropped = parse(path)
    if entry is not None:
        _write(entry, table, dropped)
    return table, dropped
