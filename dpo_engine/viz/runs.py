"""Plotly figures of training runs: curves, kernel weights, divergences, clusters, HT-SR, comparisons.

Shared by the run and compare pages and the HTML report, so the app and the report always agree.
One look everywhere (dpo_engine.viz.style): the Okabe–Ito colour-blind-safe palette with chosen =
bluish green and rejected = vermillion, legends below the plot area, units on every axis. At step 0
the policy equals the reference, every reward margin is exactly 0 and TRL's strict accuracy
(chosen > rejected) reads 0: those points are drawn as "ties" and labelled, never as a bare 0.
Long curves are thinned for display (min/max per bucket, so spikes survive) because a
20,000-point line per trace makes the browser sluggish; the stored metrics are untouched.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dpo_engine.analysis.health import ALPHA_RANGE, COLLAPSE_THRESHOLD, alpha_outside_range
from dpo_engine.names import DIVERGENCE_METRIC_LABELS, MIXTURE_WEIGHT_LABELS, SEPARATION_METRICS
from dpo_engine.viz.style import (
    CHOSEN_COLOR,
    NEUTRAL_COLOR,
    PROMPT_COLOR,
    REJECTED_COLOR,
    SERIES_PALETTE,
    apply_style,
)

MAX_POINTS_PER_TRACE = 2000
PALETTE = SERIES_PALETTE
KERNEL_WEIGHT_HEIGHT = 500
END_LABEL_PX = 16  # vertical distance between two line-end labels of the kernel-weight figure
TIE_LABEL = "ties: policy = reference (before the first update)"
TIE_EXPLANATION = (
    "At step 0 the policy equals the reference, so every reward margin is exactly 0. Reward accuracy "
    "counts a pair as correct only when chosen > rejected (TRL's definition), so ties read 0 here: "
    "this is the starting point, not a failure."
)

ALPHA_EXPLANATION = (
    "WeightWatcher's alpha is the power-law exponent fitted to the tail of a layer's eigenvalue "
    f"spectrum: well-trained layers typically have alpha between {ALPHA_RANGE[0]:g} and {ALPHA_RANGE[1]:g}, "
    "smaller values hint at "
    "over-fitting and larger ones at under-trained, noisy weights. The weighted alpha averages "
    "alpha times log of the largest eigenvalue over layers; lower values usually go with better "
    "generalisation."
)

SEPARATION_EXPLANATION = (
    "How far apart the model keeps chosen and rejected answers, on the full-dimensional representations of "
    "the probe set: the Davies–Bouldin score (lower = better separated) and the accuracy of a linear probe "
    "that tells chosen from rejected on pairs it was not fitted on (0.5 = chance, 1 = a straight line "
    "separates them), with its 95 % interval (METHOD.md 3)."
)

# ---------------------------------------------------------------- helpers


def downsample_indices(y: np.ndarray, max_points: int = MAX_POINTS_PER_TRACE) -> np.ndarray:
    """Indices keeping the first, last, minimum and maximum of each bucket (peaks stay visible)."""
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    n_buckets = max(1, max_points // 4)
    edges = np.linspace(0, n, n_buckets + 1).astype(int)
    values = np.nan_to_num(np.asarray(y, dtype=float), nan=0.0)
    keep = [0, n - 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi <= lo:
            continue
        chunk = values[lo:hi]
        keep.extend((lo, hi - 1, lo + int(np.argmin(chunk)), lo + int(np.argmax(chunk))))
    return np.unique(np.asarray(keep))


def _line(
    table: pd.DataFrame,
    column: str,
    name: str,
    *,
    x: str = "step",
    color: str | None = None,
    dash: str | None = None,
    width: float = 2.0,
    max_points: int = MAX_POINTS_PER_TRACE,
    **kwargs,
) -> go.Scatter:
    sub = table[[x, column]].apply(pd.to_numeric, errors="coerce").dropna()
    idx = downsample_indices(sub[column].to_numpy(), max_points)
    sub = sub.iloc[idx]
    mode = kwargs.pop("mode", "lines")
    mode = mode if len(sub) > 1 else "markers"
    return go.Scatter(
        x=sub[x], y=sub[column], name=name, mode=mode, line=dict(color=color, dash=dash, width=width), **kwargs
    )


def _has(table: pd.DataFrame | None, column: str) -> bool:
    return table is not None and column in table and pd.to_numeric(table[column], errors="coerce").notna().any()


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, *, height: int = 380) -> go.Figure:
    apply_style(fig, title=title, height=height)
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def empty_figure(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    apply_style(fig, title=title, height=260, legend=False)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# ---------------------------------------------------------------- step 0: policy = reference


def tie_rows(table: pd.DataFrame | None, *, train: bool = False) -> pd.Series:
    """Rows logged while the policy still equals the reference: evaluations at step 0 (or with every
    reward exactly 0) and, for training rows (`train`), step 1, whose forward pass runs before the
    first update (LoRA starts at zero, full fine-tuning from a copy of the reference)."""
    if table is None or table.empty or "step" not in table:
        return pd.Series(False, index=getattr(table, "index", None), dtype=bool)
    step = pd.to_numeric(table["step"], errors="coerce")
    mask = step <= 1 if train else step == 0
    if "margin" in table:
        mask |= pd.to_numeric(table["margin"], errors="coerce").abs() == 0
    if "reward_chosen" in table and "reward_rejected" in table:
        mask |= (pd.to_numeric(table["reward_chosen"], errors="coerce").abs() == 0) & (
            pd.to_numeric(table["reward_rejected"], errors="coerce").abs() == 0
        )
    return mask.fillna(False).astype(bool)


def accuracy_text(run, column: str = "reward_acc", digits: int = 3) -> str:
    """The last eval accuracy for display: a number, 'ties (step 0)' while policy = reference, or '–'."""
    table = run.eval
    if table is None or table.empty or column not in table:
        return "–"
    values = pd.to_numeric(table[column], errors="coerce")
    valid = values.notna()
    if not valid.any():
        return "–"
    last = values[valid].index[-1]
    if bool(tie_rows(table).loc[last]):
        return "ties (step 0)"
    return f"{float(values.loc[last]):.{digits}f}"


# ---------------------------------------------------------------- single-run curves


def loss_figure(metrics: pd.DataFrame, eval_table: pd.DataFrame | None = None) -> go.Figure:
    """Total loss, preference loss and divergence loss (train) plus held-out preference loss."""
    fig = go.Figure()
    for column, name, color in (
        ("loss", "loss (train)", PALETTE[0]),
        ("loss_pref", "preference loss (train)", PALETTE[1]),
        ("loss_div", "divergence loss (train)", PALETTE[3]),
        ("loss_entropy", "entropy term (train)", NEUTRAL_COLOR),
    ):
        if _has(metrics, column):
            fig.add_trace(_line(metrics, column, name, color=color))
    if _has(eval_table, "loss_pref"):
        fig.add_trace(
            _line(eval_table, "loss_pref", "preference loss (eval)", color=PALETTE[1], dash="dot", mode="lines+markers")
        )
    return _layout(fig, "Training losses", "optimiser step", "loss (nats)")


def _without_ties(table: pd.DataFrame | None, *, train: bool = False) -> pd.DataFrame | None:
    return None if table is None else table[~tie_rows(table, train=train)]


def reward_accuracy_figure(metrics: pd.DataFrame, eval_table: pd.DataFrame | None = None) -> go.Figure:
    """Strict reward accuracy (chosen > rejected); points where policy = reference are drawn as ties."""
    fig = go.Figure()
    train, held_out = _without_ties(metrics, train=True), _without_ties(eval_table)
    if _has(train, "reward_acc"):
        fig.add_trace(_line(train, "reward_acc", "reward accuracy (train batch)", color=PALETTE[0], width=1.2))
    if _has(held_out, "reward_acc"):
        fig.add_trace(_line(held_out, "reward_acc", "reward accuracy (eval)", color=CHOSEN_COLOR, mode="lines+markers"))
    if _has(held_out, "hybrid_acc"):
        fig.add_trace(
            _line(
                held_out,
                "hybrid_acc",
                "hybrid-margin accuracy (eval)",
                color=PALETTE[1],
                dash="dash",
                mode="lines+markers",
            )
        )
    ties = pd.concat(
        [
            t[tie_rows(t, train=is_train)]
            for t, is_train in ((metrics, True), (eval_table, False))
            if t is not None and "reward_acc" in t
        ]
    )
    if not ties.empty:
        steps = sorted({int(s) for s in pd.to_numeric(ties["step"], errors="coerce").dropna()})
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[0.0] * len(steps),
                mode="markers",
                name=TIE_LABEL,
                marker=dict(symbol="diamond-open", size=12, color=NEUTRAL_COLOR, line=dict(width=2)),
                hovertemplate="step %{x}: policy = reference, every margin is 0 (ties count as not "
                "correct)<extra></extra>",
            )
        )
        fig.add_annotation(
            x=steps[0],
            y=0.0,
            text="ties (policy = reference)",
            showarrow=True,
            arrowhead=0,
            ax=40,
            ay=-30,
            font=dict(color=NEUTRAL_COLOR, size=11),
            xanchor="left",
        )
    fig = _layout(fig, "Reward accuracy (chosen reward > rejected)", "optimiser step", "accuracy (fraction of pairs)")
    fig.update_yaxes(range=[-0.04, 1.04])
    return fig


def reward_margin_figure(metrics: pd.DataFrame, eval_table: pd.DataFrame | None = None) -> go.Figure:
    """Held-out rewards of chosen vs rejected, and the training margin."""
    fig = go.Figure()
    if _has(eval_table, "reward_chosen"):
        fig.add_trace(
            _line(eval_table, "reward_chosen", "reward chosen (eval)", color=CHOSEN_COLOR, mode="lines+markers")
        )
    if _has(eval_table, "reward_rejected"):
        fig.add_trace(
            _line(eval_table, "reward_rejected", "reward rejected (eval)", color=REJECTED_COLOR, mode="lines+markers")
        )
    if _has(metrics, "margin"):
        fig.add_trace(_line(metrics, "margin", "margin (train batch)", color=NEUTRAL_COLOR, width=1.2))
    return _layout(fig, "Rewards and margins", "optimiser step", "β · log-ratio (nats)")


def learning_rate_figure(metrics: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if _has(metrics, "lr"):
        fig.add_trace(_line(metrics, "lr", "learning rate", color=PALETTE[0]))
    fig = _layout(fig, "Learning-rate schedule", "optimiser step", "learning rate (per step)", height=300)
    if _has(metrics, "lr"):  # learning rates are ~1e-4: start the axis at 0 and write ticks as 1e-4, not 0.0001
        top = float(pd.to_numeric(metrics["lr"], errors="coerce").max())
        fig.update_yaxes(range=[0, 1.1 * top if top > 0 else 1], exponentformat="e", tickformat=".1e")
    return fig


def throughput_figure(metrics: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if _has(metrics, "tokens_per_s"):
        fig.add_trace(_line(metrics, "tokens_per_s", "throughput", color=PALETTE[4]))
    return _layout(fig, "Throughput", "optimiser step", "tokens per second", height=300)


def kernel_weight_figure(metrics: pd.DataFrame) -> go.Figure | None:
    """λ1..λ4 and τ1, τ2 over steps with the collapse threshold; None for single-kernel runs."""
    columns = [c for c in MIXTURE_WEIGHT_LABELS if _has(metrics, c)]
    if not columns:
        return None
    fig = go.Figure()
    ends = []
    for i, column in enumerate(columns):
        dash = "dash" if column.startswith("tau") else None
        color = PALETTE[i % len(PALETTE)]
        trace = _line(metrics, column, MIXTURE_WEIGHT_LABELS[column], color=color, dash=dash)
        fig.add_trace(trace)
        if len(trace.x):
            ends.append([float(list(trace.x)[-1]), float(list(trace.y)[-1]), MIXTURE_WEIGHT_LABELS[column], color])
    fig.add_hline(y=COLLAPSE_THRESHOLD, line=dict(color=NEUTRAL_COLOR, dash="dot", width=1))
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            name=f"collapse threshold {COLLAPSE_THRESHOLD}",
            line=dict(color=NEUTRAL_COLOR, dash="dot", width=1),
        )
    )
    fig = _layout(
        fig,
        "Kernel-weight evolution (λ within the kernel group, τ between groups)",
        "optimiser step",
        "mixture weight (fraction)",
        height=KERNEL_WEIGHT_HEIGHT,
    )
    fig.update_layout(margin_r=130)  # room for the kernel names at the line ends
    # name each kernel at the end of its line (not only in the legend), labels pushed apart when lines meet:
    # ~16 px apart, in mixture-weight units of this figure's plot area (the y axis spans 0-1)
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    gap = END_LABEL_PX / max(plot_px, 100)
    ends.sort(key=lambda e: e[1])
    for lower, upper in zip(ends, ends[1:]):
        upper.append(max(upper[1], (lower[4] if len(lower) > 4 else lower[1]) + gap))
    for end in ends:
        fig.add_annotation(
            x=end[0],
            y=end[4] if len(end) > 4 else end[1],
            text=end[2],
            showarrow=False,
            xanchor="left",
            xshift=6,
            font=dict(color=end[3], size=12),
        )
    fig.update_yaxes(range=[0, 1.02])
    return fig


def beta_figure(metrics: pd.DataFrame) -> go.Figure | None:
    """β over steps (ε-DPO adapts it); None when beta is absent."""
    if not _has(metrics, "beta"):
        return None
    fig = go.Figure([_line(metrics, "beta", "β", color=PALETTE[3])])
    return _layout(fig, "β over training (ε-DPO)", "optimiser step", "β (dimensionless)", height=300)


def divergence_figure(eval_table: pd.DataFrame, regulariser: str | None = None) -> go.Figure | None:
    """All seven token-level divergences over eval steps; the one used as regulariser is bold."""
    columns = [c for c in DIVERGENCE_METRIC_LABELS if _has(eval_table, c)]
    if not columns:
        return None
    fig = go.Figure()
    for i, column in enumerate(columns):
        is_reg = regulariser is not None and column == f"div_{regulariser}"
        name = DIVERGENCE_METRIC_LABELS[column] + (" (regulariser)" if is_reg else "")
        fig.add_trace(
            _line(
                eval_table,
                column,
                name,
                color=PALETTE[i % len(PALETTE)],
                width=4.0 if is_reg else 1.5,
                mode="lines+markers",
                opacity=1.0 if is_reg or regulariser in (None, "none") else 0.55,
            )
        )
    return _layout(fig, "Divergence from the reference (held-out, per token)", "optimiser step", "divergence (nats)")


# ---------------------------------------------------------------- clusters and DBS


def _hover_texts(frame: pd.DataFrame, texts: pd.DataFrame | None, width: int = 80) -> list[str]:
    out = []
    for pair_id, label in zip(frame["pair_id"], frame["label"]):
        head = f"pair {pair_id} · {label}"
        if texts is not None and str(pair_id) in texts.index:
            row = texts.loc[str(pair_id)]
            prompt = textwrap.shorten(str(row.get("prompt", "")), width=width)
            response = textwrap.shorten(str(row.get(label, "")), width=2 * width)
            head += f"<br><b>prompt:</b> {prompt}<br><b>{label}:</b> {'<br>'.join(textwrap.wrap(response, width))}"
        out.append(head)
    return out


def cluster_figure(
    projection: pd.DataFrame,
    texts: pd.DataFrame | None = None,
    *,
    method: str = "t-SNE",
    separation: dict[int, str] | None = None,
) -> go.Figure:
    """Probe chosen (green) vs rejected (red) per snapshot, with a slider and play button over steps;
    `separation` (step -> text, `separation_by_step`) adds the full-dimensional scores to each title."""
    if projection.empty:
        return empty_figure("Representation clusters", "no snapshots yet")
    three_d = "z" in projection
    if texts is not None:
        texts = texts.copy()
        texts.index = texts.index.astype(str)
    steps = sorted(int(s) for s in projection["step"].unique())
    scatter = go.Scatter3d if three_d else go.Scatter
    marker_size = 3 if three_d else 6

    def traces(step: int) -> list:
        frame = projection[projection["step"] == step]
        out = []
        for label, color in (("chosen", CHOSEN_COLOR), ("rejected", REJECTED_COLOR)):
            part = frame[frame["label"] == label]
            coords = dict(x=part["x"], y=part["y"]) | (dict(z=part["z"]) if three_d else {})
            out.append(
                scatter(
                    **coords,
                    mode="markers",
                    name=label,
                    marker=dict(color=color, size=marker_size, opacity=0.75),
                    text=_hover_texts(part, texts),
                    hovertemplate="%{text}<extra></extra>",
                )
            )
        return out

    def title(step: int) -> str:
        text = (separation or {}).get(step)
        suffix = f"<br>{text} (full-dimensional)" if text else ""
        return f"Chosen vs rejected representations ({method}, aligned) · step {step}{suffix}"

    last = steps[-1]
    fig = go.Figure(
        data=traces(last),
        frames=[go.Frame(data=traces(s), name=str(s), layout=go.Layout(title_text=title(s))) for s in steps],
    )
    slider = dict(
        active=len(steps) - 1,
        currentvalue=dict(prefix="snapshot step: "),
        pad=dict(t=40),
        steps=[
            dict(
                label=str(s),
                method="animate",
                args=[
                    [str(s)],
                    dict(mode="immediate", frame=dict(duration=0, redraw=three_d), transition=dict(duration=0)),
                ],
            )
            for s in steps
        ],
    )
    buttons = dict(
        type="buttons",
        showactive=False,
        x=0.0,
        y=-0.08,
        xanchor="left",
        yanchor="top",
        buttons=[
            dict(
                label="▶ play",
                method="animate",
                args=[
                    None,
                    dict(frame=dict(duration=700, redraw=three_d), fromcurrent=False, transition=dict(duration=300)),
                ],
            ),
            dict(
                label="❚❚ pause",
                method="animate",
                args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))],
            ),
        ],
    )
    fig = _layout(fig, title(last), f"{method} 1 (arbitrary units)", f"{method} 2 (arbitrary units)", height=560)
    # the slider and play buttons live below this plot: the legend goes to the right of it
    fig.update_layout(
        sliders=[slider],
        updatemenus=[buttons],
        legend=dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top"),
    )
    if three_d:
        fig.update_layout(scene=dict(xaxis_title=f"{method} 1", yaxis_title=f"{method} 2", zaxis_title=f"{method} 3"))
    else:
        # fixed ranges so frames are comparable while animating
        pad_x = 0.05 * float(projection["x"].max() - projection["x"].min() or 1)
        pad_y = 0.05 * float(projection["y"].max() - projection["y"].min() or 1)
        fig.update_xaxes(range=[projection["x"].min() - pad_x, projection["x"].max() + pad_x])
        fig.update_yaxes(range=[projection["y"].min() - pad_y, projection["y"].max() + pad_y])
    return fig


def probe_text(acc: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    """Linear-probe accuracy with its 95 % interval for display, e.g. "0.62 (0.53–0.70)"; "–" when absent."""
    if acc is None or not np.isfinite(acc):
        return "–"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{acc:.{digits}f}"
    return f"{acc:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


SEPARATION_COLUMNS = ["step", *SEPARATION_METRICS, "source"]


def separation_table(run) -> pd.DataFrame:
    """Per snapshot: Davies–Bouldin score and linear-probe accuracy (with its 95 % interval) of chosen vs
    rejected, on the stored full-dimensional vectors.

    Uses the eval row's values when the trainer logged them and computes the missing ones from the
    snapshot (runs written before a metric existed, a snapshot without an eval row), so every
    snapshot has both. Lower DBS = better separated; probe accuracy 0.5 = not separated.
    """
    logged: dict[int, dict[str, float]] = {}
    if _has(run.eval, "step"):
        for _, row in run.eval.iterrows():
            values = {k: float(row[k]) for k in SEPARATION_METRICS if k in row and pd.notna(row[k])}
            if values:
                logged[int(row["step"])] = values
    rows = []
    for step in sorted(set(run.snapshot_steps) | set(logged)):
        values = dict(logged.get(step, {}))
        missing = [k for k in SEPARATION_METRICS if k not in values]
        source = "eval.jsonl"
        if missing and step in run.snapshot_steps:
            source = "eval.jsonl + snapshot" if values else "computed from snapshot"
            path = Path(run.snapshot_path(step))
            try:
                computed = _snapshot_separation(str(path), path.stat().st_mtime_ns)
            except Exception:  # a snapshot being written or degenerate (all points equal)
                computed = {}
            values |= {k: computed[k] for k in missing if k in computed}
        rows.append({"step": step, **{k: values.get(k, float("nan")) for k in SEPARATION_METRICS}, "source": source})
    return pd.DataFrame(rows, columns=SEPARATION_COLUMNS)


@functools.lru_cache(maxsize=256)
def _snapshot_separation(path: str, mtime_ns: int) -> dict[str, float]:  # noqa: ARG001 - part of the cache key
    """DBS and linear probe of one stored snapshot. A snapshot does not change once written and a page
    asks for it several times per render (tables, summary, titles), so each is computed once per process."""
    from dpo_engine.analysis.probe import separation

    with np.load(path, allow_pickle=False) as npz:
        return separation(npz["chosen"], npz["rejected"])


def last_probe_text(run) -> str:
    """The linear-probe accuracy of the run's last snapshot with its interval, or "–"."""
    table = separation_table(run).dropna(subset=["probe_acc"])
    if table.empty:
        return "–"
    last = table.iloc[-1]
    return probe_text(last["probe_acc"], last["probe_acc_lo"], last["probe_acc_hi"])


