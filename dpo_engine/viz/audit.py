"""Figures and tables of the data audit, read from ``diagnosis.json["audit"]`` so the page and the report agree."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from dpo_engine.viz.style import CHOSEN_COLOR, NEUTRAL_COLOR, REJECTED_COLOR, apply_style


def length_difference_figure(audit: dict[str, Any], unit: str = "characters") -> go.Figure | None:
    """Histogram of chosen minus rejected length; right of 0 the chosen response is the longer one."""
    bias = (audit.get("length") or {}).get(unit)
    if not bias:
        return None
    hist = bias["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0]
    colours = [CHOSEN_COLOR if c > 0 else REJECTED_COLOR for c in centres]
    fig = go.Figure()
    fig.add_bar(x=centres, y=counts, width=width, marker_color=colours, showlegend=False, name="pairs")
    fig.add_vline(x=0.0, line_dash="dash", line_color=NEUTRAL_COLOR, annotation_text="equal length")
    share = bias.get("share_chosen_longer")
    title = f"Chosen minus rejected length in {unit}"
    if share is not None:
        ci = bias["interval"]
        title += f" (chosen longer in {share:.0%} of unequal pairs, 95% CI {ci['low']:.0%}–{ci['high']:.0%})"
    if hist["below"] or hist["above"]:
        title += f"<br><sup>{hist['below']} pairs below and {hist['above']} above the drawn range</sup>"
    fig.update_xaxes(title_text=f"chosen − rejected ({unit}; >0: chosen longer)")
    fig.update_yaxes(title_text="pairs (count)")
    return apply_style(fig, title=title, height=400)


def findings_table(audit: dict[str, Any]) -> pd.DataFrame:
    """One row per finding: count, share, interval where the number is an estimate, what to do."""
    rows = []
    for f in audit.get("findings", []):
        interval = f.get("interval")
        rows.append(
            {
                "finding": f["title"],
                "pairs": f["count"],
                "share": f"{f['share']:.1%}",
                "95% interval": f"{interval['low']:.1%} – {interval['high']:.1%}" if interval else "",
                "status": f["severity"],
                "what to do": f["action"],
            }
        )
    return pd.DataFrame(rows)


def leakage_table(audit: dict[str, Any]) -> pd.DataFrame:
    used = (audit.get("split") or {}).get("split_by")
    rows = []
    for split_by, lk in (audit.get("leakage") or {}).items():
        rows.append(
            {
                "split by": split_by + (" (training's)" if split_by == used else ""),
                "train pairs": lk["n_train"],
                "held-out pairs": lk["n_held_out"],
                "held-out prompt trained on": lk["exact"],
                "… or a near-duplicate of it": lk["near"],
            }
        )
    return pd.DataFrame(rows)
