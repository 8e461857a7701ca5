"""`dpo-kernels train` / `htsr`: submit a job, or run in the foreground into a run directory."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dpo_engine import rundir
from dpo_engine.cli import app
from tests.test_train import toy_pairs


def _toy_file(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
            for r in toy_pairs(36).itertuples()
        )
    )
    return path


def test_train_submits_a_job(workspace, tmp_path):
    from dpo_engine.jobs import JobStore

    res = CliRunner().invoke(
        app,
        [
            "train",
            str(_toy_file(tmp_path)),
            "--model",
            "tiny-random",
            "--kernel",
            "rbf",
            "--beta",
            "0.2",
            "--max-steps",
            "3",
            "--workspace",
            str(workspace.root),
        ],
    )
    assert res.exit_code == 0, res.output
    run_id = res.output.strip().splitlines()[-1]
    job = next(j for j in JobStore.for_workspace(workspace).list() if j.run_id == run_id)
    assert job.kind == "train"
    assert f"submitted job {job.id} (run {run_id}); follow it: dpo-kernels jobs logs {job.id} --follow" in res.output
    assert job.params["method"]["kernel"]["name"] == "rbf" and job.params["method"]["loss"]["beta"] == 0.2
    assert job.params["optimisation"]["max_steps"] == 3


def test_train_foreground_writes_run_dir(workspace, tmp_path):
    run = workspace.runs_dir / "cli-run"
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(_toy_file(tmp_path)),
            "--model",
            "tiny-random",
            "--kernel",
            "none",
            "--gamma",
            "0",
            "--divergence",
            "none",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--htsr",
            "off",
            "--foreground",
            "--run-dir",
            str(run),
            "--workspace",
            str(workspace.root),
        ],
    )
    assert res.exit_code == 0, res.output
    assert rundir.read_summary(run)["status"] == "succeeded"
    assert '"health_alerts": [' in res.output  # the run's health is reported with its summary
    assert "eval step 2" in (run / rundir.LOG).read_text()
    assert rundir.read_config(run)["monitoring"]["htsr"] == "off"
    # the file it read is stamped, so pages can tell when its rows no longer are the run's
    assert rundir.read_json(run / rundir.DATA_FILE) == rundir.file_stamp(tmp_path / "toy.jsonl")
    assert rundir.data_file_changed(run) is False


def test_train_bad_flags_fail_cleanly(workspace, tmp_path):
    res = CliRunner().invoke(
        app, ["train", "d", "--kernel", "none", "--gamma", "0.5", "--workspace", str(workspace.root)]
    )
    assert res.exit_code == 2 and "gamma > 0 needs a kernel" in res.output
    res = CliRunner().invoke(
        app, ["train", "d", "--max-steps", "3", "--epochs", "1", "--workspace", str(workspace.root)]
    )
    assert res.exit_code == 2 and "not both" in res.output
