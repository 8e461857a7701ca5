"""HT-SR page under AppTest: submit an analysis job, then show a finished analysis per layer."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from dpo_engine.jobs import JobStore

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "htsr.py")


def test_submit_and_view_a_tiny_random_analysis(workspace):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert any("No HT-SR analyses yet" in i.value for i in at.info)
    at.selectbox[0].set_value("tiny-random")
    at.button[0].click().run()
    assert not at.exception
    store = JobStore.for_workspace(workspace)
    (job,) = store.list(kind="htsr")
    assert job.params == {"model": "tiny-random"} and job.status == "queued"
    assert any("has not finished" in i.value for i in at.info)

    # run the job the way a worker does (in-process here), then the page shows the layer view
    from dpo_engine.analysis.htsr_job import analyze_into

    store.claim("test-worker", "cpu")
    summary = analyze_into("tiny-random", Path(job.run_dir), workspace=workspace)
    store.finish(job.id, "succeeded", result=json.loads(json.dumps(summary, default=str)))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, at.exception
    weighted = next(m.value for m in at.metric if m.label == "Weighted alpha")
    assert weighted == f"{summary['weighted_alpha']:.3f}"
    charts = at.get("plotly_chart")
    assert any("WeightWatcher alpha per layer" in json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts)


def test_missing_local_directory_is_refused(workspace):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.selectbox[0].set_value("a local model directory…")
    at.text_input[0].set_value("/definitely/not/here")
    at.button[0].click().run()
    assert not at.exception
    assert any("is not a directory" in e.value for e in at.error)
    assert JobStore.for_workspace(workspace).list(kind="htsr") == []


def test_a_directory_that_is_not_a_model_is_refused_and_nothing_is_queued(workspace, tmp_path):
    from dpo_engine.jobs import JobStore

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no weights")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.selectbox[0].set_value("a local model directory…")
    at.text_input[0].set_value(str(folder))
    at.button[0].click().run()
    assert not at.exception
    assert any("holds no Hugging Face model" in e.value for e in at.error)
    assert JobStore.for_workspace(workspace).list(kind="htsr") == []
