"""The Datasets page under Streamlit's AppTest: upload, report, mapping, save, list, delete.

Validation and storing are "ingest" jobs: each test runs a real worker (`worker --once`) where a
user's worker would pick the job up, then reruns the same page session."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from dpo_engine.data import DatasetStore
from dpo_engine.jobs import JobStore
from tests.helpers import run_worker_once

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "datasets.py")


def _app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [m.value for m in at.caption] + [m.value for m in at.info]
    parts += [m.value for m in at.success] + [m.value for m in at.error] + [m.value for m in at.warning]
    return "\n".join(parts)


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _upload(at, workspace, name: str, data: bytes, mime: str):
    """Upload, let a worker validate it, and show the page again."""
    at.file_uploader[0].set_value((name, data, mime)).run()
    assert not at.exception
    run_worker_once(workspace)
    return at.run()


def test_upload_hh_sample_shows_report_and_saves(workspace, hh_sample_path):
    at = _app().run()
    assert not at.exception
    at.file_uploader[0].set_value(("hh.jsonl.gz", hh_sample_path.read_bytes(), "application/gzip")).run()
    assert not at.exception
    # The page parsed nothing itself: a validation job is queued with the upload in the workspace.
    (job,) = JobStore.for_workspace(workspace).list(kind="ingest")
    assert job.status == "queued" and job.params["step"] == "validate"
    assert Path(job.params["upload"]).read_bytes() == hh_sample_path.read_bytes()
    assert not at.metric
    run_worker_once(workspace)
    at.run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Rows in file"] == "400"
    assert int(metrics["Usable rows"]) + int(metrics["Unusable"]) == 400
    assert "layout **hh**" in _texts(at)
    next(t for t in at.text_input if t.label == "Dataset name").set_value("hh-upload").run()
    _button(at, "Save dataset").click().run()
    assert not at.exception
    assert DatasetStore(workspace).list() == []  # storing is a job too
    run_worker_once(workspace)
    at.run()
    assert not at.exception
    assert "Saved dataset **hh-upload**" in _texts(at)
    infos = DatasetStore(workspace).list()
    assert [i.name for i in infos] == ["hh-upload"]
    assert 0 < infos[0].n_pairs <= 400
    # Once stored, the upload and its staged copy are gone from the workspace.
    assert not Path(job.params["upload"]).exists()
    assert not (Path(job.run_dir) / "staged").exists()


def test_mapping_offered_for_unknown_columns(workspace):
    frame = pd.DataFrame(
        {"question": ["What is 2+2?", "Name a colour."], "response_j": ["4", "Blue."], "response_k": ["5", "Seven."]}
    )
    data = frame.to_csv(index=False).encode()
    at = _upload(_app().run(), workspace, "qa.csv", data, "text/csv")
    # Either the aliases were recognised directly, or the mapper is offered with them preselected.
    if any(b.label == "Apply mapping" for b in at.button):
        selects = {s.label: s.value for s in at.selectbox}
        assert selects["prompt"] == "question"
        _button(at, "Apply mapping").click().run()
        run_worker_once(workspace)
        at.run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Usable rows"] == "2"
    assert "question" in _texts(at)


def test_garbage_file_gives_clear_error_and_saves_nothing(workspace):
    at = _upload(_app().run(), workspace, "junk.jsonl", bytes(range(256)) * 20, "application/octet-stream")
    assert "cannot be used" in _texts(at)
    assert not any(b.label == "Save dataset" for b in at.button)
    assert DatasetStore(workspace).list() == []


def test_flagged_rows_listed_with_row_numbers(workspace):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": "p2", "chosen": "same", "rejected": "same"},
        {"prompt": "p3", "chosen": "", "rejected": "c"},
    ]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        gz.write(pd.DataFrame(rows).to_json(orient="records", lines=True).encode())
    at = _upload(_app().run(), workspace, "f.jsonl.gz", buf.getvalue(), "application/gzip")
    issues = at.dataframe[1].value
    assert set(issues["reason"]) >= {"identical_responses", "empty_field"}
    assert set(issues.loc[issues["reason"] == "identical_responses", "row"]) == {2}
    assert set(issues.loc[issues["reason"] == "empty_field", "row"]) == {3}
    # Default drops every flagged row: one pair is kept.
    assert "keeps **1** of 3 rows" in _texts(at)


def test_list_and_delete(workspace, hh_sample_path):
    from dpo_engine.data import load_preferences

    DatasetStore(workspace).add(load_preferences(hh_sample_path), name="first", source="hh", submitted_by="bob")
    at = _app().run()
    listing = at.dataframe[0].value
    assert list(listing["name"]) == ["first"] and list(listing["added by"]) == ["bob"]
    at.checkbox[0].check().run()
    _button(at, "Delete").click().run()
    assert not at.exception
    assert DatasetStore(workspace).list() == []
