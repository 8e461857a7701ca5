"""Shipped example runs: listed (marked example) until the workspace has runs of its own, read from a
workspace copy, resolvable by the report; the committed examples hold no weights and stay small."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import dpo_engine.report.rundata as rundata
from dpo_engine.jobs import JobStore
from dpo_engine.report import build_report
from dpo_engine.train.trainer import train
from tests.test_train import make_config, toy_pairs

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = REPO / "docs" / "results" / "learning_sweep.json"


@pytest.fixture
def examples_dir(tmp_path, workspace, monkeypatch):
    """One finished tiny run stored as a shipped example."""
    scratch = tmp_path / "scratch"
    cfg = make_config(optimisation={"max_steps": 2}, monitoring={"eval_every": 1, "snapshot_every": 1})
    assert train(cfg, scratch, workspace=workspace, pairs=toy_pairs())["status"] == "succeeded"
    shipped = tmp_path / "shipped"
    shutil.copytree(scratch, shipped / "example-dpo", ignore=shutil.ignore_patterns("model", "checkpoints"))
    monkeypatch.setattr(rundata, "shipped_examples_dir", lambda: shipped)
    return shipped


def test_examples_are_listed_until_the_workspace_has_its_own_run(workspace, examples_dir):
    store = JobStore.for_workspace(workspace)
    (entry,) = rundata.workspace_runs(workspace, store)
    assert entry.example and entry.run_id == "example-dpo" and "[example]" in entry.label
    assert entry.run_dir == workspace.root / "example_runs" / "example-dpo"  # a copy: caches never touch the repo
    assert rundata.load_run(entry.run_dir).summary["status"] == "succeeded"
    html = build_report(workspace, ["example-dpo"])
    assert "example-dpo [example]" in html and "not runs of this workspace" in html
    store.submit("train", make_config().model_dump(mode="json"), title="mine")
    entries = rundata.workspace_runs(workspace, store)
    assert len(entries) == 1 and not entries[0].example


def test_runs_page_labels_the_examples(workspace, examples_dir):
    at = AppTest.from_file(str(REPO / "pages" / "runs.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("example runs" in i.value for i in at.info)
    assert "[example]" in at.selectbox(key="runs-select").format_func("example-dpo")


def test_committed_examples_hold_no_weights_and_stay_small():
    shipped = REPO / "assets" / "example_runs"
    assert shipped.is_dir(), "the example runs ship with the repo (scripts/learning_sweep.py writes them)"
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"} or "checkpoints" in p.parts]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    for run in (p for p in shipped.iterdir() if p.is_dir()):
        assert (run / "config.json").is_file() and (run / "eval.jsonl").is_file() and (run / "summary.json").is_file()


def test_a_fresh_workspace_opens_on_the_committed_examples(workspace):
    """What `make run` shows on a fresh clone: both shipped runs on Runs, Compare and in the report,
    with the held-out outcome docs/RESULTS.md reports for them."""
    shipped = REPO / "assets" / "example_runs"
    assert shipped.is_dir(), "the example runs ship with the repo (scripts/learning_sweep.py writes them)"
    entries = rundata.workspace_runs(workspace, JobStore.for_workspace(workspace))
    ids = sorted(e.run_id for e in entries)
    assert len(ids) == 2 and all(e.example for e in entries) and "example-dpo" in ids
    html = build_report(workspace, ids)
    assert all(f"{i} [example]" in html for i in ids)
    reported = {r["run"]: r for r in json.loads(RESULTS_JSON.read_text())["final"]}
    assert sorted(reported) == ids  # the examples are the final runs of the learning sweep
    for page in ("runs.py", "compare.py"):
        at = AppTest.from_file(str(REPO / "pages" / page), default_timeout=180).run()
        assert not at.exception, (page, at.exception)
        assert any("example runs" in i.value for i in at.info), page
        if page == "runs.py":  # the first example: its held-out outcome, the base model's layers, the update
            shown = at.selectbox(key="runs-select").value
            end = reported[shown]["end"]
            low, high = end["reward_acc_interval"]
            words = " ".join(m.value for m in at.markdown)
            assert f"held-out reward accuracy {end['reward_acc']:.2f} ({low:.2f}–{high:.2f})" in words, words[:3000]
            assert f"Held-out preference loss {end['loss_pref_logged']:.3f}" in words
            assert any("What training changed" in h.value for h in at.subheader)
            assert any("The base model has 87 of" in c.value for c in at.caption)
            assert not any("No update table in this run" in i.value for i in at.info)
    assert sorted(at.multiselect(key="compare-runs").value) == ids  # Compare opens on both examples


def test_shipped_examples_raise_no_htsr_alert_for_the_base_models_layers():
    """Their "before" and "after" tables have the same out-of-range layers (the base model's): the
    HT-SR alert fires only for what training made (an over-fit update); the base model's layers remain
    information."""
    from dpo_engine.analysis import health

    for run_dir in sorted(p for p in (REPO / "assets" / "example_runs").iterdir() if p.is_dir()):
        run = rundata.load_run(run_dir)
        assert run.htsr_before is not None and run.htsr_after is not None, run_dir.name
        assert health.htsr_left_range(run.htsr_before, run.htsr_after).empty, run_dir.name
        if "htsr_alpha" in {a.code for a in health.health_of(run)}:  # only for the update training made
            assert not health.update_overfit(run.htsr_update).empty, run_dir.name
        assert len(health.htsr_base_out_of_range(run.htsr_before)) > 0, run_dir.name


def test_every_alert_on_the_shipped_examples_is_about_what_training_did():
    """An alert on an example starts after the first update, where its quantity was at its reference
    value, and an HT-SR alert names layers training moved out of [2, 6] or an over-fit update."""
    from dpo_engine.analysis import health

    for run_dir in sorted(p for p in (REPO / "assets" / "example_runs").iterdir() if p.is_dir()):
        run = rundata.load_run(run_dir)
        for alert in health.health_of(run):
            if alert.code == "htsr_alpha":
                moved = health.htsr_left_range(run.htsr_before, run.htsr_after)
                assert not moved.empty or not health.update_overfit(run.htsr_update).empty, alert.evidence
            else:
                assert alert.step is not None and alert.step > 0, (run_dir.name, alert.headline, alert.evidence)
