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


def label_noise_table(audit: dict[str, Any]) -> pd.DataFrame:
    """How well each label-noise signal found known flipped labels (the measurement the ranking rests on)."""
    from dpo_engine.analysis.audit.label_noise import quality_table

    return quality_table((audit.get("label_noise") or {}).get("measured"))


def label_noise_note(audit: dict[str, Any]) -> str | None:
    """One paragraph on the label-noise ranking: what it is ranked by and how that was measured."""
    noise = audit.get("label_noise")
    if not noise:
        return None
    measured = noise.get("measured")
    scored = ", ".join(f"{name} {count}" for name, count in noise["n_scored"].items())
    text = f"Pairs scored per signal: {scored} of {noise['n_pairs']}."
    if noise.get("model"):
        text += f" Reference model of the log-prob signal: {noise['model']}."
    if not measured:
        return text + " No measurement of the signals is recorded, so no ranking is shown."
    random = next(iter(measured["signals"].values()))["random_precision"]
    text += (
        f" Measured on {measured['dataset']} with a seeded {measured['flip_share']:.0%} of the labels flipped: each "
        f"signal's top k (k = pairs flipped) against the flipped pairs, 95 % Wilson intervals; a signal is shown "
        f"when its precision's lower bound exceeds {random:.2f}"
        " (random) by the margin in METHOD.md 1.6."
    )
    if noise.get("shown"):
        return text + f" The list is ranked by the {noise['shown']} signal ({noise['n_flagged']} pairs)."
    return text + " None of the signals computed here cleared that bar, so no pair is listed."


def group_table(by_group: dict[str, Any]) -> pd.DataFrame:
    """One row per category or source: size, length bias with its interval, repeats, leakage, the eight metrics."""
    rows = []
    for g in by_group.get("groups", []):
        lb = g["length"]["characters"]
        share = lb["share_chosen_longer"]
        c, lk = g["counts"], g["leakage"]
        row = {
            "group": g["name"],
            "pairs": g["n_pairs"],
            "chosen longer (chars)": "" if share is None else f"{share:.1%}",
            "95% interval": "" if share is None else f"{lb['interval']['low']:.1%} – {lb['interval']['high']:.1%}",
            "length bias": "warning" if lb["flagged"] else "ok",
        }
        if "tokens" in g["length"] and g["length"]["tokens"]["share_chosen_longer"] is not None:
            row["chosen longer (tokens)"] = f"{g['length']['tokens']['share_chosen_longer']:.1%}"
        row.update(
            {
                "duplicate pairs": c["duplicate_pair"],
                "conflicts": c["conflict"],
                "identical responses": c["identical_responses"],
                "near-identical responses": c["near_identical_responses"],
                "shared prompt": c["duplicate_prompt"],
                "near-duplicate prompt": c["near_duplicate_prompt"],
                "held out": lk["held_out"],
                "held-out prompt trained on": lk["exact"],
                "… or a near-duplicate": lk["near"],
            }
        )
        for name, value in (g["metrics"] or {}).items():
            row[name] = None if value is None else round(value, 4)
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_note(by_group: dict[str, Any]) -> str:
    """Which groups were too small for their own row, and why no recommendation is given per group."""
    text = f"Groups from the {by_group['column']!r} column; a group needs {by_group['min_group_pairs']} pairs "
    text += "for its own row."
    if by_group.get("pooled"):
        text += " Pooled into 'other': " + ", ".join(f"{k} ({v})" for k, v in by_group["pooled"].items()) + "."
    return text + " " + by_group["recommendation_note"]


def group_length_figure(by_group: dict[str, Any], unit: str = "characters") -> go.Figure | None:
    """Share of pairs whose chosen response is the longer one, per group, with its 95 % interval."""
    points = [
        (g["name"], g["n_pairs"], g["length"][unit])
        for g in by_group.get("groups", [])
        if unit in g["length"] and g["length"][unit]["share_chosen_longer"] is not None
    ]
    if not points:
        return None
    labels = [f"{name} ({n})" for name, n, _ in points]
    shares = [lb["share_chosen_longer"] for _, _, lb in points]
    fig = go.Figure()
    fig.add_scatter(
        x=shares,
        y=labels,
        mode="markers",
        marker={"color": [REJECTED_COLOR if lb["flagged"] else CHOSEN_COLOR for _, _, lb in points], "size": 10},
        error_x={
            "type": "data",
            "symmetric": False,
            "array": [lb["interval"]["high"] - s for s, (_, _, lb) in zip(shares, points)],
            "arrayminus": [s - lb["interval"]["low"] for s, (_, _, lb) in zip(shares, points)],
        },
        showlegend=False,
        name="share",
    )
    fig.add_vline(x=0.5, line_dash="dash", line_color=NEUTRAL_COLOR, annotation_text="no length bias")
    fig.update_xaxes(title_text=f"chosen is the longer response ({unit}; pairs of unequal length)", range=[0, 1])
    fig.update_yaxes(title_text="group (pairs)", autorange="reversed")
    return apply_style(fig, title=f"Length bias per group ({unit}), 95% intervals", height=160 + 40 * len(points))
