"""Plotly figures of a dataset diagnosis: distances, margins, overlap, smoothness, confidence, 2-D map.

Colours are the product's: chosen green, rejected red, prompt blue. Each figure takes a
`Diagnosis` (and, for the map, the embeddings and the table), so the page and the report draw the
same pictures.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dpo_engine.selection.diagnosis import Diagnosis
from dpo_engine.selection.rules import DIVERGENCES, KERNELS
from dpo_engine.viz.style import CHOSEN_COLOR, PROMPT_COLOR, REJECTED_COLOR  # noqa: F401 - re-exported

OVERLAP_COLOR = "rgba(120, 120, 120, 0.55)"
TEMPLATE = "plotly_white"
HOVER_CHARS = 160
MAP_MAX_PAIRS = 600


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 380) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        template=TEMPLATE,
        height=height,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        margin=dict(l=60, r=20, t=70, b=50),
    )
    return fig


def _distance_label(diagnosis: Diagnosis) -> str:
    return (
        "cosine distance 1 − cos (unitless)"
        if diagnosis.distance == "cosine"
        else "Euclidean distance (embedding units)"
    )


def distance_histograms(diagnosis: Diagnosis, bins: int = 50) -> go.Figure:
    """Prompt–chosen (dp) and prompt–rejected (dn) distance histograms, overlaid."""
    p = diagnosis.pairs
    lo, hi = float(min(p.dp.min(), p.dn.min())), float(max(p.dp.max(), p.dn.max()))
    size = (hi - lo) / bins if hi > lo else 1.0
    xbins = dict(start=lo, end=hi + size, size=size)
    fig = go.Figure()
    fig.add_histogram(x=p.dp, name="prompt–chosen", marker_color=CHOSEN_COLOR, opacity=0.6, xbins=xbins)
    fig.add_histogram(x=p.dn, name="prompt–rejected", marker_color=REJECTED_COLOR, opacity=0.6, xbins=xbins)
    fig.update_layout(barmode="overlay")
    return _layout(fig, "Distance of each response to its prompt", _distance_label(diagnosis), "pairs (count)")


def margin_histogram(diagnosis: Diagnosis, bins: int = 50) -> go.Figure:
    """Scale-normalised margins s = dn~ − dp~; right of 0 the chosen response is nearer the prompt."""
    s = diagnosis.pairs.margins
    fig = go.Figure()
    fig.add_histogram(x=s, nbinsx=bins, name="margin", marker_color=PROMPT_COLOR, showlegend=False)
    fig.add_vline(x=0.0, line_dash="dash", line_color="black", annotation_text="balanced")
    m = diagnosis.metrics
    title = f"Margins s = dn~ − dp~ (drift {m.drift_magnitude:.3g}, Pearson kurtosis {m.kurtosis:.3g})"
    return _layout(fig, title, "scale-normalised margin s (unitless; >0: chosen nearer the prompt)", "pairs (count)")


def tat_histogram(diagnosis: Diagnosis, bins: int = 40) -> go.Figure:
    """Per-pair triangle ratio ||y+ − y−|| / (||y+ − x|| + ||y− − x||)."""
    fig = go.Figure()
    fig.add_histogram(
        x=diagnosis.pairs.tat,
        name="TAT",
        marker_color=PROMPT_COLOR,
        showlegend=False,
        xbins=dict(start=0.0, end=1.0, size=1.0 / bins),
    )
    fig.add_vline(x=diagnosis.metrics.tat, line_dash="dash", line_color="black", annotation_text="mean")
    return _layout(
        fig,
        f"Triangle alignment per pair (TAT = {diagnosis.metrics.tat:.3g})",
        "TAT ratio (unitless, 0..1)",
        "pairs (count)",
    )


def overlap_figure(diagnosis: Diagnosis) -> go.Figure:
    """The two similarity distributions: 50-bin histograms for context, and the kernel density
    estimates the metric integrates, with their overlap min(f, g) shaded (scaled to share per bin)."""
    from dpo_engine.selection.metrics import OverlapEstimator

    p = diagnosis.pairs
    edges = p.hist_edges
    centres = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0])
    hp = p.hist_chosen / max(p.hist_chosen.sum(), 1.0)
    hq = p.hist_rejected / max(p.hist_rejected.sum(), 1.0)
    estimator = OverlapEstimator.of(1.0 - p.dp, 1.0 - p.dn)
    f, g = (d[0] * width for d in estimator.densities(np.full((1, p.dp.shape[0]), 1.0 / p.dp.shape[0])))
    x = estimator.grid
    fig = go.Figure()
    fig.add_bar(x=centres, y=hp, width=width, name="P: 1 − dp (chosen)", marker_color=CHOSEN_COLOR, opacity=0.35)
    fig.add_bar(x=centres, y=hq, width=width, name="Q: 1 − dn (rejected)", marker_color=REJECTED_COLOR, opacity=0.35)
    fig.add_scatter(x=x, y=f, mode="lines", line=dict(color=CHOSEN_COLOR, width=2), name="KDE of P")
    fig.add_scatter(x=x, y=g, mode="lines", line=dict(color=REJECTED_COLOR, width=2), name="KDE of Q")
    fig.add_trace(
        go.Scatter(
            x=x,
            y=np.minimum(f, g),
            mode="lines",
            fill="tozeroy",
            fillcolor=OVERLAP_COLOR,
            line=dict(color="rgba(80,80,80,0.9)", width=1),
            name="overlap min(f, g)",
        )
    )
    fig.update_layout(barmode="overlay", bargap=0)
    title = (
        f"Support overlap of the similarity distributions (∫min / ∫max of the KDEs, bias-corrected = "
        f"{diagnosis.metrics.support_overlap:.3g})"
    )
    return _layout(fig, title, "similarity 1 − d (unitless)", "share of pairs per bin")


def chunk_smoothness_figure(diagnosis: Diagnosis) -> go.Figure:
    """Unbiased energy distance between consecutive file-order chunks of margins; their mean is the smoothness.

    Each bar is 0 in expectation when the file order carries no information, so bars that scatter
    around 0 mean no drift, and a tall bar marks where the data change along the file.
    """
    p = diagnosis.pairs
    fig = go.Figure()
    if p.chunk_energy.size == 0:
        fig.add_annotation(
            text="smoothness needs at least 40 pairs (two chunks of 20)",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
        return _layout(fig, "Chunk-to-chunk drift (not available)", "chunk pair", "energy distance (margin units)")
    labels = [f"{t + 1}→{t + 2}" for t in range(p.chunk_energy.size)]
    fig.add_bar(x=labels, y=p.chunk_energy, name="energy(S_t, S_t+1), noise floor removed", marker_color=PROMPT_COLOR)
    fig.add_hline(
        y=float(p.chunk_energy.mean()),
        line_dash="dash",
        line_color="black",
        annotation_text=f"smoothness {p.chunk_energy.mean():.3g}",
    )
    fig.add_hline(
        y=diagnosis.thresholds.smooth_lo,
        line_dash="dot",
        line_color="grey",
        annotation_text=f"smooth_lo {diagnosis.thresholds.smooth_lo:.3g}",
        annotation_position="bottom right",
    )
    sizes = np.diff(p.chunk_bounds, axis=1).ravel()
    return _layout(
        fig,
        f"Chunk-to-chunk drift of margins ({len(sizes)} chunks of ~{int(sizes.mean())} pairs, file order)",
        "consecutive chunks t→t+1",
        "energy distance minus its no-drift expectation (margin units)",
    )


def confidence_figure(diagnosis: Diagnosis) -> go.Figure:
    """Share of bootstrap resamples recommending each kernel and each divergence."""
    conf = diagnosis.recommendation.confidence
    fig = make_subplots(rows=1, cols=2, subplot_titles=("kernel", "divergence"), horizontal_spacing=0.18)
    for col, names, shares, chosen in (
        (1, KERNELS, conf.kernel, diagnosis.recommendation.kernel),
        (2, DIVERGENCES, conf.divergence, diagnosis.recommendation.divergence),
    ):
        colors = [PROMPT_COLOR if n == chosen else "#aec7e8" for n in names]
        fig.add_bar(
            x=[100 * shares.get(n, 0.0) for n in names],
            y=list(names),
            orientation="h",
            marker_color=colors,
            showlegend=False,
            row=1,
            col=col,
            text=[f"{100 * shares.get(n, 0.0):.0f}%" for n in names],
            textposition="auto",
        )
        fig.update_xaxes(title_text="resamples recommending (%)", range=[0, 100], row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(
        title=f"Bootstrap confidence ({diagnosis.n_bootstrap} resamples)",
        template=TEMPLATE,
        height=360,
        margin=dict(l=100, r=20, t=80, b=50),
    )
    return fig


def _truncate(text: str, n: int = HOVER_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def project_2d(points: np.ndarray, method: Literal["umap", "tsne"] = "umap", seed: int = 0) -> np.ndarray:
    """2-D coordinates of ``points``, by the same seeded projection the run page uses."""
    from dpo_engine.analysis.projections import ProjectionConfig, embed_points

    return embed_points(points, ProjectionConfig(method=method, dim=2, seed=seed))


def embedding_map(
    prompt: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    table: pd.DataFrame | None = None,
    method: Literal["umap", "tsne"] = "umap",
    seed: int = 0,
    max_pairs: int = MAP_MAX_PAIRS,
) -> go.Figure:
    """Prompt, chosen and rejected embeddings on one 2-D map; hover shows the pair's (truncated) texts.

    Above ``max_pairs`` pairs an evenly spaced subset is drawn (the projection cost grows fast).
    """
    n = prompt.shape[0]
    rows = np.linspace(0, n - 1, max_pairs).round().astype(int) if n > max_pairs else np.arange(n)
    xy = project_2d(np.concatenate([prompt[rows], chosen[rows], rejected[rows]]), method=method, seed=seed)
    k = rows.size
    fig = go.Figure()
    for i, (role, color, column) in enumerate(
        (
            ("prompt", PROMPT_COLOR, "prompt"),
            ("chosen", CHOSEN_COLOR, "chosen"),
            ("rejected", REJECTED_COLOR, "rejected"),
        )
    ):
        if table is not None:
            hover = [
                f"pair {r}<br><b>{role}</b>: {_truncate(table[column].iloc[r])}<br>prompt: "
                f"{_truncate(table['prompt'].iloc[r], 80)}"
                for r in rows
            ]
        else:
            hover = [f"pair {r} ({role})" for r in rows]
        fig.add_trace(
            go.Scattergl(
                x=xy[i * k : (i + 1) * k, 0],
                y=xy[i * k : (i + 1) * k, 1],
                mode="markers",
                name=role,
                marker=dict(color=color, size=6, opacity=0.7),
                hovertext=hover,
                hoverinfo="text",
            )
        )
    label = "UMAP" if method == "umap" else "t-SNE"
    subset = f", {k} of {n} pairs" if k < n else ""
    return _layout(
        fig,
        f"Sentence embeddings, {label} projection (seed {seed}{subset})",
        f"{label} 1 (arbitrary units)",
        f"{label} 2 (arbitrary units)",
        height=520,
    )


def diagnosis_figures(diagnosis: Diagnosis) -> dict[str, go.Figure]:
    """Every figure that needs only the diagnosis, by a stable key."""
    return {
        "distances": distance_histograms(diagnosis),
        "margins": margin_histogram(diagnosis),
        "tat": tat_histogram(diagnosis),
        "overlap": overlap_figure(diagnosis),
        "smoothness": chunk_smoothness_figure(diagnosis),
        "confidence": confidence_figure(diagnosis),
    }
