"""Pinned trajectory (in the manner of TRL's invariant tests): four steps of the tiny model with every
term of the objective switched on must log the same numbers as when they were pinned.

A change to the step, the objective, the data order or the initialisation moves these numbers. When
the move is intended, regenerate the file and say why in the commit:

    DPO_KERNELS_REPIN=1 .venv/bin/pytest tests/test_pinned_trajectory.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dpo_engine import rundir
from dpo_engine.train.trainer import train
from tests.test_train import make_config, toy_pairs

PINNED = Path(__file__).parent / "invariant" / "trajectory_tiny.json"
TRAIN_KEYS = ("loss", "loss_pref", "loss_div", "loss_entropy", "margin", "grad_norm", "beta", "lambda_rbf", "tau_local")
EVAL_KEYS = ("loss_pref", "reward_chosen", "reward_rejected", "div_kl")
# Float32 on CPU: the same code gives the same bits on one machine; other CPUs may sum in another order.
RTOL, ATOL = 2e-4, 1e-6


def _trajectory(workspace, run_dir: Path) -> dict:
    cfg = make_config(
        model={"lora": True},
        method={
            "kernel": {"name": "hmk"},
            "divergence": {"name": "kl", "alpha": 0.1},
            "loss": {"gamma": 0.5, "epsilon_dpo": 0.01},
        },
        optimisation={"max_steps": 4, "lr": 5e-3},
        monitoring={"eval_every": 2, "snapshot_every": 100, "eval_divergences": True},
    )
    summary = train(cfg, run_dir, workspace=workspace, pairs=toy_pairs(24))
    assert summary["status"] == "succeeded", summary["error"]
    metrics, evals = rundir.read_metrics(run_dir), rundir.read_eval(run_dir)
    return {
        "train": {k: [float(v) for v in metrics[k]] for k in TRAIN_KEYS},
        "eval": {k: [float(v) for v in evals[k]] for k in EVAL_KEYS},
    }


def test_four_steps_of_the_full_objective_match_the_pinned_numbers(workspace, tmp_path):
    got = _trajectory(workspace, tmp_path / "run")
    if os.environ.get("DPO_KERNELS_REPIN") == "1":
        PINNED.write_text(json.dumps(got, indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())
    assert set(got) == set(pinned)
    for split in pinned:
        assert set(got[split]) == set(pinned[split]), split
        for key, values in pinned[split].items():
            np.testing.assert_allclose(got[split][key], values, rtol=RTOL, atol=ATOL, err_msg=f"{split}.{key}")
    # the run moved: a pinned file of constants would not tell a broken step from a working one
    assert len(set(np.round(got["train"]["loss"], 6))) == 4 and got["train"]["beta"][0] != got["train"]["beta"][-1]
