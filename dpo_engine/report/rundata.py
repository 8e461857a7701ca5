"""Everything a page or a report shows about one run, read from its run directory in one go.

Run directories are read while a worker is still writing them, so every piece is optional: a
missing file gives an empty table or None, a half-written last JSONL line is skipped, and
anything else that cannot be read is recorded in `warnings` (shown to the user, never dropped
silently). The files are read with `dpo_engine.rundir`, the one reader and writer of the
run-directory contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpo_engine import rundir


@dataclass
class Snapshot:
    """Probe-set representations at one step (full dimension, as stored)."""

    step: int
    chosen: np.ndarray
    rejected: np.ndarray
    pair_ids: np.ndarray


@dataclass
class RunData:
    run_id: str
    run_dir: Path
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    eval: pd.DataFrame = field(default_factory=pd.DataFrame)
    snapshot_steps: list[int] = field(default_factory=list)
    htsr_before: pd.DataFrame | None = None
    htsr_after: pd.DataFrame | None = None
    htsr_update: pd.DataFrame | None = None  # HT-SR of what training changed (ΔW per layer)
    htsr: pd.DataFrame | None = None  # an "htsr" job's single table
    warnings: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.metrics.empty and self.eval.empty and not self.snapshot_steps and self.summary is None

    @property
    def kernel_name(self) -> str | None:
        return rundir.config_value(self.config, "method", "kernel", "name")

    @property
    def divergence_name(self) -> str | None:
        return rundir.config_value(self.config, "method", "divergence", "name")

    @property
    def epsilon_dpo(self) -> float:
        return float(rundir.config_value(self.config, "method", "loss", "epsilon_dpo") or 0.0)

    @property
    def max_steps(self) -> int | None:
        value = rundir.config_value(self.config, "optimisation", "max_steps")
        return int(value) if value else None

    def snapshot_path(self, step: int) -> Path:
        return rundir.snapshot_path(self.run_dir, step)

    def load_snapshot(self, step: int) -> Snapshot:
        with np.load(self.snapshot_path(step), allow_pickle=False) as npz:
            return Snapshot(
                step,
                np.asarray(npz["chosen"], dtype=np.float32),
                np.asarray(npz["rejected"], dtype=np.float32),
                np.asarray(npz["pair_ids"]),
            )

    def log_tail(self, n_lines: int = 80) -> str:
        return rundir.read_log_tail(self.run_dir / rundir.LOG, n_lines)

    def final(self, column: str, source: str = "eval") -> float | None:
        """Last finite value of a metric (eval table by default)."""
        table = self.eval if source == "eval" else self.metrics
        if column not in table:
            return None
        values = pd.to_numeric(table[column], errors="coerce").dropna()
        return float(values.iloc[-1]) if len(values) else None

    def weighted_alpha(self) -> tuple[float | None, float | None]:
        summary = self.summary or {}
        before = summary.get("weighted_alpha_before")
        after = summary.get("weighted_alpha_after")
        if before is None and self.htsr_before is not None and "alpha_weighted" in self.htsr_before:
            before = float(self.htsr_before["alpha_weighted"].mean())
        if after is None and self.htsr_after is not None and "alpha_weighted" in self.htsr_after:
            after = float(self.htsr_after["alpha_weighted"].mean())
        return before, after


def _table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    if "step" in table:
        table = table.sort_values("step", kind="stable").reset_index(drop=True)
    return table


def load_run(run_dir: str | Path, run_id: str | None = None) -> RunData:
    """Read a run directory (complete or still being written)."""
    run_dir = Path(run_dir)
    data = RunData(run_id=run_id or run_dir.name, run_dir=run_dir)
    if not run_dir.is_dir():
        data.warnings.append(f"run directory {run_dir} does not exist yet")
        return data
    w = data.warnings
    data.config = rundir.read_json(run_dir / rundir.CONFIG, w)
    data.summary = rundir.read_json(run_dir / rundir.SUMMARY, w)
    data.metrics = _table(rundir.read_jsonl(run_dir / rundir.METRICS, w))
    data.eval = _table(rundir.read_jsonl(run_dir / rundir.EVAL, w))
    data.snapshot_steps = rundir.list_snapshots(run_dir)
    data.htsr_before = rundir.read_csv(run_dir / rundir.HTSR_BEFORE, w)
    data.htsr_after = rundir.read_csv(run_dir / rundir.HTSR_AFTER, w)
    data.htsr_update = rundir.read_csv(run_dir / rundir.HTSR_UPDATE, w)
    data.htsr = rundir.read_csv(run_dir / "htsr.csv", w)
    return data


def load_dataset_texts(workspace, dataset: str | None) -> pd.DataFrame | None:
    """pair_id -> prompt / chosen / rejected of a stored dataset or a preference file, for hover texts
    and pair lists; None when the dataset is unavailable."""
    if not dataset:
        return None
    try:
        from dpo_engine.data import open_dataset

        table = open_dataset(workspace, dataset).table
    except Exception:  # the dataset may have been deleted or be a file path elsewhere; hovers then show ids
        return None
    columns = [c for c in ("pair_id", "prompt", "chosen", "rejected") if c in table]
    if "pair_id" not in columns:
        return None
    return table[columns].set_index("pair_id")


DATA_FILE_CHANGED = (
    "The file this run read has changed since (its size or modification time differ), so its texts are not "
    "shown: the pair ids are rows of the file as it was."
)


def run_dataset_source(run_dir: Path, dataset: str | None) -> str | None:
    """Where a run's texts are read: the file it recorded reading (its absolute path), else its dataset."""
    recorded = rundir.data_file_record(run_dir)
    return recorded["path"] if recorded is not None else dataset


