"""Heavy-tailed self-regularisation (HT-SR) layer analysis with WeightWatcher (METHOD.md 3).

WeightWatcher fits a power law to the eigenvalue spectrum of W^T W for every dense layer. Its
conventions, which the tests check independently: `lambda_max` is the largest eigenvalue of W^T W
(the squared largest singular value of W, no 1/N normalisation), and
`alpha_weighted = alpha * log10(lambda_max)`. The paper's weighted alpha is the mean of
alpha_weighted over layers. Layers whose alpha leaves [2, 6] are flagged: below 2 suggests
over-fitting, above 6 an under-trained layer.

WeightWatcher's spectrum on a CPU is a full float64 SVD of W (scipy), of which it keeps only the
singular values. `analyze_model` hands it the same values from the eigenvalues of the smaller Gram
matrix (W^T W or W W^T, float64) instead: 4x faster on SmolLM2-135M (212 layers, 5.5 s against
21.9 s on 2 cores), and equal to the SVD's table to 1e-9 relative in every column but `sv_min`
(1e-4: the smallest singular value is where squaring loses digits), far below the float32 precision
of the weights themselves (tests/test_htsr.py compares the two on a real model).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import pandas as pd

from dpo_engine.analysis.health import ALPHA_RANGE

COLUMNS = (
    "layer_id",
    "name",
    "longname",
    "layer_type",
    "alpha",
    "alpha_weighted",
    "lambda_max",
    "log_spectral_norm",
    "stable_rank",
    "num_evals",
    "N",
    "M",
    "warning",
)


def gram_eigenvalues(W) -> np.ndarray:
    """Eigenvalues of W^T W (ascending, float64, clipped at 0) from the smaller of W^T W and W W^T:
    the non-zero ones are the same and the smaller matrix is cheaper."""
    W = np.asarray(W, dtype=np.float64)
    gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
    return np.clip(np.linalg.eigvalsh(gram), 0.0, None)


def gram_singular_values(W, method=None) -> np.ndarray:  # noqa: ARG001 - WeightWatcher passes its svd method
    """Singular values of W as square roots of the eigenvalues of its smaller Gram matrix, in float64."""
    return np.sqrt(gram_eigenvalues(W))


def gram_singular_values_on(device: str):
    """`gram_singular_values` computed by torch on `device` (float64 there too): a GPU forms the Gram
    matrix and its eigenvalues of an 8B model's layers in a fraction of the CPU's time."""

    def singular_values(W, method=None) -> np.ndarray:  # noqa: ARG001 - WeightWatcher passes its svd method
        import torch

        w = torch.as_tensor(np.asarray(W), device=device).to(torch.float64)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().cpu().numpy()

    return singular_values


def import_weightwatcher():
    """The weightwatcher module, imported with its logger quieted first: its import warns about CUDA and
    about "import errors" on every CPU, which read like failures in a run's log."""
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    import weightwatcher

    return weightwatcher


@contextlib.contextmanager
def _gram_spectra(device: str | None = None):
    """WeightWatcher takes its singular values from `gram_singular_values` (or its torch twin on
    `device`) inside the block. The swap is process-wide: analyses run one at a time per process (in
    jobs, never in page threads)."""
    import weightwatcher.weightwatcher as ww_module

    original = ww_module.svd_vals
    ww_module.svd_vals = gram_singular_values if device is None else gram_singular_values_on(device)
    try:
        yield
    finally:
        ww_module.svd_vals = original


def analyze_model(
    model, *, known: pd.DataFrame | None = None, solver: str = "gram", device: str | None = None
) -> pd.DataFrame:
    """Per-layer WeightWatcher table (COLUMNS first, then whatever else it reports) plus an `out_of_range` flag.

    `known`: rows of an earlier table for layers whose weights have not changed since (same model
    structure, so the same `layer_id`s; e.g. the embedding and LM head that LoRA leaves alone).
    WeightWatcher skips those layers and their rows are reused: the table is the one a full
    analysis gives, without the largest SVDs (the 49k × 576 embedding of SmolLM2).
    `solver`: "gram" (the default; see the module docstring) or "svd" (WeightWatcher's own);
    `device`: where torch computes the Gram spectra (e.g. "cuda:0"); None computes them with numpy."""
    weightwatcher = import_weightwatcher()
    if solver not in ("gram", "svd"):
        raise ValueError(f"solver must be 'gram' or 'svd', got {solver!r}")
    known = known if known is not None and len(known) else None
    skip = [] if known is None else [-int(i) for i in known["layer_id"]]
    if any(i >= 0 for i in skip):
        raise ValueError("layers to reuse need positive WeightWatcher layer ids")
    spectra = _gram_spectra(device) if solver == "gram" else contextlib.nullcontext()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), spectra:
        warnings.simplefilter("ignore")
        details = weightwatcher.WeightWatcher(model=model).analyze(layers=skip)
    if known is not None:
        details = pd.concat([details, known.drop(columns=["out_of_range"], errors="ignore")], ignore_index=True)
        details = details.sort_values("layer_id", kind="stable")
    if details is None or len(details) == 0:
        raise ValueError("WeightWatcher found no analysable layers in this model")
    details = details.reset_index(drop=True)
    first = [c for c in COLUMNS if c in details.columns]
    table = details[first + [c for c in details.columns if c not in first]].copy()
    table["out_of_range"] = ~table["alpha"].between(*ALPHA_RANGE)
    return table


def weighted_alpha(table: pd.DataFrame) -> float:
    """(1/L) sum_l alpha_l log10(lambda_max_l): the mean of WeightWatcher's alpha_weighted over layers."""
    values = pd.to_numeric(table["alpha_weighted"], errors="coerce").to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no layer has a finite alpha_weighted")
    return float(values.mean())


def summarize(table: pd.DataFrame) -> dict[str, float | int]:
    alpha = pd.to_numeric(table["alpha"], errors="coerce")
    return {
        "layers": int(len(table)),
        "weighted_alpha": weighted_alpha(table),
        "mean_alpha": float(alpha.mean()),
        "layers_out_of_range": int(table["out_of_range"].sum()),
    }
