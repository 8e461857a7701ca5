"""Static export of figures: PNG through plotly's kaleido (which drives a headless Chromium).

PNGs are rendered at slide size (16:9, larger text; see `dpo_engine.viz.style.for_slides`) unless
the figure fixes its own width and height, so a downloaded figure drops into a deck legibly.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

from dpo_engine.viz.style import SLIDE_SCALE, for_slides


def figure_png(fig: go.Figure | str, *, scale: float = SLIDE_SCALE) -> bytes:
    """The figure as PNG bytes; `fig` may be a Figure or its JSON (what the UI caches)."""
    figure = pio.from_json(fig) if isinstance(fig, str) else fig
    if figure.layout.width is None or figure.layout.height is None:
        figure = for_slides(figure)
    try:
        return pio.to_image(figure, format="png", scale=scale)
    except Exception as exc:
        # kaleido's headless Chromium can be asked to render before its page script has loaded (seen
        # on a loaded machine); the second call starts a fresh browser. Any other error is raised.
        if "kaleido_scopes is not defined" not in str(exc):
            raise
        return pio.to_image(figure, format="png", scale=scale)


def figure_html(fig: go.Figure | str) -> str:
    """The figure as one self-contained interactive HTML file (plotly.js inlined, works offline)."""
    figure = pio.from_json(fig) if isinstance(fig, str) else fig
    return figure.to_html(include_plotlyjs=True, full_html=True)