def separation_by_step(table: pd.DataFrame) -> dict[int, str]:
    """Step -> "DBS x · linear probe y (lo–hi)" for figure titles."""
    out = {}
    for _, row in table.iterrows():
        parts = []
        if pd.notna(row["dbs"]):
            parts.append(f"DBS {row['dbs']:.3f}")
        if pd.notna(row["probe_acc"]):
            parts.append("linear probe " + probe_text(row["probe_acc"], row["probe_acc_lo"], row["probe_acc_hi"]))
        if parts:
            out[int(row["step"])] = " · ".join(parts)
    return out


def dbs_figure(table: pd.DataFrame, name: str = "DBS") -> go.Figure:
    fig = go.Figure()
    if not table.empty:
        fig.add_trace(
            go.Scatter(x=table["step"], y=table["dbs"], mode="lines+markers", name=name, line=dict(color=PROMPT_COLOR))
        )
    return _layout(
        fig,
        "Davies–Bouldin score of chosen vs rejected (lower = better separated)",
        "optimiser step",
        "Davies–Bouldin score (dimensionless)",
        height=320,
    )


def probe_figure(table: pd.DataFrame) -> go.Figure:
    """Linear-probe accuracy per snapshot with its 95 % interval, against chance (0.5)."""
    fig = go.Figure()
    rows = table.dropna(subset=["probe_acc"]) if not table.empty else table
    if not rows.empty:
        fig.add_trace(
            go.Scatter(
                x=rows["step"],
                y=rows["probe_acc"],
                mode="lines+markers",
                name="linear probe",
                line=dict(color=PROMPT_COLOR),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=rows["probe_acc_hi"] - rows["probe_acc"],
                    arrayminus=rows["probe_acc"] - rows["probe_acc_lo"],
                ),
            )
        )
    fig.add_hline(y=0.5, line=dict(color=NEUTRAL_COLOR, dash="dot"), annotation_text="chance")
    fig = _layout(
        fig,
        "Linear-probe accuracy, chosen vs rejected (held-out folds, 95 % interval)",
        "optimiser step",
        "accuracy (fraction)",
        height=320,
    )
    fig.update_yaxes(range=[0.3, 1.02])
    return fig


