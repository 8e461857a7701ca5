"""Static export of figures: PNG through plotly's kaleido (which drives a headless Chromium)."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio


def figure_png(fig: go.Figure | str, *, scale: float = 2.0) -> bytes:
    """The figure as PNG bytes; `fig` may be a Figure or its JSON (what the UI caches)."""
    figure = pio.from_json(fig) if isinstance(fig, str) else fig
    return pio.to_image(figure, format="png", scale=scale)


def figure_html(fig: go.Figure | str) -> str:
    """The figure as one self-contained interactive HTML file (plotly.js inlined, works offline)."""
    figure = pio.from_json(fig) if isinstance(fig, str) else fig
    return figure.to_html(include_plotlyjs=True, full_html=True)
