"""Run page under AppTest for every run state, on run directories written by the real trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.test_ui_fixtures import run_workspace  # noqa: F401  (shared session-built runs)

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "runs.py")


def _open(run_id: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params["run_id"] = run_id
    return at.run()


def _chart_titles(at) -> list[str]:
    titles = []
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        titles.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return titles


def _metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_succeeded_hmk_run_shows_every_view(run_workspace):
    at = _open(run_workspace.runs["ok_hmk"])
    assert not at.exception, at.exception
    assert _metric(at, "Status") == "succeeded"
    summary = json.loads((run_workspace.root / "runs" / "ok-hmk" / "summary.json").read_text())
    assert _metric(at, "Reward accuracy (eval)") == f"{summary['final_eval']['reward_acc']:.3f}"
    words = next(m.value for m in at.markdown if m.value.startswith("**In plain words**"))
    assert "held-out reward accuracy" in words and "linear probe" in words
    titles = " | ".join(_chart_titles(at))
    for expected in (
        "Training losses",
        "Reward accuracy",
        "Rewards and margins",
        "Learning-rate schedule",
        "Kernel-weight evolution",
        "β over training",
        "Divergence from the reference",
        "Chosen vs rejected representations",
        "Davies–Bouldin",
        "Linear-probe accuracy",
        "WeightWatcher alpha per layer",
    ):
        assert expected in titles, expected
    assert any("Regulariser: **kl**" in c.value for c in at.caption)
    assert any(b.label == "Download report (.html)" for b in at.get("download_button"))
    assert any(b.label == "Model / adapter (.zip)" for b in at.get("download_button"))


def test_running_run_is_live_and_tolerates_a_torn_line(run_workspace):
    at = _open(run_workspace.runs["running"])
    assert not at.exception, at.exception
    assert _metric(at, "Status") == "running"
    assert _metric(at, "Step") == "2 / 5"
    assert any("Live" in c.value for c in at.caption)
    assert any(b.label == "Cancel run" for b in at.button)
    assert any("Training losses" in t for t in _chart_titles(at))
    assert not any("not valid JSON" in w.value for w in at.warning)  # a torn *last* line is a write in progress


def test_cancel_button_requests_cancellation(run_workspace):
    from dpo_engine.jobs import JobStore
    from dpo_engine.workspace import Workspace

    store = JobStore.for_workspace(Workspace.resolve(run_workspace.root))
    job = store.submit("train", store.get(run_workspace.jobs["ok_hmk"]).params, title="to cancel")
    at = _open(job.run_id)
    next(b for b in at.button if b.label == "Cancel run").click().run()
    assert not at.exception
    assert store.get(job.id).status == "cancelled"


def test_failed_run_shows_error_and_log_tail(run_workspace):
    at = _open(run_workspace.runs["failed"])
    assert not at.exception, at.exception
    assert _metric(at, "Status") == "failed"
    errors = " ".join(e.value for e in at.error)
    assert "diverged at step" in errors and "not finite" in errors
    assert any("Last lines of log.txt" in c.value for c in at.caption)
    assert at.code[0].value.strip()
    # the real trainer's NaN guard becomes a health alert with the step it tripped at
    summary = json.loads((run_workspace.root / "runs" / "failed" / "summary.json").read_text())
    step = summary["error"].split("at step ")[1].split(":")[0]
    assert any(f"NaN/inf guard tripped from step {step}" in e.value and "What to try" in e.value for e in at.error)


def test_cancelled_run_says_so_and_still_plots(run_workspace):
    at = _open(run_workspace.runs["cancelled"])
    assert not at.exception, at.exception
    assert _metric(at, "Status") == "cancelled"
    assert any("cancelled at step" in w.value for w in at.warning)
    assert any("Kernel-weight evolution" in t for t in _chart_titles(at))


def test_empty_queued_run_renders_without_charts(run_workspace):
    at = _open(run_workspace.runs["empty"])
    assert not at.exception, at.exception
    assert _metric(at, "Status") == "queued"
    assert any("waiting for a worker" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_unknown_run_id_falls_back_with_a_warning(run_workspace):
    at = _open("no-such-run")
    assert not at.exception
    assert any("was not found" in w.value for w in at.warning)


@pytest.mark.parametrize("state", ["ok_hmk", "failed"])
def test_report_from_the_page_is_self_contained(run_workspace, state):
    from dpo_engine.report import build_report
    from dpo_engine.workspace import Workspace

    html = build_report(Workspace.resolve(run_workspace.root), [run_workspace.runs[state]])
    assert "<html" in html and run_workspace.runs[state] in html


def test_held_out_disagreements_list_the_most_negative_final_margins(run_workspace):
    """The tab lists the last evaluation's held-out pairs with a negative reward margin, most negative
    first (at most 50), with their texts, and says how reliable such a list was in the measurement."""
    run_dir = run_workspace.root / "runs" / "ok-hmk"
    rows = [json.loads(line) for line in (run_dir / "eval_margins.jsonl").read_text().splitlines() if line.strip()]
    last = max(rows, key=lambda r: r["step"])
    negative = sorted((m, pid) for pid, m in zip(last["pair_ids"], last["margin"]) if m is not None and m < 0)
    at = _open(run_workspace.runs["ok_hmk"])
    assert not at.exception, at.exception
    frame = next(d.value for d in at.dataframe if "margin" in d.value.columns and "rank" in d.value.columns)
    assert list(frame["pair_id"]) == [pid for _, pid in negative[:50]]
    assert frame["margin"].tolist() == pytest.approx([m for m, _ in negative[:50]])
    assert {"prompt", "chosen", "rejected"} <= set(frame.columns)
    assert any(c.value.startswith("How reliable:") for c in at.caption)
    assert any(b.label == "Download these pairs (.csv)" for b in at.get("download_button"))


def test_disagreements_leave_out_texts_once_the_file_the_run_read_has_changed(run_workspace, tmp_path):
    """Pair ids of a file are its row numbers: after the file changes, its rows are not the run's pairs,
    so the tab and the report show ids and say why instead of another pair's texts."""
    from dpo_engine import rundir
    from dpo_engine.report import build_report
    from dpo_engine.report.rundata import DATA_FILE_CHANGED
    from dpo_engine.workspace import Workspace

    run_dir = run_workspace.root / "runs" / "ok-hmk"
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    stamp = rundir.file_stamp(data) | {"size": 1}  # recorded when the run read it; the file differs now
    rundir.write_json(run_dir / rundir.DATA_FILE, stamp)
    try:
        at = _open(run_workspace.runs["ok_hmk"])
        assert not at.exception, at.exception
        frame = next(d.value for d in at.dataframe if "margin" in d.value.columns and "rank" in d.value.columns)
        assert len(frame) and not {"prompt", "chosen", "rejected"} & set(frame.columns)
        assert any(c.value == DATA_FILE_CHANGED for c in at.caption)
        html = build_report(Workspace.resolve(run_workspace.root), [run_workspace.runs["ok_hmk"]])
        section = html[html.index("<section id='disagreements'>") :]
        section = section[: section.index("</section>")]
        assert "has changed since" in section and "<th>prompt</th>" not in section
    finally:
        (run_dir / rundir.DATA_FILE).unlink()
    at = _open(run_workspace.runs["ok_hmk"])  # unchanged again (no stamp: a stored dataset): texts are back
    frame = next(d.value for d in at.dataframe if "margin" in d.value.columns and "rank" in d.value.columns)
    assert {"prompt", "chosen", "rejected"} <= set(frame.columns)
