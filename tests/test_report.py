"""The stakeholder report: every section present, opens offline (no external resources), parses; the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from dpo_engine.report import ReportError, build_report
from dpo_engine.report.builder import SECTION_TITLES
from dpo_engine.workspace import Workspace
from tests.test_ui_fixtures import run_workspace  # noqa: F401

EXTERNAL = re.compile(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.IGNORECASE)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.scripts_with_src = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "script" and attrs.get("src"):
            self.scripts_with_src.append(attrs["src"])


def _diagnosis(ws: Workspace) -> str:
    """A real diagnosis of the sample dataset (embedder shipped offline), stored as a run directory."""
    from dpo_engine.data import DatasetStore
    from dpo_engine.embed import embed_pairs
    from dpo_engine.selection import diagnose

    table = DatasetStore(ws).load("hh-harmless-sample").head(60)
    emb = embed_pairs(table, cache_dir=ws.embeddings_dir)
    result = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=20)
    run_dir = ws.run_dir("diagnose-fixture")
    result.save(run_dir)
    return "diagnose-fixture"


@pytest.fixture
def report_workspace(run_workspace):
    return Workspace.resolve(run_workspace.root)


def test_single_run_report_has_every_section_and_is_offline(report_workspace, run_workspace):
    html = build_report(report_workspace, [run_workspace.runs["ok_hmk"]])
    parser = _Collector()
    parser.feed(html)
    for key in (
        "diagnosis",
        "configuration",
        "curves",
        "kernel_weights",
        "divergences",
        "clusters",
        "htsr",
        "disagreements",
    ):
        assert key in parser.ids, key
        assert SECTION_TITLES[key] in html
    assert "compare" not in parser.ids  # one run: no comparison section
    assert parser.scripts_with_src == []
    assert not EXTERNAL.search(html)
    assert html.count("Plotly.newPlot") >= 8
    # plotly.js embedded exactly once
    assert html.count("plotly.js v") <= 2 and len(html) > 3_000_000
    assert "Kernel-weight evolution" in html and "WeightWatcher alpha per layer" in html
    assert "Davies–Bouldin" in html and "Linear-probe accuracy" in html


def test_report_opens_with_the_summary_and_ends_with_cost(report_workspace, run_workspace):
    html = build_report(report_workspace, [run_workspace.runs["ok_hmk"], run_workspace.runs["cancelled"]])
    sections = re.findall(r"<section id='([a-z_]+)'><h2>([^<]+)</h2>", html)
    assert sections[0] == ("summary", SECTION_TITLES["summary"]) and sections[-1][0] == "cost"
    opening = html[html.index("<section id='summary'>") : html.index("</section>")]
    assert "What was trained" in opening and "ok-hmk: tiny-random on" in opening
    assert "held-out reward accuracy" in opening and "log 2" in opening and "linear probe" in opening
    assert "Difference between runs" in opening and "on the same" in opening
    assert "No dataset diagnosis" not in opening
    cost = html[html.index("<section id='cost'>") :]
    assert "wall_time_s" in cost and "tokens_per_s" in cost and "peak_memory_mb" in cost
    assert "wall_time_s" not in html[: html.index("<section id='cost'>")]  # performance only at the end


def test_comparison_report_adds_the_compare_section(report_workspace, run_workspace):
    html = build_report(
        report_workspace, [run_workspace.runs["ok_hmk"], run_workspace.runs["cancelled"], run_workspace.runs["empty"]]
    )
    parser = _Collector()
    parser.feed(html)
    assert "compare" in parser.ids
    assert "Final metrics" in html and "rows = steps, columns = runs" in html
    assert "has not written any results yet" in html  # the empty run is reported, not dropped


def test_report_with_diagnosis_shows_metrics_and_rules(report_workspace, run_workspace):
    diag_id = _diagnosis(report_workspace)
    diag = json.loads((report_workspace.run_dir(diag_id) / "diagnosis.json").read_text())
    html = build_report(report_workspace, [run_workspace.runs["ok_hmk"]], diagnosis=diag_id)
    assert f"Recommended kernel:</b> {diag['recommendation']['kernel']}" in html
    assert "Rules (first match wins)" in html and "pnav" in html


def test_unknown_run_is_a_clear_error(report_workspace):
    with pytest.raises(ReportError, match="unknown run 'nope'"):
        build_report(report_workspace, ["nope"])
    with pytest.raises(ReportError, match="at least one run"):
        build_report(report_workspace, [])


def test_cli_writes_the_report(report_workspace, run_workspace, tmp_path):
    out = tmp_path / "r.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_engine.cli",
            "report",
            run_workspace.runs["ok_hmk"],
            "--out",
            str(out),
            "--workspace",
            str(report_workspace.root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "Training curves" in out.read_text()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_engine.cli",
            "report",
            "nope",
            "--out",
            str(out),
            "--workspace",
            str(report_workspace.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown run 'nope'" in bad.stderr


def test_report_lists_the_policys_held_out_disagreements_like_the_page(report_workspace, run_workspace):
    """The report's table holds the first 20 of the pairs the Runs page lists, in the same order."""
    from dpo_engine.analysis.audit.label_noise import policy_candidates

    run_id = run_workspace.runs["ok_hmk"]
    expected = policy_candidates(run_workspace.root / "runs" / "ok-hmk")[1]["pair_id"].head(20).tolist()
    html = build_report(report_workspace, [run_id])
    section = html[html.index("<section id='disagreements'>") :]
    section = section[: section.index("</section>")]
    assert expected and re.findall(r"<td>(p[^<]*)</td>", section)[: len(expected)] == expected
    assert "How reliable:" in section
