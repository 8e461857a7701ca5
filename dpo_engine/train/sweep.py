"""Check a diagnosis on the user's own data: a short sweep of the recommended kernel-divergence pair
against its runners-up, and whether the recommended pair came out ahead on held-out pairs.

`submit_sweep` queues one train job per pair (quick preset, one seed, the same split), and records
the sweep in `<workspace>/sweeps/<sweep_id>.json` (which run is which pair, which one the diagnosis
recommended). `sweep_outcome` reads the finished runs: held-out reward accuracy per run with a
bootstrap 95 % interval over eval pairs, and the recommended run's accuracy minus each other run's
with a paired bootstrap interval (the runs share the split, so pair-level differences are paired).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpo_engine import rundir

SWEEPS_DIR = "sweeps"
DEFAULT_PRESET = "quick"
FALLBACK_KERNELS = ("hmk", "polynomial", "rbf")  # runners-up when the diagnosis names none
FALLBACK_DIVERGENCES = ("kl", "hellinger", "js")
N_BOOTSTRAP = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class SweepPair:
    kernel: str
    divergence: str
    role: str  # "recommended" or what makes it a runner-up

    @property
    def label(self) -> str:
        return f"{self.kernel} + {self.divergence}"


def sweep_pairs(recommendation: dict[str, Any]) -> list[SweepPair]:
    """The recommended pair, the kernel runner-up with the recommended divergence and the
    recommended kernel with the divergence runner-up (fixed alternatives where none is named)."""
    kernel, divergence = recommendation["kernel"], recommendation["divergence"]
    k_alt = recommendation.get("kernel_runner_up") or next(k for k in FALLBACK_KERNELS if k != kernel)
    d_alt = recommendation.get("divergence_runner_up") or next(d for d in FALLBACK_DIVERGENCES if d != divergence)
    if k_alt == kernel:
        k_alt = next(k for k in FALLBACK_KERNELS if k != kernel)
    if d_alt == divergence:
        d_alt = next(d for d in FALLBACK_DIVERGENCES if d != divergence)
    return [
        SweepPair(kernel, divergence, "recommended"),
        SweepPair(k_alt, divergence, "kernel runner-up"),
        SweepPair(kernel, d_alt, "divergence runner-up"),
    ]


def sweeps_dir(workspace) -> Path:
    return Path(workspace.root) / SWEEPS_DIR


def submit_sweep(
    diagnosis: dict[str, Any],
    dataset: str,
    store,
    workspace,
    *,
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, Any] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Queue the sweep's train jobs and record it; returns the sweep record.

    `diagnosis` is a diagnosis.json dict (its "recommendation"); `overrides` are dotted TrainConfig
    settings applied on top of the preset (tests use a tiny model and a few steps). Every input is
    checked before the first job is queued, so a bad dataset queues nothing.
    """
    from dpo_engine.train.config import TrainConfig, set_dotted
    from dpo_engine.train.inputs import check_inputs
    from dpo_engine.train.presets import apply_preset

    recommendation = diagnosis.get("recommendation") or {}
    if not recommendation.get("kernel") or not recommendation.get("divergence"):
        raise ValueError("the diagnosis has no recommended kernel and divergence to check")
    configs = []
    for pair in sweep_pairs(recommendation):
        raw = apply_preset({"data": {"dataset": dataset}}, preset)
        for dotted, value in (overrides or {}).items():
            set_dotted(raw, dotted, value)
        set_dotted(raw, "method.kernel.name", pair.kernel)
        set_dotted(raw, "method.divergence.name", pair.divergence)
        configs.append((pair, TrainConfig.model_validate(raw)))
    check_inputs(configs[0][1], workspace)
    sweep_id = time.strftime("%Y%m%d-%H%M%S") + f"-sweep-{len(list(sweeps_dir(workspace).glob('*.json'))) + 1}"
    runs = []
    for pair, config in configs:
        job = store.submit(
            "train", config.model_dump(mode="json"), title=f"sweep {sweep_id} · {pair.label} ({pair.role})"
        )
        runs.append(
            {
                "run_id": job.run_id,
                "job_id": job.id,
                "kernel": pair.kernel,
                "divergence": pair.divergence,
                "role": pair.role,
            }
        )
    record = {
        "sweep_id": sweep_id,
        "dataset": dataset,
        "diagnosis": source,
        "preset": preset,
        "overrides": overrides or {},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs,
    }
    sweeps_dir(workspace).mkdir(parents=True, exist_ok=True)
    rundir.write_json(sweeps_dir(workspace) / f"{sweep_id}.json", record)
    return record


