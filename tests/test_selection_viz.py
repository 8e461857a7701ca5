"""Diagnosis figures on synthetic data: they show the diagnosis's own numbers, with labels and colours."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_engine.selection import diagnose
from dpo_engine.viz.diagnosis import (
    CHOSEN_COLOR,
    REJECTED_COLOR,
    chunk_smoothness_figure,
    confidence_figure,
    distance_histograms,
    embedding_map,
    margin_histogram,
    project_2d,
    tat_histogram,
)


def _embeddings(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((n, 8))
    return p, p + 0.7 * rng.standard_normal((n, 8)), p + 1.2 * rng.standard_normal((n, 8))


def test_histograms_plot_the_per_pair_values():
    d = diagnose(*_embeddings(90), n_bootstrap=20)
    fig = distance_histograms(d)
    np.testing.assert_array_equal(fig.data[0].x, d.pairs.dp)
    np.testing.assert_array_equal(fig.data[1].x, d.pairs.dn)
    assert (fig.data[0].marker.color, fig.data[1].marker.color) == (CHOSEN_COLOR, REJECTED_COLOR)
    assert "cosine" in fig.layout.xaxis.title.text
    np.testing.assert_array_equal(margin_histogram(d).data[0].x, d.pairs.margins)
    np.testing.assert_array_equal(tat_histogram(d).data[0].x, d.pairs.tat)


def test_smoothness_figure_bars_and_small_data_notice():
    d = diagnose(*_embeddings(100), n_bootstrap=0)
    fig = chunk_smoothness_figure(d)
    np.testing.assert_allclose(fig.data[0].y, d.pairs.chunk_energy)
    assert len(fig.data[0].y) == 4  # 5 chunks of 20
    assert np.mean(fig.data[0].y) == pytest.approx(d.metrics.smoothness)
    small = chunk_smoothness_figure(diagnose(*_embeddings(30), n_bootstrap=0))
    assert "40 pairs" in small.layout.annotations[0].text and not small.data


def test_confidence_bars_show_bootstrap_shares():
    d = diagnose(*_embeddings(120), n_bootstrap=50)
    fig = confidence_figure(d)
    kernel, divergence = fig.data
    assert list(kernel.y) == ["rbf", "polynomial", "spectral", "mahalanobis", "hmk"]
    np.testing.assert_allclose(kernel.x, [100 * d.recommendation.confidence.kernel[k] for k in kernel.y])
    np.testing.assert_allclose(sum(divergence.x), 100.0)
    assert "50 resamples" in fig.layout.title.text


def test_map_is_seeded_and_subsamples_large_sets():
    # t-SNE here: UMAP's first call JIT-compiles for about a minute on a small CPU, too slow for the suite
    p, c, r = _embeddings(50, seed=2)
    fig = embedding_map(p, c, r, method="tsne", seed=0, max_pairs=30)
    assert all(len(t.x) == 30 for t in fig.data)
    assert "t-SNE" in fig.layout.title.text and "30 of 50" in fig.layout.title.text
    again = embedding_map(p, c, r, method="tsne", seed=0, max_pairs=30)
    np.testing.assert_allclose(fig.data[2].y, again.data[2].y)
    with pytest.raises(ValueError, match="'tsne' or 'umap'"):
        project_2d(p, method="pca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 4 points"):
        project_2d(p[:2])
