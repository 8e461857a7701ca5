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

# Legend below the plot area, anchored to the bottom edge of the figure (container coordinates), in
# a bottom margin reserved for the x-axis title plus as many legend rows as the entries need at the
# narrowest width a figure gets (a half-width column of the app). Wider figures only get more room.
_TOP_MARGIN = 60
_AXIS_TITLE_PX = 62
_LEGEND_ROW_PX = 20
_LEGEND_FOOT_PX = 14
_NARROWEST_PX = 420


def _legend_rows(fig: go.Figure, width_px: float, font_size: float) -> int:
    names = [str(t.name) for t in fig.data if t.name and t.showlegend is not False]
    if not names:
        return 0
    entry_px = max(len(n) for n in names) * font_size * 0.58 + 45  # plotly aligns entries in equal columns
    per_row = max(1, int(width_px // entry_px))
    return -(-len(names) // per_row)


def legend_below(
    fig: go.Figure, *, width_px: float = _NARROWEST_PX, font_size: float | None = None
) -> tuple[dict, int]:
    """(legend layout, bottom margin in px) that keep the legend under the x-axis title."""
    size = font_size or FONT["size"] - 1
    rows = _legend_rows(fig, width_px, size)
    legend = dict(
        orientation="h",
        x=0.0,
        xanchor="left",
        xref="paper",
        y=0.0,
        yanchor="bottom",
        yref="container",
        bgcolor="rgba(255,255,255,0)",
        font=dict(size=size),
        title_text="",
    )
    return legend, _AXIS_TITLE_PX + rows * round(_LEGEND_ROW_PX * size / 12) + 8


def series_color(i: int) -> str:
    return SERIES_PALETTE[i % len(SERIES_PALETTE)]


def apply_style(fig: go.Figure, *, title: str | None = None, height: int = 380, legend: bool = True) -> go.Figure:
    """Template, fonts, title at the top left and the legend below the plot (never over it)."""
    entries = [t for t in fig.data if t.name and t.showlegend is not False]
    legend = legend and len(entries) > 1  # one curve: the axis title already says what it is
    legend_layout, bottom = legend_below(fig) if legend else ({}, _AXIS_TITLE_PX)
    if legend:  # keep a gap under the legend so it never reads as part of the next figure's title
        bottom += _LEGEND_FOOT_PX
        height = max(height, _TOP_MARGIN + bottom + 160)  # a many-entry legend never squeezes the plot away
        legend_layout["y"] = _LEGEND_FOOT_PX / height
    layout = dict(
        template=TEMPLATE,
        height=height,
        font=FONT,
        showlegend=legend,
        title=dict(
            text=title,
            x=0.0,
            xanchor="left",
            xref="paper",
            y=0.98,
            yref="container",
            yanchor="top",
            font=dict(size=TITLE_FONT_SIZE),
        )
        if title is not None
        else None,
        legend=legend_layout or None,
        margin=dict(l=70, r=30, t=_TOP_MARGIN, b=bottom),
        hoverlabel=dict(font_size=12),
    )
    fig.update_layout(**{k: v for k, v in layout.items() if v is not None})
    return fig


def for_slides(fig: go.Figure) -> go.Figure:
    """A copy sized for a 16:9 slide with larger text (what the PNG export writes)."""
    slide = go.Figure(fig)
    width, height = SLIDE_SIZE
    scale = SLIDE_FONT_SIZE / FONT["size"]
    right = max(40, int((fig.layout.margin.r or 0) * scale))
    legend, bottom = legend_below(slide, width_px=width - 90 - right, font_size=SLIDE_FONT_SIZE - 1)
    if fig.layout.legend.orientation == "v":  # a legend placed beside the plot stays there
        legend = dict(font=dict(size=SLIDE_FONT_SIZE - 1))
    slide.update_layout(
        width=width,
        height=height,
        font=dict(size=SLIDE_FONT_SIZE),
        title_font_size=round(TITLE_FONT_SIZE * scale),
        legend=legend,
        margin=dict(l=90, r=right, t=80, b=round(bottom * 1.1)),
    )
    slide.update_annotations(font_size=round(12 * scale))
    # frames/sliders are for the browser only; the PNG shows the current state
    slide.frames = ()
    return slide
