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