# ---------------------------------------------------------------- HT-SR


def _layer_labels(table: pd.DataFrame) -> pd.Series:
    if "name" in table and "layer_id" in table:
        return table["layer_id"].astype(str) + " " + table["name"].astype(str)
    if "layer_id" in table:
        return table["layer_id"].astype(str)
    return pd.Series([str(i) for i in range(len(table))])


def htsr_alpha_figure(
    before: pd.DataFrame | None, after: pd.DataFrame | None = None, *, title: str = "WeightWatcher alpha per layer"
) -> go.Figure:
    """Alpha per layer (before vs after), the health.ALPHA_RANGE band shaded, layers outside it marked."""
    fig = go.Figure()
    lo, hi = ALPHA_RANGE
    for table, name, color in ((before, "before training", PALETTE[0]), (after, "after training", PALETTE[1])):
        if table is None or "alpha" not in table:
            continue
        labels = _layer_labels(table)
        alpha = pd.to_numeric(table["alpha"], errors="coerce")
        outside = alpha_outside_range(alpha)
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=alpha,
                mode="markers+lines",
                name=name,
                line=dict(color=color, width=1),
                marker=dict(size=7, color=color),
            )
        )
        if outside.any():
            fig.add_trace(
                go.Scatter(
                    x=labels[outside],
                    y=alpha[outside],
                    mode="markers",
                    name=f"outside [2, 6] ({name})",
                    marker=dict(size=13, symbol="x-open", color="black"),
                )
            )
    fig.add_hrect(y0=lo, y1=hi, fillcolor=CHOSEN_COLOR, opacity=0.08, line_width=0)
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            name="typical range 2 ≤ α ≤ 6",
            line=dict(color=CHOSEN_COLOR, width=8),
            opacity=0.3,
        )
    )
    fig = _layout(fig, title, "layer (id and name)", "alpha (power-law exponent)", height=420)
    fig.update_xaxes(tickangle=-45)
    return fig


