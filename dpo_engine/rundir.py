"""Writers and readers of the run directory: the contract between worker, pages, CLI and tests.

A leaf module: every layer of the engine may import it, and it imports nothing of the engine.

Readers tolerate a run that is still being written: a partial last JSONL line is skipped, a missing
file reads as empty, so pages can poll a live run.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpo_engine.names import DIVERGENCE_METRICS, MIXTURE_WEIGHTS, SEPARATION_METRICS

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
SUMMARY = "summary.json"
# The summary keys a finished run reports in one glance (the CLI's output, a train job's result).
SUMMARY_HEADLINE = (
    "status",
    "steps_completed",
    "final_eval",
    "wall_time_s",
    "tokens_per_s",
    "peak_memory_mb",
    "weighted_alpha_before",
    "weighted_alpha_after",
    "error",
)
LOG = "log.txt"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.pt"  # written last: a checkpoint folder is complete once it holds this file
MODEL = "model"
CALIBRATION = "calibration.pt"
HTSR_BEFORE = "htsr_before.csv"
HTSR_AFTER = "htsr_after.csv"
HTSR_UPDATE = "htsr_update.csv"  # HT-SR of what training changed, ΔW per layer (analysis/htsr_update.py)
DATA_FILE = "data_file.json"  # the preference file a run read: path, size, modification time
EVAL_MARGINS = "eval_margins.jsonl"  # per held-out pair reward margins at each evaluation (intervals over pairs)

METRIC_KEYS = (
    "step",
    "epoch",
    "loss",
    "loss_pref",
    "loss_div",
    "loss_entropy",
    "reward_acc",
    "margin",
    "beta",
    "lr",
    "grad_norm",
    "tokens_per_s",
)
MIXTURE_KEYS = MIXTURE_WEIGHTS
EVAL_KEYS = (
    "step",
    "loss_pref",
    "reward_acc",
    "hybrid_acc",
    "reward_chosen",
    "reward_rejected",
    *DIVERGENCE_METRICS,
)
SNAPSHOT_EVAL_KEYS = SEPARATION_METRICS  # also in the eval rows of steps that took a snapshot
_SNAPSHOT_RE = re.compile(r"^step_(\d+)\.npz$")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse every line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path: Path, obj: Any) -> None:
    """Atomic write (tmp + rename) so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, default=str))
    os.replace(tmp, path)


