"""monitoring.report_to: every metrics.jsonl and eval.jsonl row also goes to the trackers, and nothing
is imported or opened when the list is empty."""

from __future__ import annotations

import math
import sys
import types

import pytest

from dpo_engine import rundir
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.trainer import train
from tests.test_tracking import assert_trackers_hold
from tests.test_train import make_config, toy_pairs


class FakeTrackers:
    def __init__(self, report_to, run_dir, run_name, config):
        self.opened = (list(report_to), run_dir, run_name, config)
        self.rows: list[tuple[str, int, dict]] = []
        self.closed = False

    def log(self, row, step, split):
        self.rows.append((split, step, dict(row)))

    def close(self):
        self.closed = True


def as_written(row: dict) -> dict:
    """The row as the JSONL file holds it (NaN written as null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


@pytest.fixture
def fake_tracking(monkeypatch):
    opened: list[FakeTrackers] = []
    module = types.ModuleType("dpo_engine.tracking")

    def open_trackers(report_to, run_dir, run_name, config):
        opened.append(FakeTrackers(report_to, run_dir, run_name, config))
        return opened[-1]

    module.open_trackers = open_trackers
    monkeypatch.setitem(sys.modules, "dpo_engine.tracking", module)
    return opened


def test_rows_reach_the_trackers(workspace, tmp_path, fake_tracking):
    cfg = make_config(optimisation={"max_steps": 3}, monitoring={"report_to": ["tensorboard"], "eval_every": 2})
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs(24))
    assert summary["status"] == "succeeded", summary["error"]
    (tracker,) = fake_tracking
    assert tracker.opened[0] == ["tensorboard"] and tracker.opened[2] == "run" and tracker.closed
    assert tracker.opened[3]["monitoring"]["report_to"] == ["tensorboard"]
    train_rows = [(s, r) for split, s, r in tracker.rows if split == "train"]
    eval_rows = [(s, r) for split, s, r in tracker.rows if split == "eval"]
    assert [as_written(r) for _, r in train_rows] == rundir.read_jsonl(tmp_path / "run" / rundir.METRICS)
    assert [as_written(r) for _, r in eval_rows] == rundir.read_jsonl(tmp_path / "run" / rundir.EVAL)
    assert [s for s, _ in eval_rows] == [0, 2, 3]


def test_no_trackers_by_default(workspace, tmp_path, fake_tracking):
    summary = train(
        make_config(optimisation={"max_steps": 1}), tmp_path / "run", workspace=workspace, pairs=toy_pairs(24)
    )
    assert summary["status"] == "succeeded"
    assert fake_tracking == []


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig.model_validate({"data": {"dataset": "d"}, "monitoring": {"report_to": ["neptune"]}})


def test_a_real_run_in_tensorboard_and_mlflow_equals_its_metrics_files(workspace, tmp_path):
    """No stand-in: a tiny run writes TensorBoard events and an MLflow store that hold exactly the numbers of
    metrics.jsonl and eval.jsonl under the tracker names."""
    from dpo_engine.tracking import to_tracker_metrics

    run_dir = tmp_path / "run"
    cfg = make_config(
        optimisation={"max_steps": 3},
        monitoring={"report_to": ["tensorboard", "mlflow"], "eval_every": 2, "eval_divergences": True},
    )
    summary = train(cfg, run_dir, workspace=workspace, pairs=toy_pairs(24))
    assert summary["status"] == "succeeded", summary["error"]

    expected: dict[str, list[tuple[int, float]]] = {}
    for split, name in (("train", rundir.METRICS), ("eval", rundir.EVAL)):
        for row in rundir.read_jsonl(run_dir / name):
            for key, value in to_tracker_metrics(row, split).items():
                expected.setdefault(key, []).append((row["step"], value))
    assert {"loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies", "eval/divergence/kl"} <= set(
        expected
    )

    assert_trackers_hold(run_dir, expected)
