"""End to end in a real browser: Debian's Chromium driven by Playwright against `dpo-kernels app`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dpo_engine.jobs import JobStore
from dpo_engine.workspace import Workspace
from tests.browser import CHROMIUM, chromium_page, running_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)"),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _keep(path: Path) -> None:
    """Copy a screenshot next to the repository too, so it survives pytest's tmp cleanup."""
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def test_upload_validate_save_and_list(tmp_path, hh_sample_path):
    ws = tmp_path / "ws"
    upload = tmp_path / "my_pairs.jsonl.gz"
    shutil.copy(hh_sample_path, upload)
    with running_app(ws, tmp_path / "app.log") as url, chromium_page() as page:
        page.goto(f"{url}/datasets")
        page.get_by_text("Upload preference pairs").wait_for()
        page.locator('input[type="file"]').set_input_files(str(upload))
        # The app's worker validates the upload as a job; the page follows it.
        page.get_by_text("Validation report").wait_for(timeout=90_000)
        page.get_by_text("Rows in file").wait_for()
        body = page.inner_text("body")
        assert "400" in body and "hh" in body
        name = page.get_by_label("Dataset name")
        name.fill("e2e-hh")
        name.press("Enter")
        page.get_by_role("button", name="Save dataset").click()
        page.get_by_text("Saved dataset").wait_for(timeout=90_000)
        jobs = JobStore.for_workspace(Workspace.resolve(ws)).list(kind="ingest")
        assert sorted((j.params["step"], j.status) for j in jobs) == [("store", "succeeded"), ("validate", "succeeded")]
        shot = tmp_path / "datasets_saved.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert "e2e-hh" in page.inner_text("body")

        page.get_by_role("tab", name="Your datasets").click()
        page.get_by_text("Download jsonl").wait_for()
        page.locator('[data-testid="stSelectbox"]').last.click()
        page.get_by_role("option").first.wait_for()
        options = page.get_by_role("option").all_inner_texts()
        assert any(o.startswith("e2e-hh") for o in options), options
        assert any(o.startswith("hh-harmless-sample") for o in options), options
        shot = tmp_path / "datasets_listed.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    _keep(path)


