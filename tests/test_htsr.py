"""HT-SR: WeightWatcher's per-layer numbers against an independent eigenvalue computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_engine.analysis.htsr import (
    ALPHA_RANGE,
    analyze_model,
    gram_singular_values,
    gram_singular_values_on,
    summarize,
    weighted_alpha,
)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48))


def test_lambda_max_matches_numpy_eigenvalues(small_model):
    table = analyze_model(small_model)
    assert len(table) == 2
    for _, row in table.iterrows():
        layer = small_model.get_submodule(str(row["longname"]))
        w = layer.weight.detach().double().numpy()
        # WeightWatcher: lambda_max = largest eigenvalue of W^T W (squared top singular value, no 1/N factor).
        expected = np.linalg.eigvalsh(w.T @ w).max()
        assert row["lambda_max"] == pytest.approx(expected, rel=1e-4)
        assert row["alpha_weighted"] == pytest.approx(row["alpha"] * np.log10(expected), rel=1e-4)


def test_weighted_alpha_is_mean_and_flags_follow_range(small_model):
    table = analyze_model(small_model)
    assert weighted_alpha(table) == pytest.approx(
        float(np.mean(table["alpha"] * np.log10(table["lambda_max"]))), rel=1e-4
    )
    lo, hi = ALPHA_RANGE
    assert list(table["out_of_range"]) == [not (lo <= a <= hi) for a in table["alpha"]]
    s = summarize(table)
    assert s["layers"] == 2 and s["layers_out_of_range"] == int(table["out_of_range"].sum())


def test_htsr_job_on_tiny_model(workspace, tmp_path):
    from dpo_engine import rundir
    from dpo_engine.analysis.htsr_job import analyze_into

    summary = analyze_into("tiny-random", tmp_path / "run", workspace=workspace)
    table = rundir.read_htsr(tmp_path / "run", "single")
    assert summary["status"] == "succeeded" and len(table) == summary["layers"] > 0
    assert summary["weighted_alpha"] == pytest.approx(table["alpha_weighted"].mean())
    assert rundir.read_summary(tmp_path / "run")["weighted_alpha"] == pytest.approx(summary["weighted_alpha"])


def test_htsr_job_unknown_model(workspace, tmp_path):
    from dpo_engine.analysis.htsr_job import analyze_into
    from dpo_engine.models import UnknownModelError

    with pytest.raises(UnknownModelError, match="unknown model"):
        analyze_into("no-such-model", tmp_path / "run", workspace=workspace)


@pytest.mark.real_model
def test_gram_spectra_equal_weightwatchers_svd_on_real_layers(workspace):
    """The Gram-matrix eigenvalues give the table WeightWatcher's own SVD gives, on real weights of
    every shape in SmolLM2 (the 49k × 576 embedding, attention and MLP projections)."""
    import pandas as pd

    from dpo_engine.models.loading import load_policy

    model, _ = load_policy("smollm2-135m-instruct", workspace=workspace)
    part = torch.nn.ModuleList([model.model.embed_tokens, *model.model.layers[:2]])
    gram, svd = analyze_model(part), analyze_model(part, solver="svd")
    assert len(gram) == len(svd) == 15
    assert set(gram["M"].astype(int)) == {192, 576}
    pd.testing.assert_frame_equal(
        gram.drop(columns=["sv_min"]), svd.drop(columns=["sv_min"]), rtol=1e-9, check_exact=False
    )
    assert np.allclose(gram["sv_min"], svd["sv_min"], rtol=1e-4, atol=0)


def test_gram_singular_values_match_numpy_svd():
    rng = np.random.default_rng(0)
    for shape in ((40, 7), (7, 40), (16, 16)):
        w = rng.standard_normal(shape)
        svd = np.sort(np.linalg.svd(w, compute_uv=False))
        assert np.allclose(np.sort(gram_singular_values(w)), svd, rtol=1e-10)
        assert np.allclose(np.sort(gram_singular_values_on("cpu")(w.astype(np.float32))), svd, rtol=1e-6)
    with pytest.raises(ValueError, match="solver"):
        analyze_model(torch.nn.Linear(4, 4), solver="qr")
