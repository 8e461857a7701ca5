"""HT-SR of what training changed: the spectrum of ΔW per layer (METHOD.md 3).

The merged model's alpha barely moves under a short LoRA run, because W_base dominates
W_base + ΔW; the base model's alpha says nothing about training at all. The update's own spectrum
does: how large it is (spectral norm, also relative to the base layer's), how many directions it
uses (rank, stable rank) and, only where the spectrum holds enough eigenvalues for a tail, its
power-law alpha, fitted by WeightWatcher's own `fit_powerlaw`.

ΔW of a LoRA layer is read from the adapters before merging, (lora_alpha / r) · B · A summed over
the active adapters; of a full fine-tune it is W_after − W_before. Both are formed in float64.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from dpo_engine.analysis.health import ALPHA_RANGE, ALPHA_UNRELIABLE, UPDATE_MIN_EVALS
from dpo_engine.analysis.htsr import gram_eigenvalues, import_weightwatcher

FITTED, NOT_FITTED, SKIPPED = "fitted", "not fitted", "skipped"
UPDATE_COLUMNS = (
    "longname",
    "source",
    "N",
    "M",
    "status",
    "reason",
    "rank",
    "lambda_max",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "alpha",
    "alpha_D",
    "num_pl_spikes",
    "base_alpha",
    "base_lambda_max",
    "relative_norm",
    "flag",
)
PEFT_PREFIX = "base_model.model."

# (layer name, ΔW or None, why the layer was not analysed when ΔW is None)
Delta = tuple[str, "np.ndarray | None", str]


def lora_deltas(model) -> Iterator[Delta]:
    """ΔW of every LoRA layer of a peft model, from its active adapters (call before merging)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        name = name.removeprefix(PEFT_PREFIX)
        if any(module.use_dora.get(a, False) for a in adapters):
            yield name, None, "DoRA rescales the merged weight: ΔW is not B·A"
            continue
        delta = None
        for adapter in adapters:
            with torch.no_grad():
                a = module.lora_A[adapter].weight.detach().to("cpu", torch.float64)
                b = module.lora_B[adapter].weight.detach().to("cpu", torch.float64)
                part = (b @ a) * float(module.scaling[adapter])
            if getattr(module, "fan_in_fan_out", False):
                part = part.T
            delta = part if delta is None else delta + part
        yield name, delta.numpy(), ""


def weight_deltas(model, before) -> Iterator[Delta]:
    """W_after − W_before of every linear and embedding layer; `before` is a model with the same
    structure holding the weights before training (e.g. the frozen reference of a full fine-tune)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding)
    reference = dict(before.named_modules())
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        ref = reference.get(name)
        if ref is None or getattr(ref, "weight", None) is None or ref.weight.shape != module.weight.shape:
            yield name, None, "no layer of the same shape in the weights before training"
            continue
        with torch.no_grad():
            delta = module.weight.detach().to("cpu", torch.float64) - ref.weight.detach().to("cpu", torch.float64)
        yield name, delta.numpy(), ""


def nonzero_eigenvalues(evals: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Eigenvalues of ΔW^T ΔW above the float64 rounding of the Gram's eigensolver
    (λ_max · max(N, M) · eps): the rest are zeros of a low-rank update."""
    evals = np.asarray(evals, dtype=np.float64)
    if evals.size == 0 or evals.max() <= 0:
        return evals[:0]
    tol = evals.max() * max(shape) * np.finfo(np.float64).eps
    return np.sort(evals[evals > tol])


def fit_alpha(evals: np.ndarray) -> tuple[float, float, int]:
    """WeightWatcher's power-law fit of a spectrum: (alpha, KS distance D, eigenvalues in the tail);
    NaNs when the fit fails. Its absolute 1e-5 cut is off: an update's eigenvalues may all lie below it."""
    weightwatcher = import_weightwatcher()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = weightwatcher.WeightWatcher().fit_powerlaw(
            np.asarray(evals, dtype=np.float64), plot=False, savefig=False, thresh=0.0
        )
    alpha, D, spikes, status = result[0], result[4], result[6], result[9]
    if status != "success" or alpha is None or not np.isfinite(alpha) or alpha <= 0:
        return np.nan, np.nan, 0
    return float(alpha), float(D), int(spikes)


