"""Compare page under AppTest: several runs (succeeded, cancelled, empty) side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.test_ui_fixtures import run_workspace  # noqa: F401

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "compare.py")


def test_compare_tables_and_figures(run_workspace):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, at.exception
    picked = ["ok-hmk", "cancelled", "empty"]
    at.multiselect[0].set_value(picked).run()
    assert not at.exception, at.exception
    final = at.dataframe[0].value
    assert list(final["run"]) == picked
    summary = json.loads((run_workspace.root / "runs" / "ok-hmk" / "summary.json").read_text())
    got = final.set_index("run").loc["ok-hmk", "final reward accuracy (eval)"]
    assert got == f"{summary['final_eval']['reward_acc']:.3f}"  # shown as text so a tie never reads 0.000
    assert final.set_index("run").loc["empty", "final reward accuracy (eval)"] == "–"
    dbs = next(d.value for d in at.dataframe if list(d.value.columns) == picked)  # Table 13: rows = steps
    assert list(dbs.columns) == picked
    assert 0 in dbs.index and dbs.loc[0, "ok-hmk"] > 0
    probe = [d.value for d in at.dataframe if list(d.value.columns) == picked][1]  # linear probe, same layout
    assert re.fullmatch(r"0\.\d\d \(0\.\d\d–[01]\.\d\d\)", probe.loc[0, "ok-hmk"])
    assert final.set_index("run").loc["ok-hmk", "linear-probe accuracy (last snapshot)"] != "–"
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "Held-out reward accuracy" in titles and "Final reward accuracy by kernel × divergence" in titles
    assert any("No results yet for: empty" in c.value for c in at.caption)
    assert any(b.label == "Download report (.html)" for b in at.get("download_button"))


def test_no_runs_is_explained(workspace, tmp_path, monkeypatch):
    import dpo_engine.report.rundata as rundata

    monkeypatch.setattr(rundata, "shipped_examples_dir", lambda: tmp_path / "no-examples")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("No training runs yet" in i.value for i in at.info)


def test_sweep_outcome_is_shown_with_intervals(workspace):
    import numpy as np

    from dpo_engine import rundir
    from dpo_engine.jobs import JobStore
    from dpo_engine.train.sweep import submit_sweep

    store = JobStore.for_workspace(workspace)
    from tests.conftest import HH_SAMPLE

    record = submit_sweep(
        {"recommendation": {"kernel": "polynomial", "divergence": "hellinger"}},
        str(HH_SAMPLE),
        store,
        workspace,
        overrides={"model.name": "tiny-random"},
    )
    rng = np.random.default_rng(0)
    for run, p in zip(record["runs"], (0.9, 0.5, 0.5)):  # the recommended run is far ahead on 200 pairs
        run_dir = workspace.run_dir(run["run_id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        correct = rng.random(200) < p
        rundir.append_eval_margins(run_dir, 30, [f"p{i}" for i in range(200)], np.where(correct, 1.0, -1.0))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("came out ahead of every runner-up" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert list(table["role"]) == ["recommended", "kernel runner-up", "divergence runner-up"]
    assert (table["ci_low"] < table["reward_acc"]).all() and (table["reward_acc"] < table["ci_high"]).all()
    assert table["diff_ci_low"].iloc[1] > 0
