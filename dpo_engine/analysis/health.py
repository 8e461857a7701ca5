"""Run-health alerts: "is this curve healthy?", answered from a run directory's metric files.

Each check reads `metrics.jsonl` / `eval.jsonl` (whatever rows exist, so it also works while a
run is still training), the resolved config, summary.json and the WeightWatcher tables, and
returns an `Alert` saying what the pattern means, the step where it starts and what to try.
Thresholds are module constants, written down in docs/METHOD.md ("Run-health alerts").

What is and is not logged: the trainer logs rewards (β · log π/π_ref) rather than raw log-probs,
so "chosen log-probs falling" is read from the held-out chosen reward, which has the same sign as
the change of the chosen log-prob relative to the reference.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from dpo_engine.names import MIXTURE_WEIGHT_LABELS
from dpo_engine.rundir import config_value

# Likelihood displacement: held-out chosen reward below -DISPLACEMENT_TOL while the held-out
# margin has grown by more than DISPLACEMENT_TOL since the first evaluation, from some eval on.
DISPLACEMENT_TOL = 0.05
# Memorising: over MEMO_WINDOW consecutive logged steps the training preference loss stays below
# MEMO_LOSS or the training reward accuracy is 1.0, while the held-out preference loss improved
# by less than FLAT_TOL and the held-out reward accuracy by less than FLAT_TOL since then.
MEMO_WINDOW = 5
MEMO_LOSS = 0.05
FLAT_TOL = 0.02
# Kernel-weight collapse: any mixture weight λ or τ below this.
COLLAPSE_THRESHOLD = 0.05
# ε-DPO: β outside this range (the usual DPO range; TRL's default is 0.1).
BETA_SANE_RANGE = (0.01, 1.0)
# HT-SR (a heuristic): WeightWatcher alpha outside this range.
ALPHA_RANGE = (2.0, 6.0)
# HT-SR of the update ΔW (METHOD.md 3): a power-law alpha is fitted only to a spectrum with more than
# UPDATE_MIN_EVALS non-zero eigenvalues (WeightWatcher's analyze documents min_evals = 10; a LoRA
# update has at most r of them); a fitted alpha above ALPHA_UNRELIABLE is shown but not trusted
# (WeightWatcher calls such fits unreliable). An update alpha below ALPHA_RANGE[0] reads as over-fit.
UPDATE_MIN_EVALS = 10
ALPHA_UNRELIABLE = 8.0

_GUARDED = ("loss", "loss_pref", "margin", "reward_acc", "grad_norm")


@dataclass(frozen=True)
class Alert:
    """One health finding: what it is, where it starts, what it means and what to try."""

    code: str
    title: str
    severity: str  # "error" (the run is broken), "warning" (look at it), "info" (a heuristic hint)
    step: int | None
    evidence: str
    meaning: str
    advice: str
    heuristic: bool = False

    @property
    def headline(self) -> str:
        where = f" from step {self.step}" if self.step is not None else ""
        return f"{self.title}{where}" + (" (heuristic)" if self.heuristic else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"headline": self.headline}


def _numeric(table: pd.DataFrame | None, column: str) -> pd.DataFrame:
    """step + column as floats (missing values kept as NaN), sorted by step."""
    if table is None or table.empty or column not in table or "step" not in table:
        return pd.DataFrame(columns=["step", column])
    out = pd.DataFrame(
        {"step": pd.to_numeric(table["step"], errors="coerce"), column: pd.to_numeric(table[column], errors="coerce")}
    )
    return out.dropna(subset=["step"]).sort_values("step", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- the checks


def likelihood_displacement(eval_table: pd.DataFrame | None) -> Alert | None:
    chosen = _numeric(eval_table, "reward_chosen")
    rejected = _numeric(eval_table, "reward_rejected")
    if len(chosen) < 2 or len(rejected) < 2:
        return None
    table = chosen.merge(rejected, on="step").dropna()
    if len(table) < 2:
        return None
    margin = table["reward_chosen"] - table["reward_rejected"]
    holds = (table["reward_chosen"] < -DISPLACEMENT_TOL) & (margin > margin.iloc[0] + DISPLACEMENT_TOL)
    holds.iloc[0] = False
    # the first eval from which the pattern holds at every later eval
    tail_true = holds[::-1].cummin()[::-1]
    if not tail_true.iloc[-1]:
        return None
    start = int(table["step"][tail_true].iloc[0])
    last = table.iloc[-1]
    return Alert(
        code="likelihood_displacement",
        title="Likelihood displacement",
        severity="warning",
        step=start,
        evidence=(
            f"held-out chosen reward {last['reward_chosen']:+.3f} at step {int(last['step'])} (below "
            f"-{DISPLACEMENT_TOL:g}) while the margin grew from {margin.iloc[0]:+.3f} to {margin.iloc[-1]:+.3f}"
        ),
        meaning=(
            "The chosen responses are becoming less likely than under the reference even though the margin "
            "widens: the policy wins by pushing the rejected responses down faster, and probability mass "
            "moves to responses that are neither (likelihood displacement, Razin et al., ICLR 2025)."
        ),
        advice=(
            "Try a larger β or a smaller learning rate, fewer steps, a divergence regulariser (alpha > 0), "
            "or drop pairs whose chosen and rejected are nearly the same (high PND/TAT in the diagnosis)."
        ),
    )


def _window_start(mask: pd.Series, steps: pd.Series, window: int) -> int | None:
    """Step where `window` consecutive True values first begin."""
    run = 0
    for i, value in enumerate(mask.to_numpy()):
        run = run + 1 if value else 0
        if run == window:
            return int(steps.iloc[i - window + 1])
    return None


def memorising(metrics: pd.DataFrame | None, eval_table: pd.DataFrame | None) -> Alert | None:
    loss = _numeric(metrics, "loss_pref")
    acc = _numeric(metrics, "reward_acc")
    table = loss.merge(acc, on="step", how="outer").sort_values("step").reset_index(drop=True)
    if len(table) < MEMO_WINDOW:
        return None
    fitted = (table["loss_pref"] < MEMO_LOSS) | (table["reward_acc"] >= 1.0)
    start = _window_start(fitted, table["step"], MEMO_WINDOW)
    if start is None:
        return None
    ev_loss, ev_acc = _numeric(eval_table, "loss_pref").dropna(), _numeric(eval_table, "reward_acc").dropna()
    if ev_loss.empty or ev_loss["step"].iloc[-1] <= start:
        return None  # no held-out evaluation after the fit began: nothing to compare yet
    base_loss = ev_loss[ev_loss["step"] <= start]
    base_loss = base_loss.iloc[-1] if len(base_loss) else ev_loss.iloc[0]
    loss_gain = float(base_loss["loss_pref"] - ev_loss["loss_pref"].iloc[-1])
    acc_gain = 0.0
    if len(ev_acc):
        base_acc = ev_acc[ev_acc["step"] <= start]
        base_acc = base_acc.iloc[-1] if len(base_acc) else ev_acc.iloc[0]
        acc_gain = float(ev_acc["reward_acc"].iloc[-1] - base_acc["reward_acc"])
    if loss_gain >= FLAT_TOL or acc_gain >= FLAT_TOL:
        return None
    window = table[table["step"] >= start].head(MEMO_WINDOW)
    return Alert(
        code="memorising",
        title="Memorising the training pairs",
        severity="warning",
        step=start,
        evidence=(
            f"training preference loss {window['loss_pref'].min():.3f}–{window['loss_pref'].max():.3f} and "
            f"accuracy up to {window['reward_acc'].max():.2f} over {MEMO_WINDOW} steps from step {start}; "
            f"held-out loss changed by {-loss_gain:+.3f} and held-out accuracy by {acc_gain:+.3f} since"
        ),
        meaning=(
            "The training pairs are fit almost perfectly (loss near 0 or every pair ranked right) while the "
            "held-out pairs do not improve: the model is learning these pairs, not the preference."
        ),
        advice=(
            "Try fewer steps or epochs, a larger β or label_smoothing (conservative DPO), a lower learning "
            "rate, a divergence regulariser (alpha > 0), or more pairs."
        ),
    )


def non_finite(metrics: pd.DataFrame | None, summary: dict | None) -> Alert | None:
    error = str((summary or {}).get("error") or "")
    tripped = "not finite" in error or "diverged" in error
    step = None
    match = re.search(r"at step (\d+)", error)
    if match:
        step = int(match.group(1))
    bad_steps = []
    if metrics is not None and not metrics.empty and "step" in metrics:
        for column in _GUARDED:
            if column in metrics:
                values = pd.to_numeric(metrics[column], errors="coerce").astype(float)
                bad = ~np.isfinite(values.to_numpy())
                bad_steps += [int(s) for s in pd.to_numeric(metrics["step"], errors="coerce")[bad].dropna()]
    if not tripped and not bad_steps:
        return None
    if step is None and bad_steps:
        step = min(bad_steps)
    evidence = error.split(". ")[0] if tripped else f"non-finite values logged at step(s) {sorted(set(bad_steps))[:5]}"
    return Alert(
        code="non_finite",
        title="NaN/inf guard tripped",
        severity="error",
        step=step,
        evidence=evidence,
        meaning=(
            "A loss, margin or gradient became NaN or infinite: the numbers after this point are meaningless "
            "and the trainer stopped the run instead of saving a broken model."
        ),
        advice=(
            "Lower the learning rate, train in float32 (model.dtype), use a smaller β or a smaller divergence "
            "alpha, and resume or restart from the last checkpoint."
        ),
    )


def collapsed_weights(metrics: pd.DataFrame | None) -> dict[str, tuple[int, float]]:
    """Mixture weights that fell below COLLAPSE_THRESHOLD at some step: label -> (first such step, last value)."""
    first_steps: dict[str, tuple[int, float]] = {}
    for column, label in MIXTURE_WEIGHT_LABELS.items():
        table = _numeric(metrics, column).dropna()
        below = table[table[column] < COLLAPSE_THRESHOLD]
        if len(below):
            first_steps[label] = (int(below["step"].iloc[0]), float(table[column].iloc[-1]))
    return first_steps


def alpha_outside_range(alpha: pd.Series) -> pd.Series:
    """True where a layer's WeightWatcher alpha lies outside ALPHA_RANGE (NaN counts as inside)."""
    lo, hi = ALPHA_RANGE
    values = pd.to_numeric(alpha, errors="coerce")
    return (values < lo) | (values > hi)