def file_stamp(path: str | Path) -> dict[str, Any] | None:
    """Path, size and modification time of a file (None when it is not one): what tells that a file
    read by a run has changed since, without reading it again."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def data_file_record(run_dir: Path) -> dict[str, Any] | None:
    """The stamp of the preference file the run read (`file_stamp`), or None (a stored dataset, or an
    older run)."""
    recorded = read_json(Path(run_dir) / DATA_FILE)
    return recorded if recorded and "path" in recorded else None


def data_file_changed(run_dir: Path) -> bool | None:
    """True when the preference file the run read is gone or differs in size or modification time;
    False when unchanged; None when the run recorded no file (a stored dataset, or an older run)."""
    recorded = data_file_record(run_dir)
    return None if recorded is None else file_stamp(recorded["path"]) != recorded


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(_clean(row), default=str) + "\n")
        fh.flush()


def truncate_jsonl_after_step(path: Path, step: int) -> None:
    """Drop rows with step > `step` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if int(r.get("step", -1)) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file that may be growing: a broken *last* line is a write in progress and is
    skipped quietly; any other unreadable line is skipped and reported in `warnings`."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number != len(lines) and warnings is not None:
                warnings.append(f"{path.name}: line {number} is not valid JSON and was skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
        elif warnings is not None:
            warnings.append(f"{path.name}: line {number} is not a JSON object and was skipped")
    return rows


def read_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(read_jsonl(Path(run_dir) / METRICS))


def read_eval(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(read_jsonl(Path(run_dir) / EVAL))


def append_eval_margins(run_dir: Path, step: int, pair_ids: list[str], margins: np.ndarray) -> None:
    """One row per evaluation: the held-out pairs' ids and reward margins, so accuracies can carry
    intervals over pairs and two runs on the same split can be compared pair by pair."""
    append_jsonl(
        Path(run_dir) / EVAL_MARGINS,
        {
            "step": int(step),
            "pair_ids": [str(p) for p in pair_ids],
            "margin": [float(m) for m in np.asarray(margins).ravel()],
        },
    )


def read_eval_margins(run_dir: Path) -> dict[int, pd.Series]:
    """step -> reward margin per held-out pair (indexed by pair id); the last row of a step wins
    (a resumed run evaluates the same step again)."""
    out: dict[int, pd.Series] = {}
    for row in read_jsonl(Path(run_dir) / EVAL_MARGINS):
        ids, margins = row.get("pair_ids") or [], row.get("margin") or []
        if len(ids) == len(margins) and ids:
            out[int(row["step"])] = pd.Series(
                [np.nan if m is None else float(m) for m in margins], index=[str(i) for i in ids], dtype=float
            )
    return dict(sorted(out.items()))


def read_json(path: Path, warnings: list[str] | None = None) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or unreadable (reported in `warnings`)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if warnings is not None:
            warnings.append(f"{path.name} could not be read ({exc})")
        return None
    return value if isinstance(value, dict) else None


def read_csv(path: Path, warnings: list[str] | None = None) -> pd.DataFrame | None:
    """A CSV table, or None when the file is missing or unreadable (reported in `warnings`)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        if warnings is not None:
            warnings.append(f"{path.name} could not be read ({exc})")
        return None


def read_log_tail(path: Path, n_lines: int = 80) -> str:
    """The last lines of a log without reading a huge file whole."""
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 256 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-n_lines:])


def config_value(config: dict | None, *keys: str) -> Any:
    """A nested setting of a resolved config.json (e.g. "method", "kernel", "name"); None when absent,
    so readers of old or partial run directories need no guards."""
    node: Any = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / SUMMARY)


def read_config(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / CONFIG)


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step_{step}.npz"


def write_snapshot(run_dir: Path, step: int, chosen: np.ndarray, rejected: np.ndarray, pair_ids: list[str]) -> Path:
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".step_{step}.tmp.npz")
    np.savez(
        tmp,
        chosen=chosen.astype(np.float16),
        rejected=rejected.astype(np.float16),
        pair_ids=np.asarray(pair_ids, dtype=str),
    )
    os.replace(tmp, path)
    return path


def list_snapshots(run_dir: Path) -> list[int]:
    """Steps that have a snapshot, ascending."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SNAPSHOT_RE.match(p.name)))


def load_snapshot(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """{"chosen": n×k, "rejected": n×k (float32 views of the stored float16), "pair_ids": n}."""
    path = snapshot_path(run_dir, step)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot for step {step} in {run_dir} (have: {list_snapshots(run_dir)})")
    with np.load(path) as z:
        return {
            "chosen": z["chosen"].astype(np.float32),
            "rejected": z["rejected"].astype(np.float32),
            "pair_ids": z["pair_ids"].astype(str),
        }


def read_htsr(run_dir: Path, which: str = "before") -> pd.DataFrame | None:
    name = {"before": HTSR_BEFORE, "after": HTSR_AFTER, "update": HTSR_UPDATE, "single": "htsr.csv"}[which]
    return read_csv(Path(run_dir) / name)


def append_log(run_dir: Path, line: str) -> None:
    with open(Path(run_dir) / LOG, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (checkpoint_dir's name) was written at."""
    return int(Path(path).name.split("_")[1])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The completed checkpoint with the highest step: the one definition of "this run can resume"."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [
        (checkpoint_step(p), p)
        for p in folder.iterdir()
        if re.match(r"^step_\d+$", p.name) and (p / CHECKPOINT_STATE).is_file()
    ]
    return max(done)[1] if done else None