def list_sweeps(workspace) -> list[dict[str, Any]]:
    """Recorded sweeps, newest first."""
    folder = sweeps_dir(workspace)
    if not folder.is_dir():
        return []
    records = [rundir.read_json(p) for p in sorted(folder.glob("*.json"), reverse=True)]
    return [r for r in records if r]


# ---------------------------------------------------------------- outcome with intervals


def _bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean over pairs (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    res = bootstrap(
        (values,),
        np.mean,
        n_resamples=N_BOOTSTRAP,
        confidence_level=CONFIDENCE,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def final_margins(run_dir: Path) -> tuple[int, pd.Series] | None:
    """(step, reward margin per held-out pair) of the run's last evaluation, None before one exists."""
    margins = rundir.read_eval_margins(run_dir)
    if not margins:
        return None
    step = max(margins)
    return step, margins[step]


def accuracy_with_interval(margins: pd.Series) -> dict[str, float]:
    correct = (margins.dropna().to_numpy() > 0).astype(float)
    low, high = _bootstrap_ci(correct)
    return {"reward_acc": float(correct.mean()), "ci_low": low, "ci_high": high, "n_pairs": int(len(correct))}


def paired_accuracy_difference(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Accuracy of margins `a` minus that of `b` on the held-out pairs both have (paired: same pairs),
    with the paired bootstrap 95 % interval of the per-pair correctness difference."""
    common = a.dropna().index.intersection(b.dropna().index)
    if len(common) == 0:
        return {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_pairs": 0}
    d = ((a[common] > 0).astype(float) - (b[common] > 0).astype(float)).to_numpy()
    low, high = _bootstrap_ci(d, seed=1)
    return {"difference": float(d.mean()), "ci_low": low, "ci_high": high, "n_pairs": int(len(common))}


def sweep_outcome(record: dict[str, Any], run_dirs: dict[str, Path]) -> tuple[pd.DataFrame, str]:
    """(table, verdict): one row per run with its held-out accuracy and 95 % interval, and for the
    other pairs the recommended pair's accuracy minus theirs with a paired 95 % interval."""
    rows, finals = [], {}
    for run in record["runs"]:
        found = final_margins(run_dirs[run["run_id"]]) if run["run_id"] in run_dirs else None
        row = {"pair": f"{run['kernel']} + {run['divergence']}", "role": run["role"], "run": run["run_id"]}
        if found is not None:
            step, margins = found
            finals[run["run_id"]] = margins
            row |= {"step": step, **accuracy_with_interval(margins)}
        rows.append(row)
    table = pd.DataFrame(rows)
    recommended = next(r for r in record["runs"] if r["role"] == "recommended")
    others = [r for r in record["runs"] if r["role"] != "recommended"]
    if recommended["run_id"] not in finals or any(r["run_id"] not in finals for r in others):
        done = sum(r["run_id"] in finals for r in record["runs"])
        return table, f"waiting for results: {done} of {len(record['runs'])} runs have a held-out evaluation"
    rec = finals[recommended["run_id"]]
    diffs = {}
    for other in others:
        diff = paired_accuracy_difference(rec, finals[other["run_id"]])
        diffs[other["run_id"]] = (diff["difference"], diff["ci_low"], diff["ci_high"])
    table["recommended_minus_this"] = table["run"].map(lambda r: diffs.get(r, (np.nan,))[0])
    table["diff_ci_low"] = table["run"].map(lambda r: diffs.get(r, (np.nan, np.nan))[1])
    table["diff_ci_high"] = table["run"].map(lambda r: diffs.get(r, (np.nan, np.nan, np.nan))[2])
    return table, verdict(diffs, f"{recommended['kernel']} + {recommended['divergence']}")


def verdict(diffs: dict[str, tuple[float, float, float]], name: str) -> str:
    """Ahead = its accuracy minus every other's has a 95 % interval above 0; behind = one below 0."""
    if all(low > 0 for _, low, _ in diffs.values()):
        return f"The recommended pair {name} came out ahead of every runner-up (all 95 % intervals above 0)."
    if any(high < 0 for _, _, high in diffs.values()):
        return f"The recommended pair {name} came out behind at least one runner-up (a 95 % interval below 0)."
    best = all(mean >= 0 for mean, _, _ in diffs.values())
    return (
        f"No clear winner: the recommended pair {name} is {'at or above' if best else 'below'} every runner-up "
        "on the point estimate, but the 95 % intervals of the differences include 0 (too few steps or pairs)."
    )
