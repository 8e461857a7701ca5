"""PNG and HTML export of single figures (PNG via kaleido + the machine's Chromium)."""

from __future__ import annotations

import re
import shutil
import struct

import plotly.graph_objects as go
import pytest

from dpo_engine.viz.export import figure_html, figure_png


def _figure() -> go.Figure:
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2], name="loss"))
    fig.update_layout(title="Loss", width=400, height=300)
    return fig


@pytest.mark.skipif(shutil.which("chromium") is None, reason="static export needs Chromium (make test installs it)")
def test_png_export_has_the_requested_size():
    png = figure_png(_figure().to_json(), scale=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR chunk
    assert (width, height) == (800, 600)


def test_html_export_is_self_contained():
    html = figure_html(_figure())
    assert "<script" in html and "Loss" in html
    # plotly.js is inlined: no <script src=...> at all (its source mentions a CDN only as a topojson default).
    assert re.search(r"<script[^>]*\bsrc=", html) is None


@pytest.mark.skipif(shutil.which("chromium") is None, reason="static export needs Chromium (make test installs it)")
def test_png_export_of_an_app_figure_is_slide_sized_with_large_text():
    import pandas as pd

    from dpo_engine.viz import runs as viz
    from dpo_engine.viz.style import SLIDE_FONT_SIZE, for_slides

    metrics = pd.DataFrame({"step": [1, 2, 3], "loss": [0.7, 0.6, 0.5], "loss_pref": [0.69, 0.6, 0.52]})
    fig = viz.loss_figure(metrics)
    png = figure_png(fig.to_json())
    assert struct.unpack(">II", png[16:24]) == (2560, 1440)  # 16:9 at 2x
    slide = for_slides(fig)
    assert slide.layout.font.size == SLIDE_FONT_SIZE and slide.layout.legend.font.size >= SLIDE_FONT_SIZE - 1
    assert fig.layout.width is None  # the app's own figure is untouched


def _colours(fig) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("color", "fillcolor") and isinstance(value, str):
                    found.add(value.upper())
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    spec = fig.to_plotly_json()
    walk(spec["data"])
    walk({k: v for k, v in spec["layout"].items() if k != "template"})
    return found


def test_run_figures_use_only_the_colour_blind_safe_palette():
    import pandas as pd

    from dpo_engine.report.rundata import load_run  # noqa: F401 - figures take RunData-like tables
    from dpo_engine.viz import runs as viz
    from dpo_engine.viz.htsr_update import update_figure as htsr_update_figure
    from dpo_engine.viz.style import CHOSEN_COLOR, NEUTRAL_COLOR, PROMPT_COLOR, REJECTED_COLOR, SERIES_PALETTE
    from tests.test_health import _healthy_rows
    from tests.test_htsr_update import _update_rows

    metrics, evals = (pd.DataFrame(rows) for rows in _healthy_rows())
    for column in (
        "div_kl",
        "div_js",
        "div_hellinger",
        "div_renyi",
        "div_bhattacharyya",
        "div_wasserstein",
        "div_fdiv",
    ):
        evals[column] = 0.01
    allowed = {c.upper() for c in (*SERIES_PALETTE, CHOSEN_COLOR, REJECTED_COLOR, PROMPT_COLOR, NEUTRAL_COLOR)}
    allowed |= {"BLACK", "#222222", "RGBA(255,255,255,0)"}
    figures = [
        viz.loss_figure(metrics, evals),
        viz.reward_accuracy_figure(metrics, evals),
        viz.reward_margin_figure(metrics, evals),
        viz.learning_rate_figure(metrics),
        viz.throughput_figure(metrics),
        viz.kernel_weight_figure(metrics),
        viz.beta_figure(metrics),
        viz.divergence_figure(evals, "kl"),
        viz.htsr_alpha_figure(pd.DataFrame({"layer_id": [0, 1], "alpha": [1.5, 3.0]})),
        htsr_update_figure(_update_rows().assign(alpha=[1.5, 7.0, 9.0], status="fitted")),
    ]
    for fig in figures:
        assert _colours(fig) <= allowed, (fig.layout.title.text, _colours(fig) - allowed)