def kernel_weight_collapse(metrics: pd.DataFrame | None) -> Alert | None:
    first_steps = collapsed_weights(metrics)
    if not first_steps:
        return None
    start = min(step for step, _ in first_steps.values())
    listing = ", ".join(
        f"{label} (below from step {step}, now {last:.3f})" for label, (step, last) in first_steps.items()
    )
    return Alert(
        code="kernel_weight_collapse",
        title="Kernel weight collapsed",
        severity="warning",
        step=start,
        evidence=f"below {COLLAPSE_THRESHOLD:g}: {listing}",
        meaning=(
            "A mixture weight fell below 0.05: that kernel (or group) no longer shapes the margin and the "
            "mixture behaves like the kernels that remain."
        ),
        advice=(
            "If one kernel is meant to win, train with it alone; otherwise raise the entropy term "
            "(method.kernel.entropy_eta) or lower the weights' learning rate (method.kernel.weight_lr)."
        ),
    )


def beta_out_of_range(metrics: pd.DataFrame | None, config: dict | None) -> Alert | None:
    beta = _numeric(metrics, "beta").dropna()
    epsilon = float(config_value(config, "method", "loss", "epsilon_dpo") or 0.0)
    if beta.empty or (epsilon <= 0 and beta["beta"].nunique() <= 1):
        return None
    lo, hi = BETA_SANE_RANGE
    start = config_value(config, "method", "loss", "beta")
    start = float(start) if start is not None else float(beta["beta"].iloc[0])
    if not lo <= start <= hi:
        return None  # configured outside the range: a setting, visible in the config, not something the run did
    outside = beta[(beta["beta"] < lo) | (beta["beta"] > hi)]
    if outside.empty:
        return None
    first = outside.iloc[0]
    return Alert(
        code="beta_out_of_range",
        title="ε-DPO β outside its sane range",
        severity="warning",
        step=int(first["step"]),
        evidence=(
            f"β = {first['beta']:.4g} at step {int(first['step'])} (range {lo:g}–{hi:g}; now "
            f"{beta['beta'].iloc[-1]:.4g}, started at {beta['beta'].iloc[0]:.4g})"
        ),
        meaning=(
            "ε-DPO adapts β from the data; below ~0.01 the pull towards the reference vanishes and the policy "
            "can drift freely, above ~1 the updates become timid and the run stalls."
        ),
        advice="Use a smaller epsilon_dpo (e.g. halve it), start from a different β, or fix β (epsilon_dpo = 0).",
    )