def weighted_alpha_figure(rows: Sequence[tuple[str, float | None, float | None]]) -> go.Figure:
    """Bars of weighted alpha before/after for one or more runs: rows = (run label, before, after)."""
    labels = [r[0] for r in rows]
    fig = go.Figure(
        [
            go.Bar(x=labels, y=[r[1] for r in rows], name="before training", marker_color=PALETTE[0]),
            go.Bar(x=labels, y=[r[2] for r in rows], name="after training", marker_color=PALETTE[1]),
        ]
    )
    fig.update_layout(barmode="group")
    return _layout(
        fig, "Weighted alpha (mean over layers of α · log λmax)", "run", "weighted alpha (dimensionless)", height=340
    )


def htsr_flag_table(table: pd.DataFrame | None) -> pd.DataFrame:
    """Layers whose alpha lies outside health.ALPHA_RANGE."""
    if table is None or "alpha" not in table:
        return pd.DataFrame()
    lo, hi = ALPHA_RANGE
    flagged = table[alpha_outside_range(table["alpha"])].copy()
    flagged["flag"] = np.where(
        pd.to_numeric(flagged["alpha"]) < lo, f"alpha < {lo:g} (over-fit?)", f"alpha > {hi:g} (under-trained?)"
    )
    keep = [c for c in ("layer_id", "name", "alpha", "alpha_weighted", "lambda_max", "flag") if c in flagged]
    return flagged[keep].reset_index(drop=True)