def alpha_flag(alpha: float) -> str:
    """The reading of a fitted alpha, worst first; '' inside the range or when there is none."""
    lo, hi = ALPHA_RANGE
    if alpha is None or not np.isfinite(alpha):
        return ""
    if alpha < lo:
        return f"α < {lo:g} (over-fit?)"
    if alpha > ALPHA_UNRELIABLE:
        return f"α > {ALPHA_UNRELIABLE:g} (fit unreliable)"
    if alpha > hi:
        return f"α > {hi:g} (under-trained?)"
    return ""


def layer_row(name: str, delta: np.ndarray, source: str) -> dict:
    """Spectrum numbers of one ΔW: rank, λ_max of ΔW^T ΔW, spectral and Frobenius norms, stable rank
    ‖ΔW‖_F² / ‖ΔW‖_2², and alpha where more than UPDATE_MIN_EVALS eigenvalues are non-zero."""
    n, m = int(delta.shape[0]), int(delta.shape[1])
    row = {"longname": name, "source": source, "N": max(n, m), "M": min(n, m)}
    evals = nonzero_eigenvalues(gram_eigenvalues(delta), delta.shape)
    if evals.size == 0:
        return row | {"status": SKIPPED, "reason": "unchanged by training (ΔW = 0)", "rank": 0}
    lam = float(evals.max())
    row |= {
        "rank": int(evals.size),
        "lambda_max": lam,
        "spectral_norm": float(np.sqrt(lam)),
        "frobenius_norm": float(np.sqrt(evals.sum())),
        "stable_rank": float(evals.sum() / lam),
    }
    if evals.size <= UPDATE_MIN_EVALS:
        return row | {
            "status": NOT_FITTED,
            "reason": f"rank {evals.size} ≤ {UPDATE_MIN_EVALS}: too few eigenvalues for a power-law tail",
        }
    alpha, D, spikes = fit_alpha(evals)
    if not np.isfinite(alpha):
        return row | {"status": NOT_FITTED, "reason": "WeightWatcher's power-law fit failed"}
    return row | {"status": FITTED, "reason": "", "alpha": alpha, "alpha_D": D, "num_pl_spikes": spikes}


def update_table(
    deltas: Iterable[Delta], *, source: str, base: pd.DataFrame | None = None, missing_reason: str = ""
) -> pd.DataFrame:
    """One row per layer: the update's spectrum numbers beside the base layer's alpha (`base`, the
    run's "before" table); layers of `base` without a ΔW are listed as skipped with `missing_reason`."""
    rows = []
    for name, delta, reason in deltas:
        if delta is None:
            rows.append({"longname": name, "source": source, "status": SKIPPED, "reason": reason})
        else:
            rows.append(layer_row(name, delta, source))
    table = pd.DataFrame(rows, columns=[c for c in UPDATE_COLUMNS if c not in ("base_alpha", "base_lambda_max")])
    if base is not None and "longname" in base:
        known = base.drop_duplicates("longname").set_index("longname")
        missing = [n for n in known.index if n not in set(table["longname"])]
        extra = pd.DataFrame(
            {"longname": missing, "source": source, "status": SKIPPED, "reason": missing_reason}, columns=table.columns
        )
        table = pd.concat([table.astype(object), extra.astype(object)], ignore_index=True) if missing else table
        order = {name: i for i, name in enumerate(known.index)}
        table = table.sort_values("longname", key=lambda s: s.map(order).fillna(len(order)), kind="stable")
        table["base_alpha"] = table["longname"].map(pd.to_numeric(known["alpha"], errors="coerce"))
        if "lambda_max" in known:
            table["base_lambda_max"] = table["longname"].map(pd.to_numeric(known["lambda_max"], errors="coerce"))
    for column in ("base_alpha", "base_lambda_max"):
        if column not in table:
            table[column] = np.nan
    numeric = [c for c in UPDATE_COLUMNS if c not in ("longname", "source", "status", "reason", "flag")]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    table["relative_norm"] = table["spectral_norm"] / np.sqrt(table["base_lambda_max"])
    table["flag"] = [alpha_flag(a) for a in table["alpha"]]
    table["reason"] = table["reason"].fillna("")
    return table[list(UPDATE_COLUMNS)].reset_index(drop=True)


def summarize_update(update: pd.DataFrame) -> str:
    """One line for the run log."""
    changed = update[update["status"] != SKIPPED]
    fitted = int((update["status"] == FITTED).sum())
    if changed.empty:
        return f"HT-SR of the update: no layer changed ({len(update)} listed)"
    return (
        f"HT-SR of the update: {len(changed)} changed layers, median spectral norm "
        f"{changed['spectral_norm'].median():.3g}, median stable rank {changed['stable_rank'].median():.2f}, "
        f"alpha fitted for {fitted}"
    )
