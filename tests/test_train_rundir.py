"""The run-directory contract (ARCHITECTURE.md), the job entry point and the readers on partial files."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import davies_bouldin_score

from dpo_engine import rundir
from dpo_engine.analysis.dbs import snapshot_dbs
from dpo_engine.train.config import TrainConfig
from tests.test_train import make_config, toy_pairs


def test_run_directory_contract(workspace, tmp_path):
    cfg = make_config(
        model={"lora": True},
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "js"}, "loss": {"gamma": 0.5}},
        optimisation={"max_steps": 5},
        monitoring={"eval_every": 2, "snapshot_every": 3, "checkpoint_every": 2, "htsr": True},
    )
    run = tmp_path / "run"
    from dpo_engine.train.trainer import train

    summary = train(cfg, run, workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "succeeded", summary["error"]

    assert TrainConfig.model_validate(rundir.read_config(run)) == cfg
    metrics = rundir.read_jsonl(run / rundir.METRICS)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    for row in metrics:
        assert set(rundir.METRIC_KEYS + rundir.MIXTURE_KEYS) <= set(row)
        assert row["lambda_rbf"] + row["lambda_poly"] == pytest.approx(1.0, abs=1e-5)
        assert row["tau_local"] + row["tau_global"] == pytest.approx(1.0, abs=1e-5)
    evals = rundir.read_jsonl(run / rundir.EVAL)
    assert [r["step"] for r in evals] == [0, 2, 3, 4, 5]
    for row in evals:
        assert set(rundir.EVAL_KEYS) <= set(row)
    assert rundir.list_snapshots(run) == [0, 3, 5]
    with_dbs = {r["step"]: r["dbs"] for r in evals if "dbs" in r}
    assert sorted(with_dbs) == [0, 3, 5]
    for step, dbs in with_dbs.items():
        snap = rundir.load_snapshot(run, step)
        n = len(snap["pair_ids"])
        assert snap["chosen"].shape == snap["rejected"].shape == (n, 64) and n == 8
        x = np.concatenate([snap["chosen"], snap["rejected"]])
        assert dbs == pytest.approx(davies_bouldin_score(x, np.r_[np.zeros(n), np.ones(n)]), rel=1e-6)
        assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)  # stored L2-normalised (float16)
        assert snapshot_dbs(run, step) == pytest.approx(dbs, rel=1e-6)
    with np.load(rundir.snapshot_path(run, 0)) as z:
        assert z["chosen"].dtype == np.float16

    before, after = rundir.read_htsr(run, "before"), rundir.read_htsr(run, "after")
    for table in (before, after):
        assert {"layer_id", "name", "alpha", "alpha_weighted", "lambda_max", "out_of_range"} <= set(table.columns)
    assert summary["weighted_alpha_before"] == pytest.approx(before["alpha_weighted"].mean())
    assert summary["weighted_alpha_after"] == pytest.approx(after["alpha_weighted"].mean())
    saved = rundir.read_summary(run)
    for key in (
        "status",
        "final_metrics",
        "final_eval",
        "wall_time_s",
        "tokens_per_s",
        "peak_memory_mb",
        "weighted_alpha_before",
        "weighted_alpha_after",
        "error",
    ):
        assert key in saved
    assert saved["peak_memory_mb"] > 0 and saved["tokens_per_s"] > 0
    assert (run / "model" / "adapter_config.json").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert (run / rundir.CALIBRATION).is_file()
    assert [p.name for p in (run / rundir.CHECKPOINTS).iterdir()] == ["step_5"]


def test_readers_tolerate_partial_lines(tmp_path):
    (tmp_path / rundir.METRICS).write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert list(rundir.read_metrics(tmp_path)["step"]) == [1]
    assert rundir.read_eval(tmp_path).empty
    (tmp_path / rundir.SUMMARY).write_text('{"status": "runn')
    assert rundir.read_summary(tmp_path) is None
    assert rundir.list_snapshots(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no snapshot for step 3"):
        rundir.load_snapshot(tmp_path, 3)


def test_train_job_entry_point_from_file(workspace, tmp_path):
    from dpo_engine.train.job import run_train_job

    path = tmp_path / "toy.jsonl"
    df = toy_pairs(36)
    path.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n" for r in df.itertuples()
        )
    )
    cfg = make_config(data={"dataset": str(path)}, optimisation={"max_steps": 2})
    seen = []
    ctx = SimpleNamespace(
        params=cfg.resolved(),
        workspace=workspace,
        run_dir=tmp_path / "run",
        device="cpu",
        progress=lambda f, m="": seen.append(f),
        should_stop=lambda: False,
    )
    result = run_train_job(ctx)
    assert result["status"] == "succeeded" and result["steps_completed"] == 2
    assert seen[-1] == 1.0 and 0.5 in seen
    assert (tmp_path / "run" / rundir.CONFIG).is_file()


def test_train_job_failure_raises(workspace, tmp_path):
    from dpo_engine.train.job import run_train_job

    cfg = make_config(data={"dataset": "no-such-dataset"})
    ctx = SimpleNamespace(
        params=cfg.resolved(),
        workspace=workspace,
        run_dir=tmp_path / "run",
        device="cpu",
        progress=lambda f, m="": None,
        should_stop=lambda: False,
    )
    with pytest.raises(Exception, match="no-such-dataset"):
        run_train_job(ctx)
    assert rundir.read_summary(tmp_path / "run")["status"] == "failed"


def test_a_stamped_data_file_reads_changed_when_rewritten_touched_or_gone(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    run = tmp_path / "run"
    run.mkdir()
    assert rundir.data_file_changed(run) is None  # nothing recorded: a stored dataset, or an older run
    rundir.write_json(run / rundir.DATA_FILE, rundir.file_stamp(data))
    assert rundir.data_file_changed(run) is False
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, touched
    assert rundir.data_file_changed(run) is True
    rundir.write_json(run / rundir.DATA_FILE, rundir.file_stamp(data))
    data.write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')  # rewritten: labels swapped
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even with the old time
    assert rundir.data_file_changed(run) is False  # same size and time: the limit of a stamp, documented
    data.write_text('{"prompt": "p", "chosen": "bb", "rejected": "a"}\n')
    assert rundir.data_file_changed(run) is True
    data.unlink()
    assert rundir.data_file_changed(run) is True
    assert rundir.file_stamp(tmp_path) is None  # a directory is no file


def test_a_resumed_run_keeps_the_stamp_of_its_first_start_and_a_reused_directory_drops_a_stale_one(tmp_path):
    from dpo_engine.report.rundata import DATA_FILE_CHANGED, texts_note
    from dpo_engine.train.setup import record_data_file

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig.model_validate({"data": {"dataset": str(data)}})
    lines: list[str] = []
    record_data_file(config, run, None, False, lines.append)
    first = rundir.read_json(run / rundir.DATA_FILE)
    assert first == rundir.file_stamp(data) and texts_note(run, str(data)) is None
    data.write_text('{"prompt": "p", "chosen": "ab", "rejected": "b"}\n')  # edited before a retry
    record_data_file(config, run, None, True, lines.append)
    assert rundir.read_json(run / rundir.DATA_FILE) == first  # the pair ids and snapshots are the first file's
    assert any("changed since this run started" in line for line in lines)
    assert texts_note(run, str(data)) == DATA_FILE_CHANGED
    stored = TrainConfig.model_validate({"data": {"dataset": "some-stored-dataset"}})
    record_data_file(stored, run, None, False, lines.append)  # the directory used again for a stored dataset
    assert not (run / rundir.DATA_FILE).exists() and rundir.data_file_changed(run) is None
    # a run from before files were stamped: its texts come with the old caveat
    assert "as it is now" in texts_note(run, str(data)) and texts_note(run, "some-stored-dataset") is None
