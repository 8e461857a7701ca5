"""One look for every figure of the product, in the app, the HTML report and PNG exports.

Colours are the Okabe–Ito palette (Okabe & Ito, "Color Universal Design", 2008), which stays
distinguishable under the common colour-vision deficiencies: chosen = bluish green, rejected =
vermillion, prompt = blue; series (runs, kernels, divergences) take the palette in order.
Legends sit below the plot area, horizontally, so they never cover a title or data; titles sit at
the top left; axis titles carry units. PNG exports are rendered at slide size (16:9).
"""

from __future__ import annotations

import plotly.graph_objects as go

CHOSEN_COLOR = "#009E73"  # bluish green
REJECTED_COLOR = "#D55E00"  # vermillion
PROMPT_COLOR = "#0072B2"  # blue
NEUTRAL_COLOR = "#555555"  # thresholds, reference lines, "policy = reference" marks
SERIES_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")

TEMPLATE = "plotly_white"
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=13, color="#222222")
TITLE_FONT_SIZE = 16
# Slide export: 16:9 at 1280 × 720 CSS pixels, rendered at 2× (2560 × 1440 PNG).
SLIDE_SIZE = (1280, 720)
SLIDE_FONT_SIZE = 18
SLIDE_SCALE = 2.0

# Legend below the plot area: a fixed pixel gap under the x-axis title, converted to paper
# coordinates from the plot height; plotly then grows the bottom margin to fit every legend row.
_LEGEND_GAP_PX = 62
_TOP_MARGIN = 60
_BOTTOM_MARGIN = 60


def series_color(i: int) -> str:
    return SERIES_PALETTE[i % len(SERIES_PALETTE)]


def legend_below(height: int) -> dict:
    plot_height = max(height - _TOP_MARGIN - _BOTTOM_MARGIN, 80)
    return dict(orientation="h", x=0.0, xanchor="left", y=-_LEGEND_GAP_PX / plot_height, yanchor="top",
                bgcolor="rgba(255,255,255,0)", font=dict(size=FONT["size"] - 1), title_text="")


def apply_style(fig: go.Figure, *, title: str | None = None, height: int = 380, legend: bool = True) -> go.Figure:
    """Template, fonts, title at the top left and the legend below the plot (never over it)."""
    layout = dict(template=TEMPLATE, height=height, font=FONT, showlegend=legend,
                  title=dict(text=title, x=0.0, xanchor="left", xref="paper", y=0.98, yref="container",
                             yanchor="top", font=dict(size=TITLE_FONT_SIZE)) if title is not None else None,
                  legend=legend_below(height), margin=dict(l=70, r=30, t=_TOP_MARGIN, b=_BOTTOM_MARGIN, autoexpand=True),
                  hoverlabel=dict(font_size=12))
    fig.update_layout(**{k: v for k, v in layout.items() if v is not None})
    return fig


def for_slides(fig: go.Figure) -> go.Figure:
    """A copy sized for a 16:9 slide with larger text (what the PNG export writes)."""
    slide = go.Figure(fig)
    width, height = SLIDE_SIZE
    scale = SLIDE_FONT_SIZE / FONT["size"]
    slide.update_layout(width=width, height=height, font=dict(size=SLIDE_FONT_SIZE),
                        title_font_size=round(TITLE_FONT_SIZE * scale), legend=legend_below(height) | dict(
                            font=dict(size=SLIDE_FONT_SIZE - 1)),
                        margin=dict(l=90, r=max(40, int((fig.layout.margin.r or 0) * scale)), t=80, b=80))
    slide.update_annotations(font_size=round(12 * scale))
    # frames/sliders are for the browser only; the PNG shows the current state
    slide.frames = ()
    return slide
