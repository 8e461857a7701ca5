"""Input checks every way of starting a training run makes before anything is written or queued.

The CLI and the Train form both call `check_inputs`, so a dataset that cannot be trained on or a
local model directory without a model is refused with one line, not discovered by a failed job.
"""

from __future__ import annotations

from pathlib import Path


def check_inputs(cfg, ws) -> None:
    """Refuse a run whose dataset or local model cannot be used.

    Raises the data layer's errors (DatasetNotFound, ValueError for unusable pairs) or
    UnknownModelError for a directory that holds no model; the callers show the message.
    """
    from dpo_engine.data import open_dataset
    from dpo_engine.models.loading import model_directory
    from dpo_engine.train.data import check_pairs

    check_pairs(open_dataset(ws, cfg.data.dataset).table)
    if Path(cfg.model.name).expanduser().is_dir():
        model_directory(cfg.model.name, workspace=ws)  # raises UnknownModelError without config.json