# ---------------------------------------------------------------- comparison


def overlay_figure(runs: Sequence, column: str, *, source: str = "metrics", title: str, y_title: str) -> go.Figure:
    """One metric of several runs on shared axes (runs = RunData)."""
    fig = go.Figure()
    accuracy = column in ("reward_acc", "hybrid_acc")
    tie_steps: set[int] = set()
    for i, run in enumerate(runs):
        table = run.metrics if source == "metrics" else run.eval
        if accuracy and table is not None and not table.empty:
            ties = tie_rows(table, train=source == "metrics")
            tie_steps |= {int(s) for s in pd.to_numeric(table.loc[ties, "step"], errors="coerce").dropna()}
            table = table[~ties]
        if _has(table, column):
            fig.add_trace(
                _line(
                    table,
                    column,
                    run_label(run),
                    color=PALETTE[i % len(PALETTE)],
                    mode="lines+markers" if source == "eval" else "lines",
                )
            )
    if tie_steps:
        fig.add_trace(
            go.Scatter(
                x=sorted(tie_steps),
                y=[0.0] * len(tie_steps),
                mode="markers",
                name=TIE_LABEL,
                marker=dict(symbol="diamond-open", size=12, color=NEUTRAL_COLOR, line=dict(width=2)),
                hovertemplate="step %{x}: policy = reference, every margin is 0<extra></extra>",
            )
        )
    fig = _layout(fig, title, "optimiser step", y_title)
    if accuracy:
        fig.update_yaxes(range=[-0.04, 1.04])
    return fig


