"""The data audit says the same everywhere: on both bundled sets, the CLI's lines, diagnosis.json,
the Diagnose page and the HTML report's audit section show the same findings with the same numbers.

The CLI queues the diagnosis as a job and a real worker runs it, as a user's `diagnose` does; the
page and the report then read that job's diagnosis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dpo_engine.data import DatasetStore, load_preferences
from dpo_engine.jobs import JobStore
from dpo_engine.viz.audit import findings_table
from tests.helpers import run_worker_once

REPO = Path(__file__).resolve().parent.parent
PAGE = str(REPO / "pages" / "diagnose.py")
PAIRS = 120  # the first pairs of each set keep the embedding short


@pytest.mark.parametrize("asset", ["sample_hh.jsonl.gz", "pandalm_test_pairs.jsonl.gz"])
def test_cli_json_page_and_report_show_the_same_audit(asset, workspace, tmp_path):
    from dpo_engine.report.builder import _audit_section, _Figures

    path = REPO / "assets" / asset
    dataset = DatasetStore(workspace).add(load_preferences(path), name=asset.split(".")[0], source=str(path))
    out_json = tmp_path / "diagnosis.json"
    cli = subprocess.Popen(
        [sys.executable, "-m", "dpo_engine.cli", "diagnose", dataset.id, "-w", str(workspace.root)]
        + ["--max-pairs", str(PAIRS), "--model", "tiny-random", "--bootstrap", "20", "--json", str(out_json)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = JobStore.for_workspace(workspace)
    deadline = time.monotonic() + 120
    while not store.list(kind="diagnose") and time.monotonic() < deadline:
        time.sleep(0.2)
    run_worker_once(workspace, timeout=400)
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr[-2000:]

    audit = json.loads(out_json.read_text())["audit"]
    assert audit["n_pairs"] == PAIRS and len(audit["findings"]) >= 8
    expected = findings_table(audit)

    # the CLI: one line per finding, count and share as the JSON has them
    for f in audit["findings"]:
        assert f"{f['title']}: {f['count']} ({f['share']:.1%}" in stdout, (f["title"], stdout[-3000:])

    # the page: the findings table is the JSON's, row for row
    at = AppTest.from_file(PAGE, default_timeout=180).run()
    assert not at.exception, at.exception
    shown = next(d.value for d in at.dataframe if "what to do" in d.value.columns)
    assert shown.reset_index(drop=True).equals(expected), (shown, expected)

    # the report: every finding's title, count and share in its audit table
    html = unescape(re.sub(r">\s+<", "><", _audit_section(audit, _Figures())))
    for _, row in expected.iterrows():
        cells = f"<td>{row['finding']}</td><td>{row['pairs']}</td><td>{row['share']}</td><td>{row['95% interval']}</td>"
        assert cells in html, cells
