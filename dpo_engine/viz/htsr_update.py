"""What training changed, per layer, for the run page's HT-SR tab and the report's HT-SR section:
the update ΔW's spectrum beside the base layer's alpha (analysis/htsr_update.py), and the texts
that say what the merged model's numbers can and cannot show."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dpo_engine.analysis.health import ALPHA_RANGE, ALPHA_UNRELIABLE, UPDATE_MIN_EVALS, htsr_base_out_of_range
from dpo_engine.viz.style import CHOSEN_COLOR, NEUTRAL_COLOR, REJECTED_COLOR, SERIES_PALETTE, apply_style

UPDATE_EXPLANATION = (
    "HT-SR of the update: for each layer training changed, the spectrum of ΔW (LoRA's (lora_alpha / r)·B·A, "
    "or W_after − W_before for a full fine-tune). Spectral norm: the largest stretch the update applies; "
    "relative norm: the same divided by the base layer's spectral norm; stable rank ‖ΔW‖_F² / ‖ΔW‖_2²: how "
    "many directions carry the update. A power-law alpha is fitted (by WeightWatcher) only where more than "
    f"{UPDATE_MIN_EVALS} eigenvalues are non-zero: a LoRA update of rank r ≤ {UPDATE_MIN_EVALS} has no tail to "
    f"fit. Alpha below {ALPHA_RANGE[0]:g} reads as over-fit, above {ALPHA_RANGE[1]:g} as under-trained, and "
    f"above {ALPHA_UNRELIABLE:g} the fit is unreliable."
)
LORA_WEIGHTED_ALPHA_NOTE = (
    "The weighted alpha is of the whole (merged) model. Under LoRA it can show only a large change: "
    "ΔW is low-rank and small beside W_base, so a short run leaves every layer's alpha, and the weighted "
    "alpha, all but unchanged. What training did is in the update table below."
)
DISPLAY_COLUMNS = (
    "longname",
    "status",
    "base_alpha",
    "alpha",
    "flag",
    "spectral_norm",
    "relative_norm",
    "stable_rank",
    "rank",
    "N",
    "M",
    "reason",
)


def base_range_note(htsr_before: pd.DataFrame | None) -> str | None:
    """One sentence on the base model's own out-of-range layers (information, not an alert)."""
    if htsr_before is None or "alpha" not in htsr_before:
        return None
    outside = htsr_base_out_of_range(htsr_before)
    if outside.empty:
        return None
    lo, hi = ALPHA_RANGE
    return (
        f"The base model has {len(outside)} of {len(htsr_before)} layers with alpha outside {lo:g}–{hi:g} before "
        "training. They are the base model's, not this run's, and raise no alert; only layers that leave the "
        "range during training do."
    )


def update_display_table(update: pd.DataFrame | None) -> pd.DataFrame:
    """The per-layer update table: changed layers first (largest relative change first), then the skipped."""
    if update is None or update.empty:
        return pd.DataFrame(columns=list(DISPLAY_COLUMNS))
    table = update[[c for c in DISPLAY_COLUMNS if c in update]].copy()
    for column in ("flag", "reason"):  # empty strings read back from the CSV as NaN
        if column in table:
            table[column] = table[column].astype(object).where(table[column].notna(), "")
    changed = table["status"] != "skipped"
    size = pd.to_numeric(table.get("relative_norm", table.get("spectral_norm")), errors="coerce").fillna(-1.0)
    table = table.assign(_changed=changed, _size=size).sort_values(["_changed", "_size"], ascending=False)
    return table.drop(columns=["_changed", "_size"]).reset_index(drop=True)


def update_flag_table(update: pd.DataFrame | None) -> pd.DataFrame:
    """Layers whose fitted update alpha is flagged (below 2, above 6, above 8)."""
    table = update_display_table(update)
    if table.empty or "flag" not in table:
        return table
    return table[table["flag"] != ""].reset_index(drop=True)


def update_figure(update: pd.DataFrame | None, *, title: str = "Base layer's alpha vs the update") -> go.Figure | None:
    """Scatter of each changed layer: x the base layer's alpha, y the update's fitted alpha where any
    layer has one (the 2–6 band shaded, flagged layers marked), else the update's relative norm."""
    if update is None or update.empty or "status" not in update:
        return None
    changed = update[update["status"] != "skipped"].copy()
    if changed.empty:
        return None
    base = pd.to_numeric(changed["base_alpha"], errors="coerce")
    alpha = pd.to_numeric(changed["alpha"], errors="coerce")
    fitted = alpha.notna()
    fig = go.Figure()
    lo, hi = ALPHA_RANGE
    if fitted.any():
        y, y_title = alpha, "update alpha (power-law exponent of ΔW)"
        groups = [
            (fitted & (alpha < lo), f"update α < {lo:g} (over-fit?)", REJECTED_COLOR),
            (fitted & alpha.between(lo, hi), f"update α in {lo:g}–{hi:g}", CHOSEN_COLOR),
            (fitted & (alpha > hi) & (alpha <= ALPHA_UNRELIABLE), f"update α > {hi:g}", SERIES_PALETTE[0]),
            (fitted & (alpha > ALPHA_UNRELIABLE), f"update α > {ALPHA_UNRELIABLE:g} (unreliable)", NEUTRAL_COLOR),
        ]
        fig.add_hrect(y0=lo, y1=hi, fillcolor=CHOSEN_COLOR, opacity=0.08, line_width=0)
    else:
        y = pd.to_numeric(changed["relative_norm"], errors="coerce")
        if y.isna().all():
            y = pd.to_numeric(changed["spectral_norm"], errors="coerce")
            y_title = "spectral norm of ΔW"
        else:
            y_title = "relative norm ‖ΔW‖₂ / ‖W_base‖₂"
        groups = [(y.notna(), "changed layer (no update alpha: rank too small)", SERIES_PALETTE[0])]
    for mask, name, color in groups:
        if not mask.any():
            continue
        rows = changed[mask]
        fig.add_trace(
            go.Scatter(
                x=base[mask],
                y=y[mask],
                mode="markers",
                name=name,
                marker=dict(size=9, color=color),
                text=rows["longname"],
                customdata=np.stack([rows["stable_rank"], rows["rank"]], axis=-1),
                hovertemplate="%{text}<br>base α %{x:.2f}<br>%{y:.3g}<br>stable rank %{customdata[0]:.2f}, "
                "rank %{customdata[1]}<extra></extra>",
            )
        )
    for x in ALPHA_RANGE:
        fig.add_vline(x=x, line=dict(color=NEUTRAL_COLOR, dash="dot", width=1))
    apply_style(fig, title=title, height=420)
    fig.update_xaxes(title_text="base layer's alpha (before training)")
    fig.update_yaxes(title_text=y_title, type="linear" if fitted.any() else "log")
    return fig
