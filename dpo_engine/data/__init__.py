"""Preference data: read any supported file, validate it, and keep datasets in the workspace.

Typical use::

    result = load_preferences("pairs.jsonl.gz")          # or bytes + filename=
    print(result.report.summary())                         # decide what to drop
    info = DatasetStore(ws).add(result, name="my-pairs", source="pairs.jsonl.gz")
"""

from dpo_engine.data.errors import (
    DataFormatError,
    DatasetExists,
    DatasetNotFound,
    MissingColumnsError,
    NoUsableRowsError,
    WorkspaceFull,
)
from dpo_engine.data.ingest import (
    CANONICAL_COLUMNS,
    IngestResult,
    StagedIngest,
    content_hash,
    load_preferences,
    stage_preferences,
)
from dpo_engine.data.layouts import COLUMN_ALIASES, render_messages, suggest_mapping
from dpo_engine.data.report import (
    FLAG_REASONS,
    REASON_PRIORITY,
    UNUSABLE_REASONS,
    IngestOptions,
    Issue,
    ValidationReport,
)
from dpo_engine.data.store import (
    SAMPLE_DATASET_NAME,
    DatasetInfo,
    DatasetStore,
    LoadedDataset,
    ensure_sample_dataset,
    open_dataset,
    sample_path,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "COLUMN_ALIASES",
    "FLAG_REASONS",
    "REASON_PRIORITY",
    "SAMPLE_DATASET_NAME",
    "UNUSABLE_REASONS",
    "DataFormatError",
    "DatasetExists",
    "DatasetInfo",
    "DatasetNotFound",
    "DatasetStore",
    "IngestOptions",
    "IngestResult",
    "LoadedDataset",
    "Issue",
    "MissingColumnsError",
    "NoUsableRowsError",
    "StagedIngest",
    "ValidationReport",
    "WorkspaceFull",
    "content_hash",
    "ensure_sample_dataset",
    "load_preferences",
    "open_dataset",
    "render_messages",
    "sample_path",
    "stage_preferences",
    "suggest_mapping",
]
