"""Sweep launcher: the recommended pair and its runners-up queued as train jobs; the outcome with intervals."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_engine import rundir
from dpo_engine.jobs import JobStore
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.sweep import list_sweeps, submit_sweep, sweep_outcome, sweep_pairs
from dpo_engine.train.trainer import train
from tests.test_train import make_config, toy_pairs

DIAGNOSIS = {
    "recommendation": {
        "kernel": "polynomial",
        "divergence": "hellinger",
        "kernel_runner_up": "hmk",
        "divergence_runner_up": None,
    }
}
TINY = {"model.name": "tiny-random", "optimisation.max_steps": 2, "monitoring.htsr": False}


def test_sweep_pairs_are_the_recommendation_and_its_runners_up():
    pairs = sweep_pairs(DIAGNOSIS["recommendation"])
    assert [(p.kernel, p.divergence, p.role) for p in pairs] == [
        ("polynomial", "hellinger", "recommended"),
        ("hmk", "hellinger", "kernel runner-up"),
        ("polynomial", "kl", "divergence runner-up"),
    ]  # no divergence runner-up named: the fixed fallback


def test_submit_sweep_queues_one_job_per_pair_with_the_preset_and_overrides(workspace, hh_sample_path):
    store = JobStore.for_workspace(workspace)
    record = submit_sweep(DIAGNOSIS, str(hh_sample_path), store, workspace, overrides=TINY, source="diag-1")
    jobs = store.list(kind="train")
    assert len(jobs) == 3 and len(record["runs"]) == 3
    configs = [TrainConfig.model_validate(j.params) for j in jobs]
    assert {(c.method.kernel.name, c.method.divergence.name) for c in configs} == {
        ("polynomial", "hellinger"),
        ("hmk", "hellinger"),
        ("polynomial", "kl"),
    }
    assert {c.optimisation.seed for c in configs} == {0} and {c.model.lora_r for c in configs} == {16}  # preset
    assert {c.model.name for c in configs} == {"tiny-random"} and {c.optimisation.max_steps for c in configs} == {2}
    assert list_sweeps(workspace)[0]["sweep_id"] == record["sweep_id"]


def test_submit_sweep_with_a_bad_dataset_queues_nothing(workspace):
    store = JobStore.for_workspace(workspace)
    with pytest.raises(Exception, match="neither a file nor a stored dataset"):
        submit_sweep(DIAGNOSIS, "no-such-data", store, workspace, overrides=TINY)
    assert store.list(kind="train") == [] and list_sweeps(workspace) == []


def _record(roles):
    return {
        "runs": [
            {"run_id": f"r{i}", "kernel": "k", "divergence": f"d{i}", "role": role} for i, role in enumerate(roles)
        ]
    }


def _write(run_dir, correct):
    run_dir.mkdir(parents=True, exist_ok=True)
    margins = np.where(np.asarray(correct) > 0, 0.5, -0.5)
    rundir.append_eval_margins(run_dir, 0, [f"p{i}" for i in range(len(margins))], np.zeros(len(margins)))
    rundir.append_eval_margins(run_dir, 10, [f"p{i}" for i in range(len(margins))], margins)


def test_outcome_intervals_and_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    dirs = {f"r{i}": tmp_path / f"r{i}" for i in range(3)}
    _write(dirs["r0"], rng.random(n) < 0.9)
    _write(dirs["r1"], rng.random(n) < 0.5)
    _write(dirs["r2"], rng.random(n) < 0.5)
    table, text = sweep_outcome(_record(["recommended", "a", "b"]), dirs)
    assert "came out ahead" in text
    first = table.iloc[0]
    # the bootstrap interval of a proportion agrees with the normal approximation at n = 400
    se = np.sqrt(first.reward_acc * (1 - first.reward_acc) / n)
    assert first.ci_low == pytest.approx(first.reward_acc - 1.96 * se, abs=0.01)
    assert first.ci_high == pytest.approx(first.reward_acc + 1.96 * se, abs=0.01)
    assert table.step.tolist() == [10, 10, 10]
    _, behind = sweep_outcome(_record(["a", "recommended", "b"]), dirs)
    assert "came out behind" in behind
    _, waiting = sweep_outcome(_record(["recommended", "a", "b"]), {"r0": dirs["r0"]})
    assert waiting.startswith("waiting for results: 1 of 3")


def test_trainer_writes_per_pair_margins_that_match_the_eval_accuracy(workspace, tmp_path):
    cfg = make_config(optimisation={"max_steps": 3}, monitoring={"eval_every": 3, "snapshot_every": 100})
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "succeeded", summary["error"]
    margins = rundir.read_eval_margins(tmp_path / "run")
    evals = rundir.read_eval(tmp_path / "run").set_index("step")
    assert sorted(margins) == sorted(evals.index)
    for step, series in margins.items():
        assert len(series) == cfg.data.min_eval_pairs
        assert (series > 0).mean() == pytest.approx(evals.loc[step, "reward_acc"])
