"""Trackers: rows of metrics.jsonl / eval.jsonl read back from TensorBoard events and an MLflow store."""

from __future__ import annotations

import json
import sys

import pytest

from dpo_engine.tracking import TrackerUnavailable, open_trackers, parse_report_to, to_tracker_metrics

TRAIN_ROWS = [
    {
        "step": s,
        "epoch": s / 10,
        "loss": 0.69 - 0.05 * s,
        "loss_pref": 0.68 - 0.05 * s,
        "reward_acc": 0.5 + 0.1 * s,
        "margin": 0.01 * s,
        "beta": 0.1,
        "lr": 1e-3 * s,
        "lambda_rbf": 0.25 + 0.01 * s,
        "tau_local": 1.5,
        "reward_chosen": 0.02 * s,
        "reward_rejected": -0.03 * s,
        "logp_chosen": -40.0 - s,
        "logp_rejected": -42.5 - s,
    }
    for s in (1, 2, 3)
]
EVAL_ROWS = [{"step": 3, "loss_pref": 0.55, "reward_acc": 0.75, "hybrid_acc": 0.7, "div_kl": 0.012, "div_js": 0.004}]
CONFIG = {"method": {"kernel": {"name": "rbf"}, "loss": {"beta": 0.1}}, "model": {"name": "tiny-random"}}


def _write_run(run_dir, names):
    """Write metrics.jsonl and eval.jsonl, then send the rows read back from them to the trackers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    trackers = open_trackers(names, run_dir, "tiny-run", CONFIG)
    for split, path in (("train", "metrics.jsonl"), ("eval", "eval.jsonl")):
        for line in (run_dir / path).read_text().splitlines():
            row = json.loads(line)
            trackers.log(row, step=row["step"], split=split)
    trackers.close()


def _expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tracker name -> [(step, value)], computed from the files with the documented renames."""
    renames = {
        "loss": "loss",
        "loss_pref": "loss/preference",
        "reward_acc": "rewards/accuracies",
        "margin": "rewards/margins",
        "beta": "beta",
        "lr": "learning_rate",
        "epoch": "epoch",
        "lambda_rbf": "kernel/lambda_rbf",
        "tau_local": "kernel/tau_local",
        "reward_chosen": "rewards/chosen",
        "reward_rejected": "rewards/rejected",
        "logp_chosen": "logps/chosen",
        "logp_rejected": "logps/rejected",
        "hybrid_acc": "rewards/hybrid_accuracies",
        "div_kl": "divergence/kl",
        "div_js": "divergence/js",
    }
    out: dict[str, list[tuple[int, float]]] = {}
    for prefix, path in (("", "metrics.jsonl"), ("eval/", "eval.jsonl")):
        for line in (run_dir / path).read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key != "step":
                    out.setdefault(prefix + renames[key], []).append((row["step"], value))
    return out


def test_names_follow_trl():
    got = to_tracker_metrics(TRAIN_ROWS[0] | {"note": "text", "flag": True}, "train")
    assert {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "loss",
        "learning_rate",
        "kernel/lambda_rbf",
        "kernel/tau_local",
        "beta",
    } <= set(got)
    assert "step" not in got and "note" not in got and "flag" not in got
    assert "divergence/kl" not in to_tracker_metrics({"div_kl": float("nan"), "loss": 0.5}, "train")  # not computed
    assert set(to_tracker_metrics(EVAL_ROWS[0], "eval")) == {
        "eval/loss/preference",
        "eval/rewards/accuracies",
        "eval/rewards/hybrid_accuracies",
        "eval/divergence/kl",
        "eval/divergence/js",
    }
    with pytest.raises(ValueError, match="split must be"):
        to_tracker_metrics({}, "test")


def assert_trackers_hold(run_dir, expected: dict[str, list[tuple[int, float]]]):
    """TensorBoard events and the MLflow store under run_dir hold exactly `expected` (name -> [(step, value)]).
    Returns the MLflow run for further checks."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)  # stored as float32

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dpo-kernels").experiment_id])
    assert run.info.status == "FINISHED" and set(run.data.metrics) == set(expected)
    for name, points in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == points
    return run


def test_tensorboard_and_mlflow_hold_the_rows(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, ["tensorboard", "mlflow"])
    run = assert_trackers_hold(run_dir, _expected(run_dir))
    assert run.info.run_name == "tiny-run"
    assert run.data.params["method.kernel.name"] == "rbf" and run.data.params["method.loss.beta"] == "0.1"


def test_none_opens_nothing_and_bad_names_are_one_line_errors(tmp_path, monkeypatch):
    assert parse_report_to("none") == [] and parse_report_to("tensorboard, mlflow,tensorboard") == [
        "tensorboard",
        "mlflow",
    ]
    open_trackers([], tmp_path, "r", {}).close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TrackerUnavailable, match=r"^unknown tracker 'comet'; choose from"):
        open_trackers(["comet"], tmp_path, "r", {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(TrackerUnavailable) as info:
        open_trackers(["wandb"], tmp_path, "r", {})
    assert str(info.value) == "--report-to wandb needs the 'wandb' package: pip install wandb"