def _with_a_swapped_pair(source: Path, target: Path) -> None:
    """The sample with its first pair repeated, labels the other way round, among the first 60 rows:
    a conflict the data audit must find and export."""
    import gzip
    import json

    with gzip.open(source, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    swapped = {"chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}
    with gzip.open(target, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in [*rows[:50], swapped, *rows[50:]])


def test_upload_diagnose_train_monitor_and_report(tmp_path, hh_sample_path):
    """The whole product path a new user takes, on tiny-random for a few steps."""
    ws = tmp_path / "ws"
    upload = tmp_path / "flow_pairs.jsonl.gz"
    _with_a_swapped_pair(hh_sample_path, upload)
    with running_app(ws, tmp_path / "app.log") as url, chromium_page() as page:
        # 1. Upload the sample.
        page.goto(f"{url}/datasets")
        page.locator('input[type="file"]').set_input_files(str(upload))
        page.get_by_text("Validation report").wait_for(timeout=90_000)
        name = page.get_by_label("Dataset name")
        name.fill("flow")
        name.press("Enter")
        page.get_by_role("button", name="Save dataset").click()
        page.get_by_text("Saved dataset").wait_for(timeout=90_000)
        jobs = JobStore.for_workspace(Workspace.resolve(ws)).list(kind="ingest")
        assert sorted((j.params["step"], j.status) for j in jobs) == [("store", "succeeded"), ("validate", "succeeded")]

        # 2. Diagnose it (first 60 pairs keep the embedding short) on the app's own worker.
        page.goto(f"{url}/diagnose")
        page.get_by_text("Embedding options").click()
        max_pairs = page.get_by_label("Max pairs (0 = all)")
        max_pairs.fill("60")
        max_pairs.press("Enter")
        page.get_by_role("button", name="Run diagnosis").click()
        page.get_by_text("Kernel rules").wait_for(timeout=400_000)
        page.get_by_text("Divergence rules").wait_for()
        body = page.inner_text("body")
        assert "Kernel rule:" in body and "Divergence rule:" in body
        kernel = page.locator('[data-testid="stMetric"]').filter(has_text="Kernel").first.inner_text()
        recommended_kernel = kernel.split()[-1]
        assert recommended_kernel in {"rbf", "polynomial", "spectral", "mahalanobis", "hmk"}
        _shot(page, tmp_path, "flow_1_diagnosis")

        # 2a. The data audit finds the planted conflict; its flagged rows export as CSV.
        page.get_by_text("Data audit: length bias, repeats, conflicts, leakage").wait_for()
        page.get_by_text("finding(s) to act on").wait_for()
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="Export flagged pairs (CSV)").click()
        flagged_csv = tmp_path / "flagged.csv"
        download.value.save_as(str(flagged_csv))
        import pandas as pd

        flagged = pd.read_csv(flagged_csv)
        conflicts = flagged[flagged["finding"] == "conflict"]
        assert len(conflicts) == 2, flagged[["pair_id", "finding"]]
        first, second = conflicts.iloc[0], conflicts.iloc[1]
        assert (first["chosen"], first["rejected"]) == (second["rejected"], second["chosen"])
        assert first["related_pair_id"] == second["pair_id"]
        store = JobStore.for_workspace(Workspace.resolve(ws))
        # The newest dataset (the upload, not the bundled sample) was preselected and diagnosed.
        assert store.list(kind="diagnose")[0].params["dataset"].startswith("flow-")

        # 2b. One button queues a sweep (recommended pair and runners-up, quick preset, tiny model, 2 steps).
        page.get_by_text("Sweep settings (on top of the preset)").click()
        sweep_model = page.get_by_label("Model of every run", exact=True)
        sweep_model.fill("tiny-random")
        sweep_model.press("Enter")
        sweep_steps = page.get_by_label("Steps per run", exact=True)
        sweep_steps.fill("2")
        sweep_steps.press("Enter")
        page.get_by_role("button", name="Queue a sweep: recommended pair vs runners-up").click()
        page.get_by_text("Queued sweep").wait_for(timeout=60_000)
        sweep_jobs = store.list(kind="train")
        assert len(sweep_jobs) == 3 and {j.params["model"]["name"] for j in sweep_jobs} == {"tiny-random"}
        assert {j.params["optimisation"]["max_steps"] for j in sweep_jobs} == {2}

        # 3. Train with the recommendation: the form is prefilled; shrink the run to seconds.
        page.get_by_role("button", name="Train with this recommendation").click()
        page.get_by_text("Prefilled from diagnosis").wait_for()
        assert f"kernel {recommended_kernel}" in page.inner_text("body")
        page.locator('input[aria-label="name"][type="text"]').first.fill("tiny-random")
        for label, value in (
            ("max steps", "4"),
            ("batch size", "2"),
            ("max length", "48"),
            ("max prompt length", "24"),
            ("max pairs", "40"),
            ("eval every", "2"),
            ("snapshot every", "2"),
            ("probe pairs", "16"),
            ("calibration pairs", "16"),
            ("min eval pairs", "8"),
        ):
            field = page.get_by_label(label, exact=True)
            field.fill(value)
        _shot(page, tmp_path, "flow_2_train_form")
        page.get_by_role("button", name="Start training").click()

        # 4. The run page follows the job live until it finishes.
        page.wait_for_url("**/runs**", timeout=60_000)
        train_job = next(j for j in store.list(kind="train") if not j.title.startswith("sweep "))
        assert train_job.params["data"]["dataset"].startswith("flow-")
        assert train_job.params["method"]["kernel"]["name"] == recommended_kernel
        assert train_job.params["model"]["name"] == "tiny-random"
        page.get_by_text("succeeded", exact=True).first.wait_for(timeout=400_000)
        # The page redraws once when the run ends, without its live caption; then one set of tabs is on screen.
        page.get_by_text("Live: this view refreshes").wait_for(state="detached", timeout=120_000)
        page.wait_for_function("document.querySelectorAll('[data-testid=\"stTab\"]').length === 7", timeout=60_000)
        page.get_by_role("tab", name="Kernel weights").first.click()
        tab = page.get_by_role("tabpanel").filter(visible=True)
        if recommended_kernel == "hmk":
            tab.locator(".js-plotly-plot").first.wait_for()  # the λ/τ evolution figure is drawn
            assert "collapse threshold" in tab.text_content()
        else:
            tab.get_by_text("has no mixture weights").wait_for()
        _shot(page, tmp_path, "flow_3_kernel_weights")
        page.get_by_role("tab", name="Clusters").first.click()
        clusters = page.get_by_role("tabpanel").filter(visible=True)
        clusters.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
        assert "Davies" in clusters.inner_text()
        _shot(page, tmp_path, "flow_4_clusters")
        page.get_by_role("tab", name="Generalisation (HT-SR)").first.click()
        htsr = page.get_by_role("tabpanel").filter(visible=True)
        htsr.get_by_text("What training changed (HT-SR of the update)").wait_for(timeout=60_000)
        htsr.get_by_text("Per-layer update table (skipped layers with the reason)").click()
        layers = htsr.locator('[data-testid="stExpander"]').filter(has_text="Per-layer update table")
        layers.locator('[data-testid="stDataFrame"]').wait_for()
        rows = int(layers.locator('[role="grid"]').first.get_attribute("aria-rowcount"))
        assert rows > 2, rows  # a header and one row per adapted layer of tiny-random
        _shot(page, tmp_path, "flow_4b_htsr_update")
        page.get_by_role("tab", name="Held-out disagreements").first.click()
        disagreements = page.get_by_role("tabpanel").filter(visible=True)
        disagreements.get_by_text("How reliable:").wait_for(timeout=60_000)  # the measurement beside the list

        # 5. Export the stakeholder report and check what it holds.
        page.get_by_role("tab", name="Logs & files").first.click()
        with page.expect_download(timeout=180_000) as download:
            page.get_by_role("button", name="Download report (.html)").click()
        report = tmp_path / "report.html"
        download.value.save_as(str(report))
        _keep(report)
        html = report.read_text()
        for section in (
            "Dataset diagnosis",
            "Configuration",
            "Training curves",
            "Kernel weights",
            "Divergence",
            "Clusters",
            "HT-SR",
            "Held-out disagreements",
        ):
            assert section.lower() in html.lower(), section
        assert "tiny-random" in html
        sections = re.findall(r"<section id='(\w+)'>", html)
        assert sections[0] == "summary", sections  # the report leads with the plain-words summary
        summary = html[html.index("<section id='summary'>") : html.index("<section id='diagnosis'>")]
        assert "What was trained" in summary and "Held-out outcome" in summary, summary[:2000]
        assert re.search(r"<script[^>]*\bsrc=", html) is None  # opens offline

        # 6. The Compare page says whether the recommended pair came out ahead, with intervals.
        for job in store.list(kind="train"):
            assert store.get(job.id).status == "succeeded", (job.title, store.get(job.id).status)
        page.goto(f"{url}/compare")
        page.get_by_text("Sweep: did the recommended pair come out ahead?").wait_for(timeout=120_000)
        body = page.inner_text("body")
        assert any(v in body for v in ("came out ahead", "came out behind", "No clear winner")), body[:2000]
        assert "waiting for results" not in body and "95 % interval" in body
        _shot(page, tmp_path, "flow_5_sweep_outcome")


# ---------------------------------------------------------------- figures and health, as a stakeholder sees them

_FIGURE_GEOMETRY = """
() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
                      return r.width > 0 && r.height > 0 ? {l: r.left, r: r.right, t: r.top, b: r.bottom} : null; };
  const title = plot.querySelector('.g-gtitle text.gtitle');
  const legend = plot.querySelector('g.legend');
  return {title: title ? title.textContent : '', titleBox: box(title),
          legendBox: box(legend ? legend.querySelector('.bg') || legend : null),
          areas: Array.from(plot.querySelectorAll('.nsewdrag')).map(box).filter(b => b),
          axisTitles: Array.from(plot.querySelectorAll('.g-xtitle text, .g-ytitle text')).map(box).filter(b => b)};
})
"""


def _overlaps(a, b, pad=0.0) -> bool:
    return a["l"] < b["r"] - pad and b["l"] < a["r"] - pad and a["t"] < b["b"] - pad and b["t"] < a["b"] - pad


def _assert_legends_clear(page) -> int:
    """No legend over a figure title or over a plot area; returns how many drawn figures were checked."""
    checked = 0
    for fig in page.evaluate(_FIGURE_GEOMETRY):
        legend = fig["legendBox"]
        if legend is None:
            continue
        checked += 1
        if fig["titleBox"] is not None:
            assert not _overlaps(legend, fig["titleBox"]), f"legend over the title of {fig['title']!r}"
        for area in fig["areas"]:
            assert not _overlaps(legend, area, pad=1.0), f"legend over the data of {fig['title']!r}"
        for axis_title in fig["axisTitles"]:
            assert not _overlaps(legend, axis_title), f"legend over an axis title of {fig['title']!r}"
    return checked


def _health_run_workspace(root: Path) -> Path:
    """A workspace with one run written from the command line (no job) that displaces the chosen
    likelihood and starts, like every run, with policy = reference at step 0."""
    from dpo_engine.workspace import Workspace
    from tests.test_health import STEPS, _healthy_rows, _write

    ws = Workspace.resolve(root)
    metrics, evals = _healthy_rows()
    metrics[0].update(margin=0.0, reward_acc=0.0)
    for row in evals:
        t = row["step"] / STEPS
        row["reward_chosen"] = 0.02 if row["step"] < 20 else -0.3 * t
        row["reward_rejected"] = -0.05 * t if row["step"] < 20 else -1.0 * t
    _write(ws.run_dir("displaced-run"), metrics, evals, summary={"status": "succeeded", "error": None})
    return root


def test_run_page_and_report_figures_are_legible_and_show_the_alert(tmp_path):
    ws = _health_run_workspace(tmp_path / "ws")
    with running_app(ws, tmp_path / "app.log", with_worker=False) as url, chromium_page((1400, 1100)) as page:
        page.goto(f"{url}/runs?run_id=displaced-run")
        # the alert itself (the plain-words summary above it names the same alert once rendered)
        alert = page.get_by_test_id("stAlertContentWarning").get_by_text("Likelihood displacement from step 20")
        alert.first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").nth(3).wait_for()
        page.wait_for_timeout(1500)
        body = page.inner_text("body")
        assert "What to try" in body
        assert "ties (policy = reference)" in body  # the step-0 point is labelled on the accuracy figure
        assert _assert_legends_clear(page) >= 3
        _shot(page, tmp_path, "health_1_run_page")
        page.get_by_role("tab", name="Kernel weights").first.click()
        tab = page.get_by_role("tabpanel").filter(visible=True)
        tab.locator(".js-plotly-plot").first.wait_for()
        page.wait_for_timeout(1000)
        labels = tab.locator(".js-plotly-plot .annotation-text").all_text_contents()
        for kernel in ("λ1 RBF", "λ2 polynomial", "λ3 spectral", "λ4 Mahalanobis", "τ1 local", "τ2 global"):
            assert kernel in labels, labels  # each kernel named on the plot itself
        assert _assert_legends_clear(page) >= 1
        tab.locator(".js-plotly-plot").first.screenshot(path=str(tmp_path / "health_2_kernel_weights.png"))
        _keep(tmp_path / "health_2_kernel_weights.png")

        from dpo_engine.report import write_report
        from dpo_engine.workspace import Workspace

        page.goto(f"{url}/compare")
        page.get_by_text("Run health").wait_for()
        page.locator(".js-plotly-plot").nth(2).wait_for()
        page.wait_for_timeout(1500)
        assert "Likelihood displacement" in page.inner_text("body")
        assert _assert_legends_clear(page) >= 2
        _shot(page, tmp_path, "health_4_compare")

        report = write_report(Workspace.resolve(ws), ["displaced-run"], tmp_path / "health_report.html")
        page.goto(report.as_uri())
        page.locator(".js-plotly-plot").nth(4).wait_for()
        page.wait_for_timeout(1500)
        assert "Likelihood displacement from step 20" in page.inner_text("#health")
        assert _assert_legends_clear(page) >= 4
        page.locator("#health").scroll_into_view_if_needed()
        _shot(page, tmp_path, "health_3_report")
