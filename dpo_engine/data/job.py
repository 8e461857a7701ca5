"""The "ingest" job: validate an uploaded file into a staging folder, then store it as a dataset.

The web page only writes the upload to the workspace and submits these jobs, so that parsing a
large file never runs (or runs out of memory) inside the web server. Two steps, each one job:
``validate`` reads the upload batch by batch into ``<run dir>/staged`` and records the report's
summary (or that the columns need mapping); ``store`` applies the user's drop choice to a staged
upload and adds the dataset. Both steps start from scratch when repeated, so a job whose worker
died is simply run again.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.data.errors import DataFormatError, DatasetExists, MissingColumnsError, NoUsableRowsError
from dpo_engine.data.ingest import STAGED_REPORT, StagedIngest, stage_preferences
from dpo_engine.data.report import FLAG_REASONS, FormatName, IngestOptions, LayoutName
from dpo_engine.data.store import DatasetStore
from dpo_engine.workspace import PLAIN_NAME, Workspace

STAGED_DIR = "staged"
STORED_RECORD = "stored.json"  # in the validate job's run directory once its upload is a dataset
UPLOADS_DIR = "uploads"
UPLOAD_MAX_AGE_S = 7 * 24 * 3600
# Someone is waiting on the page for these small jobs: they go ahead of queued training.
INGEST_PRIORITY = -10


class IngestParams(BaseModel):
    """Parameters of an ingest job (every default written out)."""

    model_config = ConfigDict(extra="forbid")

    step: Literal["validate", "store"] = Field(..., description="validate an upload, or store a validated one")
    filename: str | None = Field(None, description="validate: the name the file was uploaded under")
    fmt: FormatName = "auto"
    layout: LayoutName = "auto"
    mapping: dict[str, str] = Field(default_factory=dict, description="canonical field -> source column")
    max_chars: int = Field(IngestOptions().max_chars, gt=0)
    staged: str | None = Field(None, description="store: run directory of the validate job")
    upload: str | None = Field(None, description="the uploaded file, inside the workspace (removed once stored)")
    name: str | None = Field(None, description="store: the dataset's name")
    drop: list[str] = Field(default_factory=lambda: list(FLAG_REASONS), description="store: flags whose rows drop")


def upload_path(workspace: Workspace, token: str, filename: str) -> Path:
    """Where an upload is written: `uploads/<token>/<file name>` (the name made safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name).strip("._-") or "upload"
    return workspace.root / UPLOADS_DIR / re.sub(r"[^A-Za-z0-9_-]+", "", token) / safe[:120]


def _upload_file(workspace: Workspace, path: str | None) -> Path:
    """An upload must be `uploads/<token>/<file>` in the workspace: nothing else is read or removed."""
    return _under(workspace, path, UPLOADS_DIR, depth=2, what="an upload")


def _validated_run(workspace: Workspace, path: str | None) -> Path:
    """A validated upload is the run directory `runs/<run id>` of its validate job."""
    return _under(workspace, path, workspace.runs_dir.name, depth=1, what="a validated upload")


def _under(workspace: Workspace, path: str | None, folder: str, *, depth: int, what: str) -> Path:
    if not path:
        raise ValueError(f"the ingest job needs {what}")
    root = (workspace.root / folder).resolve()
    resolved = Path(path).resolve()
    try:
        parts = resolved.relative_to(root).parts
    except ValueError:
        parts = ()
    if len(parts) != depth or not all(PLAIN_NAME.match(p) and ".." not in p for p in parts):
        raise ValueError(f"{what} must be a path {folder}/{'/'.join(['NAME'] * depth)} in the workspace, got {path}")
    return resolved


def run_ingest_job(ctx) -> dict:
    """Executor of the "ingest" job kind (see the module docstring for the two steps)."""
    params = IngestParams(**ctx.params)
    if params.step == "validate":
        return _validate(ctx, params)
    return _store(ctx, params)


def prune_uploads(workspace: Workspace, max_age_s: float = UPLOAD_MAX_AGE_S) -> None:
    """Remove uploads nobody stored within `max_age_s` (validated files abandoned on the page)."""
    root = workspace.root / UPLOADS_DIR
    now = time.time()
    for folder in root.iterdir() if root.is_dir() else []:
        try:
            if now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _validate(ctx, params: IngestParams) -> dict:
    upload = _upload_file(ctx.workspace, params.upload)
    prune_uploads(ctx.workspace)
    folder = ctx.run_dir / STAGED_DIR
    ctx.progress(0.0, "reading the upload")
    try:
        staged = stage_preferences(
            upload,
            folder,
            filename=params.filename or upload.name,
            fmt=params.fmt,
            layout=params.layout,
            mapping=params.mapping or None,
            options=IngestOptions(max_chars=params.max_chars),
            progress=lambda fraction, message: ctx.progress(min(fraction, 0.99), message),
        )
    except MissingColumnsError as exc:
        return {
            "outcome": "needs_mapping",
            "error": str(exc),
            "columns_found": [str(c) for c in exc.columns_found],
            "missing": list(exc.missing),
            "suggested_mapping": dict(exc.suggested_mapping),
        }
    except NoUsableRowsError as exc:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAGED_REPORT).write_text(exc.report.model_dump_json(), encoding="utf-8")
        return {"outcome": "no_usable_rows", "error": str(exc)}
    except DataFormatError as exc:
        return {"outcome": "unusable", "error": str(exc)}
    ctx.progress(1.0, staged.report.summary())
    return {"outcome": "validated", "summary": staged.report.summary(), "n_usable": staged.report.n_usable}


def _store(ctx, params: IngestParams) -> dict:
    """Store a validated upload; run again after a lost worker, it finds what it stored before."""
    run_dir = _validated_run(ctx.workspace, params.staged)
    if not params.name:
        raise ValueError("the dataset needs a name")
    done = run_dir / STORED_RECORD
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    staged = StagedIngest.open(run_dir / STAGED_DIR)
    ctx.progress(0.0, f"storing {params.name}")
    store = DatasetStore(ctx.workspace)
    try:
        info = store.add(staged, params.name, source=params.filename or staged.folder.name, drop_flagged=params.drop)
    except DatasetExists:
        # Stored by an earlier attempt that died before recording it? Then the content is the same.
        info = store.get(params.name)
        if info.content_hash != store.content_hash_of(staged, params.drop):
            raise
    result = {"outcome": "stored", "dataset_id": info.id, "name": info.name, "n_pairs": info.n_pairs}
    done.write_text(json.dumps(result), encoding="utf-8")
    # The dataset holds the pairs now: the staged copy and the upload are no longer needed.
    shutil.rmtree(staged.folder, ignore_errors=True)
    if params.upload:
        shutil.rmtree(_upload_file(ctx.workspace, params.upload).parent, ignore_errors=True)
    ctx.progress(1.0, f"stored {info.n_pairs} pairs")
    return result