def texts_note(run_dir: Path, dataset: str | None) -> str | None:
    """What to say beside a run's texts: the file changed since (texts left out), or, for a run from
    before files were stamped, that they are read from the file as it is now; None otherwise."""
    changed = rundir.data_file_changed(run_dir)
    if changed:
        return DATA_FILE_CHANGED
    if changed is None and dataset and rundir.file_stamp(dataset) is not None:
        return f"Texts are read from `{dataset}` as it is now: if the file changed since the run, they may not match."
    return None


def run_dataset_texts(workspace, run_dir: Path, dataset: str | None, load=load_dataset_texts) -> pd.DataFrame | None:
    """The texts of a run's pairs, read by `load(workspace, source)` from the file the run recorded
    reading, else its dataset; None when that file has changed since."""
    if rundir.data_file_changed(run_dir):
        return None
    return load(workspace, run_dataset_source(run_dir, dataset))


@dataclass
class RunEntry:
    """One run the pages can show: its directory and, when it came from the queue, its job."""

    run_id: str
    run_dir: Path
    job: Any | None = None
    example: bool = False  # a finished run shipped with the product (assets/example_runs), not the user's

    @property
    def status(self) -> str:
        if self.job is not None:
            return self.job.status
        summary = rundir.read_json(self.run_dir / rundir.SUMMARY) or {}
        return str(summary.get("status", "unknown"))

    @property
    def title(self) -> str:
        job = self.job
        return f" · {job.title}" if job is not None and job.title and job.title != job.kind else ""

    @property
    def example_mark(self) -> str:
        return f" {EXAMPLE_MARK}" if self.example else ""

    @property
    def label(self) -> str:
        return f"{self.run_id} [{self.status}]{self.title}{self.example_mark}"

    @property
    def live_label(self) -> str:
        """Label for a picker that stays on screen while the run changes state (no status to go stale)."""
        return f"{self.run_id}{self.title}{self.example_mark}"


def list_runs(workspace, jobs: list | None = None, kind: str = "train") -> list[RunEntry]:
    """Runs of one kind, newest first: every job of that kind plus run directories written without
    the queue (e.g. `dpo-kernels train --foreground`), recognised by their config.json."""
    entries: dict[str, RunEntry] = {}
    for job in jobs or []:
        if job.kind == kind:
            entries[job.run_id] = RunEntry(job.run_id, Path(job.run_dir), job)
    if kind == "train" and workspace.runs_dir.is_dir():
        loose = [
            p
            for p in workspace.runs_dir.iterdir()
            if p.is_dir() and p.name not in entries and (p / "config.json").is_file()
        ]
        for path in sorted(loose, key=lambda p: p.stat().st_mtime, reverse=True):
            entries[path.name] = RunEntry(path.name, path)
    job_entries = [e for e in entries.values() if e.job is not None]
    job_entries.sort(key=lambda e: e.job.created_at, reverse=True)
    return job_entries + [e for e in entries.values() if e.job is None]


RUN_LIST_LIMIT = 1000  # newest jobs considered; the same bound for every page, so counts and lists agree


def workspace_runs(workspace, store, kind: str = "train", *, examples: bool = True) -> list[RunEntry]:
    """The one list of runs every page shows (Overview counts it, Runs and Compare list it): jobs of
    `kind` from the queue plus run directories written without it, e.g. `dpo-kernels train --foreground`.

    A workspace without training runs of its own gets the shipped example runs instead (marked
    `example`), so a fresh installation opens on a finished run; they disappear once a run exists.
    """
    entries = list_runs(workspace, store.list(kind=kind, limit=RUN_LIST_LIMIT), kind=kind)
    if not entries and kind == "train" and examples:
        return example_runs(workspace)
    return entries


# ---------------------------------------------------------------- shipped example runs

EXAMPLE_MARK = "[example]"
EXAMPLES_DIR_NAME = "example_runs"  # in the repository's assets/ and, copied on first use, in the workspace


def shipped_examples_dir() -> Path:
    """assets/example_runs in the repository (written by scripts/learning_sweep.py --store-examples)."""
    return Path(__file__).resolve().parents[2] / "assets" / EXAMPLES_DIR_NAME


def example_runs(workspace, source: Path | None = None) -> list[RunEntry]:
    """The shipped example runs as entries, copied into <workspace>/example_runs on first use.

    The pages and the report read the copy, so caches they write (projections) land in the
    workspace, never in the repository.
    """
    import shutil

    source = shipped_examples_dir() if source is None else Path(source)
    if not source.is_dir():
        return []
    target_root = Path(workspace.root) / EXAMPLES_DIR_NAME
    entries = []
    for run in sorted(p for p in source.iterdir() if (p / rundir.CONFIG).is_file()):
        target = target_root / run.name
        if not (target / rundir.CONFIG).is_file():
            tmp = target_root / f".{run.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(run, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        entries.append(RunEntry(run.name, target, example=True))
    return entries


def example_run_dir(workspace, run_id: str) -> Path | None:
    """The workspace copy of shipped example `run_id`, if it is one."""
    return next((e.run_dir for e in example_runs(workspace) if e.run_id == run_id), None)
