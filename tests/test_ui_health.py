"""Health alerts, step-0 ties and one list of runs across the Overview, Runs and Compare pages and the
report, on run directories written with the run-directory writers (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.test_health import STEPS, _config, _healthy_rows, _write

PAGES = Path(__file__).resolve().parent.parent / "pages"


@pytest.fixture
def health_workspace(workspace):
    """Three runs: 'displaced' (CLI-style, no job) triggers likelihood displacement, 'fresh' (CLI-style)
    has only its step-0 evaluation, 'queued' is a job nothing has been written for yet."""
    from dpo_engine.jobs import JobStore

    metrics, evals = _healthy_rows()
    for row in evals:
        t = row["step"] / STEPS
        row["reward_chosen"] = 0.02 if row["step"] < 20 else -0.3 * t
        row["reward_rejected"] = -0.05 * t if row["step"] < 20 else -1.0 * t
    _write(workspace.run_dir("displaced"), metrics, evals, summary={"status": "succeeded", "error": None})
    fresh_metrics = [dict(metrics[0], margin=0.0, reward_acc=0.0)]
    fresh_evals = [
        {
            "step": 0,
            "loss_pref": 0.6931,
            "reward_acc": 0.0,
            "hybrid_acc": 0.0,
            "reward_chosen": 0.0,
            "reward_rejected": 0.0,
        }
    ]
    _write(workspace.run_dir("fresh"), fresh_metrics, fresh_evals)
    store = JobStore.for_workspace(workspace)
    store.submit("train", _config(), title="waiting", run_id="queued")
    store.close()
    return workspace


def _page(name: str, **query) -> AppTest:
    at = AppTest.from_file(str(PAGES / name), default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def test_run_page_explains_the_alert_with_its_step(health_workspace):
    at = _page("runs.py", run_id="displaced")
    assert not at.exception, at.exception
    alert = next(w.value for w in at.warning if "Likelihood displacement" in w.value)
    assert "from step 20" in alert and "What to try" in alert and "chosen" in alert


def test_step_zero_accuracy_reads_as_ties_not_zero(health_workspace):
    at = _page("runs.py", run_id="fresh")
    assert not at.exception, at.exception
    metric = next(m for m in at.metric if m.label == "Reward accuracy (eval)")
    assert metric.value == "ties (step 0)"
    assert any("policy equals the reference" in c.value for c in at.caption)
    acc = next(
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if "Reward accuracy" in json.loads(c.proto.spec)["layout"]["title"]["text"]
    )
    names = [t.get("name", "") for t in acc["data"]]
    assert any("policy = reference" in n for n in names)
    assert not any(n.startswith("reward accuracy") for n in names)  # no line drawn through the tie point


def test_compare_page_lists_alerts_and_ties(health_workspace):
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=60).run()
    at.multiselect[0].set_value(["displaced", "fresh"]).run()
    assert not at.exception, at.exception
    final = at.dataframe[0].value.set_index("run")
    assert final.loc["fresh", "final reward accuracy (eval)"] == "ties (step 0)"
    health = at.table[0].value
    row = health.loc["displaced"]
    assert row["alert"] == "Likelihood displacement" and row["from step"] == "20"


def test_overview_counts_the_runs_the_runs_page_lists(health_workspace):
    home = _page("home.py")
    assert not home.exception, home.exception
    count = next(m.value for m in home.metric if m.label == "Training runs")
    runs = _page("runs.py")
    listed = runs.selectbox(key="runs-select").options
    assert int(count) == len(listed) == 3  # two written from the command line, one queued job


def test_report_has_the_health_section_and_no_bare_zero_at_step_zero(health_workspace, tmp_path):
    from dpo_engine.report import build_report

    html = build_report(health_workspace, ["displaced", "fresh"])
    assert "id='health'" in html and "Likelihood displacement from step 20" in html
    assert "Final held-out reward accuracy: ties (step 0)" in html
    assert ">0.000<" not in html


def test_tie_rows_are_the_points_computed_with_policy_equal_to_reference():
    import pandas as pd

    from dpo_engine.viz import runs as viz

    # as the trainer logs them: step 1's forward pass precedes the first update (rho = 0, accuracy 0),
    # though an hmk run's hybrid margin is already non-zero there
    metrics = pd.DataFrame({"step": [1, 2, 3], "margin": [0.0013, 0.02, 0.05], "reward_acc": [0.0, 0.5, 0.75]})
    evals = pd.DataFrame(
        {"step": [0, 2], "reward_acc": [0.0, 0.375], "reward_chosen": [0.0, -2e-4], "reward_rejected": [0.0, -7e-4]}
    )
    assert viz.tie_rows(metrics, train=True).tolist() == [True, False, False]
    assert viz.tie_rows(evals).tolist() == [True, False]
    fig = viz.reward_accuracy_figure(metrics, evals)
    lines = {t.name: list(t.x) for t in fig.data}
    assert lines["reward accuracy (train batch)"] == [2, 3] and lines["reward accuracy (eval)"] == [2]
    assert lines[viz.TIE_LABEL] == [0, 1]
