"""The Jobs page under AppTest: jobs listed with status, progress and log; cancel from the page."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from dpo_engine.jobs import JobStore
from tests.helpers import run_worker_once

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "jobs.py")


def test_empty_workspace_says_so(workspace):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("No jobs yet" in i.value for i in at.info)
    assert any("none" in c.value for c in at.caption)  # no worker alive


def test_run_started_outside_the_queue_is_listed(workspace):
    """A `train --foreground` run has no job row; the Jobs page still lists it, as the Runs page does."""
    run = workspace.runs_dir / "20260101-000000-train"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "summary.json").write_text('{"status": "succeeded"}')
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert table.to_dict("records") == [{"run": run.name, "status": "succeeded"}]


def test_finished_job_shows_status_and_log(workspace):
    store = JobStore.for_workspace(workspace)
    job = store.submit("selftest", {"seconds": 0.2, "steps": 3}, title="smoke")
    run_worker_once(workspace, timeout=120)
    assert store.get(job.id).status == "succeeded"
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    row = table[table["id"] == job.id].iloc[0]
    assert row["status"] == "succeeded" and row["progress"] == 100
    log = at.code[0].value
    assert log.strip() and log != "(no output yet)"


def test_cancel_queued_job_from_page(workspace):
    store = JobStore.for_workspace(workspace)
    job = store.submit("selftest", {"seconds": 5}, title="to cancel", submitted_by="alice@example.org")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert any("to cancel" in str(v) for v in at.dataframe[0].value["title"])
    assert list(at.dataframe[0].value["by"]) == ["alice@example.org"]  # who queued it
    next(b for b in at.button if b.label == "Cancel job").click().run()
    assert not at.exception
    assert store.get(job.id).status == "cancelled"