def run_label(run) -> str:
    kernel, div = run.kernel_name, run.divergence_name
    return f"{run.run_id} ({kernel}/{div})" if kernel or div else run.run_id


def final_accuracy_table(runs: Sequence) -> pd.DataFrame:
    rows = []
    for run in runs:
        before, after = run.weighted_alpha()
        rows.append(
            {
                "run": run.run_id,
                "kernel": run.kernel_name,
                "divergence": run.divergence_name,
                "status": (run.summary or {}).get("status"),
                "steps": int(run.metrics["step"].max()) if _has(run.metrics, "step") else None,
                "final reward accuracy (eval)": accuracy_text(run, "reward_acc"),
                "final hybrid accuracy (eval)": accuracy_text(run, "hybrid_acc"),
                "final preference loss (eval)": run.final("loss_pref"),
                "linear-probe accuracy (last snapshot)": last_probe_text(run),
                "weighted alpha before": before,
                "weighted alpha after": after,
            }
        )
    return pd.DataFrame(rows)


def separation_comparison_table(runs: Sequence, column: str = "dbs") -> pd.DataFrame:
    """Rows = snapshot steps, columns = runs (the paper's Table 13 layout), of the DBS or, with
    column="probe_acc", the linear-probe accuracy as text with its 95 % interval."""
    columns = {}
    for run in runs:
        table = separation_table(run).set_index("step")
        if column == "probe_acc":
            columns[run.run_id] = pd.Series(
                [probe_text(*v) for v in table[["probe_acc", "probe_acc_lo", "probe_acc_hi"]].to_numpy()],
                index=table.index,
                dtype=object,
            )
        else:
            columns[run.run_id] = table[column] if not table.empty else pd.Series(dtype=float)
    if not columns:
        return pd.DataFrame()
    out = pd.DataFrame(columns)
    out.index.name = "step"
    return out.sort_index()