def _alpha_by_layer(table: pd.DataFrame) -> pd.Series:
    """alpha per layer, keyed by longname when the table has it (else by WeightWatcher's layer_id)."""
    key = "longname" if "longname" in table else "layer_id"
    alpha = pd.to_numeric(table["alpha"], errors="coerce")
    return pd.Series(alpha.to_numpy(), index=table[key].astype(str)).groupby(level=0).first()


def htsr_left_range(htsr_before: pd.DataFrame | None, htsr_after: pd.DataFrame | None) -> pd.DataFrame:
    """Layers whose alpha lay inside ALPHA_RANGE before training and outside it after: what training
    did, unlike the layers the base model already had outside (columns layer, alpha_before, alpha_after)."""
    columns = ["layer", "alpha_before", "alpha_after"]
    if htsr_before is None or htsr_after is None or "alpha" not in htsr_before or "alpha" not in htsr_after:
        return pd.DataFrame(columns=columns)
    both = pd.concat([_alpha_by_layer(htsr_before), _alpha_by_layer(htsr_after)], axis=1, join="inner").dropna()
    both.columns = columns[1:]
    left = ~alpha_outside_range(both["alpha_before"]) & alpha_outside_range(both["alpha_after"])
    return both[left].rename_axis("layer").reset_index()


def htsr_base_out_of_range(htsr_before: pd.DataFrame | None) -> pd.DataFrame:
    """The base model's own layers outside ALPHA_RANGE (before training): information, not an alert."""
    if htsr_before is None or "alpha" not in htsr_before:
        return pd.DataFrame(columns=["layer", "alpha"])
    alpha = _alpha_by_layer(htsr_before).dropna()
    return alpha[alpha_outside_range(alpha)].rename("alpha").rename_axis("layer").reset_index()


def update_overfit(htsr_update: pd.DataFrame | None) -> pd.DataFrame:
    """Layers whose update ΔW has a fitted alpha below ALPHA_RANGE[0] (alpha is empty where not fitted)."""
    if htsr_update is None or "alpha" not in htsr_update:
        return pd.DataFrame(columns=["longname", "alpha"])
    alpha = pd.to_numeric(htsr_update["alpha"], errors="coerce")
    return htsr_update[alpha < ALPHA_RANGE[0]]


def _some(names, limit: int = 3) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def htsr_alpha(
    htsr_before: pd.DataFrame | None,
    htsr_after: pd.DataFrame | None,
    final_step: int | None = None,
    htsr_update: pd.DataFrame | None = None,
) -> Alert | None:
    """Fires only for what training did: layers that left ALPHA_RANGE (inside before, outside after),
    or an update whose fitted alpha says over-fit. The base model's own out-of-range layers never fire."""
    left = htsr_left_range(htsr_before, htsr_after)
    overfit = update_overfit(htsr_update)
    if left.empty and overfit.empty:
        return None
    lo, hi = ALPHA_RANGE
    parts = []
    if len(left):
        below = int((left["alpha_after"] < lo).sum())
        parts.append(
            f"{len(left)} of {len(_alpha_by_layer(htsr_after))} layers left {lo:g}–{hi:g} during training "
            f"({below} now below {lo:g}, {len(left) - below} above {hi:g}: {_some(left['layer'])})"
        )
    if len(overfit):
        parts.append(f"{len(overfit)} layers' update ΔW has a fitted alpha below {lo:g} ({_some(overfit['longname'])})")
    return Alert(
        code="htsr_alpha",
        title=f"HT-SR: training moved layers out of {lo:g}–{hi:g}",
        severity="info",
        heuristic=True,
        step=final_step,
        evidence="; ".join(parts),
        meaning=(
            "A heuristic from WeightWatcher: in well-trained large models most layers have alpha between 2 and 6; "
            "below 2 hints at over-fit layers, above 6 at under-trained ones. These layers were inside the range "
            "before training (or the update itself has a heavy, over-fit tail), so the change is this run's. "
            "Layers the base model already had outside the range are not counted."
        ),
        advice=(
            "Look at the named layers' update on the HT-SR tab; if they matter, try fewer steps or a lower "
            "learning rate."
        ),
    )


def run_health(
    metrics: pd.DataFrame | None,
    eval_table: pd.DataFrame | None = None,
    *,
    config: dict | None = None,
    summary: dict | None = None,
    htsr_before: pd.DataFrame | None = None,
    htsr_after: pd.DataFrame | None = None,
    htsr_update: pd.DataFrame | None = None,
) -> list[Alert]:
    """Every alert that fires, errors first, then by the step where it starts."""
    final_step = None
    if metrics is not None and "step" in metrics:
        steps = pd.to_numeric(metrics["step"], errors="coerce").dropna()
        final_step = int(steps.max()) if len(steps) else None
    found = [
        non_finite(metrics, summary),
        likelihood_displacement(eval_table),
        memorising(metrics, eval_table),
        kernel_weight_collapse(metrics),
        beta_out_of_range(metrics, config),
        htsr_alpha(htsr_before, htsr_after, final_step, htsr_update),
    ]
    order = {"error": 0, "warning": 1, "info": 2}
    alerts = [a for a in found if a is not None]
    return sorted(alerts, key=lambda a: (order.get(a.severity, 3), math.inf if a.step is None else a.step))


def health_of(run) -> list[Alert]:
    """Alerts of a `RunData` (dpo_engine.report.rundata)."""
    return run_health(
        run.metrics,
        run.eval,
        config=run.config,
        summary=run.summary,
        htsr_before=run.htsr_before,
        htsr_after=run.htsr_after,
        htsr_update=run.htsr_update,
    )


def alerts_table(alerts: list[Alert]) -> pd.DataFrame:
    """One row per alert (for tables in the Compare page and the report)."""
    return pd.DataFrame(
        [
            {
                "alert": a.title + (" (heuristic)" if a.heuristic else ""),
                "severity": a.severity,
                "from step": "–" if a.step is None else str(a.step),
                "evidence": a.evidence,
                "what to try": a.advice,
            }
            for a in alerts
        ],
        columns=["alert", "severity", "from step", "evidence", "what to try"],
    )