def kernel_divergence_grid(runs: Sequence, value: str = "reward_acc") -> tuple[go.Figure, pd.DataFrame]:
    """Heatmap kernel × divergence of the final eval metric (mean over runs sharing a cell)."""
    rows = [
        {
            "kernel": run.kernel_name or "?",
            "divergence": run.divergence_name or "?",
            "value": None if accuracy_text(run, value).startswith("ties") else run.final(value),
        }
        for run in runs
    ]  # a run evaluated only at step 0 (policy = reference) has no accuracy yet
    table = pd.DataFrame(rows).dropna(subset=["value"])
    if table.empty:
        return empty_figure(
            "Final reward accuracy by kernel × divergence", "no finished evaluations yet"
        ), pd.DataFrame()
    grid = table.pivot_table(index="kernel", columns="divergence", values="value", aggfunc="mean")
    counts = table.pivot_table(index="kernel", columns="divergence", values="value", aggfunc="count")
    text = [
        [("" if pd.isna(v) else f"{v:.3f} (n={int(c)})") for v, c in zip(vr, cr)]
        for vr, cr in zip(grid.to_numpy(), counts.reindex_like(grid).to_numpy())
    ]
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=list(grid.columns),
            y=list(grid.index),
            text=text,
            texttemplate="%{text}",
            colorscale="Greens",
            zmin=0,
            zmax=1,
            colorbar=dict(title="accuracy"),
        )
    )
    fig = _layout(fig, "Final reward accuracy by kernel × divergence", "divergence", "kernel", height=360)
    fig.update_layout(showlegend=False)
    return fig, grid
