"""The report's opening in plain words: what was trained on what, what came out on held-out pairs and
how sure that is, whether runs differ, whether the diagnosis held, and the alerts that matter.

A reader who stops after this block must not come away with more than the numbers support, so every
verdict reads the 95 % interval, never the point estimate alone: an accuracy is "above chance" only
when its interval lies above 0.5, a difference between runs is a difference only when its paired
interval excludes 0. The wording rules live here and nowhere else; the HTML report and the run page
show the same sentences. Intervals: reward accuracy and paired differences by the bootstrap over
held-out pairs (dpo_engine.train.sweep), the linear probe by Wilson (dpo_engine.analysis.probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dpo_engine.analysis.health import health_of
from dpo_engine.report.rundata import RunData
from dpo_engine.train.sweep import accuracy_with_interval, final_margins, paired_accuracy_difference
from dpo_engine.viz.runs import probe_text, separation_table

LOG2 = math.log(2)
LOSS_TOLERANCE = 0.005  # a held-out preference loss this close to log 2 reads "about log 2"
CHANCE = 0.5
SERIOUS = ("error", "warning")  # alert severities the opening names; "info" hints stay in the health section


@dataclass
class RunFacts:
    """What the opening says about one run, read once from its directory."""

    run_id: str
    label: str
    model: str | None
    dataset: str | None
    status: str | None
    steps_done: int | None
    steps_total: int | None
    n_train_pairs: int | None
    error: str | None = None
    eval_step: int | None = None
    accuracy: dict[str, float] | None = None  # reward_acc, ci_low, ci_high, n_pairs (bootstrap)
    margins: pd.Series | None = None  # per held-out pair, last evaluation
    loss_pref: float | None = None
    probe_first: tuple[int, float, float, float] | None = None  # step, accuracy, low, high
    probe_last: tuple[int, float, float, float] | None = None
    kernel: str | None = None
    divergence: str | None = None
    alerts: list[str] = field(default_factory=list)


@dataclass
class PlainSummary:
    """Sentences in reading order, grouped under short headings."""

    trained: list[str]
    outcomes: list[str]
    differences: list[str]
    diagnosis: list[str]
    alerts: list[str]

    def sections(self) -> list[tuple[str, list[str]]]:
        return [
            (title, lines)
            for title, lines in (
                ("What was trained", self.trained),
                ("Held-out outcome", self.outcomes),
                ("Difference between runs", self.differences),
                ("Did the diagnosis hold?", self.diagnosis),
                ("Alerts that matter", self.alerts),
            )
            if lines
        ]

    def markdown(self) -> str:
        return "\n\n".join(
            f"**{title}{'' if title.endswith('?') else ':'}** " + " ".join(lines) for title, lines in self.sections()
        )


# ---------------------------------------------------------------- sentence rules


def _f(value: float) -> str:
    return f"{value:.2f}"


def chance_verdict(low: float, high: float) -> str:
    """Where a 95 % interval of an accuracy lies relative to chance (0.5)."""
    if low > CHANCE:
        return "above chance"
    if high < CHANCE:
        return "below chance: the rejected answer wins more often than the chosen one"
    return "not distinguishable from chance"


def accuracy_sentence(facts: RunFacts) -> str:
    """The run's held-out reward accuracy with its interval and verdict, or why there is none."""
    name = facts.label
    if facts.accuracy is None:
        return f"{name}: no held-out evaluation yet."
    if facts.eval_step == 0:
        return (
            f"{name}: evaluated only before the first update (policy = reference, every margin is 0), "
            "so there is no held-out result yet."
        )
    acc = facts.accuracy
    return (
        f"{name}: held-out reward accuracy {_f(acc['reward_acc'])} ({_f(acc['ci_low'])}–{_f(acc['ci_high'])}) "
        f"on {acc['n_pairs']} pairs at step {facts.eval_step}: {chance_verdict(acc['ci_low'], acc['ci_high'])}."
    )


def loss_sentence(loss: float | None) -> str:
    """Held-out preference loss against log 2, its value while the policy equals the reference."""
    if loss is None or not math.isfinite(loss):
        return ""
    if abs(loss - LOG2) <= LOSS_TOLERANCE:
        where = "about log 2 = 0.693, the value before training"
    elif loss < LOG2:
        where = "below log 2 = 0.693, the value before training"
    else:
        where = "above log 2 = 0.693, the value before training: held-out preferences got worse"
    return f"Held-out preference loss {loss:.3f}, {where}."


def probe_sentence(first: tuple | None, last: tuple | None) -> str:
    """The linear probe at the first and last snapshot: how separable chosen and rejected representations are."""
    if last is None:
        return ""
    step, acc, low, high = last
    text = (
        f"A linear probe tells chosen from rejected representations apart in {probe_text(acc, low, high)} "
        f"of held-out cases at step {step} ({chance_verdict(low, high)})"
    )
    if first is not None and first[0] != step:
        text += f", against {probe_text(*first[1:])} at step {first[0]}"
    return text + "."


def difference_sentence(a: str, b: str, diff: dict[str, float]) -> str:
    """Accuracy of run a minus run b on the same held-out pairs, with its paired interval."""
    if not diff["n_pairs"]:
        return f"{a} and {b} share no held-out pairs, so they cannot be compared pair by pair."
    d, low, high = diff["difference"], diff["ci_low"], diff["ci_high"]
    span = f"{d:+.2f} ({low:+.2f} to {high:+.2f}) on the same {diff['n_pairs']} held-out pairs"
    if low > 0:
        return f"{a} is ahead of {b}: accuracy difference {span}."
    if high < 0:
        return f"{a} is behind {b}: accuracy difference {span}."
    return f"No difference detected between {a} and {b}: {span}; the interval includes 0."


def diagnosis_sentences(diagnosis: dict[str, Any] | None, facts: list[RunFacts]) -> list[str]:
    """Whether the run that used the recommended kernel and divergence came out ahead of the others."""
    rec = (diagnosis or {}).get("recommendation") or {}
    if not rec.get("kernel") or not rec.get("divergence"):
        return []
    pair = f"{rec['kernel']} + {rec['divergence']}"
    chosen = [f for f in facts if (f.kernel, f.divergence) == (rec["kernel"], rec["divergence"])]
    if not chosen:
        return [f"The diagnosis recommended {pair}; none of these runs used it, so this report cannot tell."]
    best = chosen[0]
    others = [f for f in facts if f not in chosen and f.margins is not None and f.eval_step]
    if best.margins is None or not best.eval_step:
        return [f"The diagnosis recommended {pair} ({best.label}), which has no held-out result yet: open."]
    if not others:
        return [
            f"The diagnosis recommended {pair} ({best.label}). No other run here to compare it with on the "
            "same pairs, so whether the recommendation held is open (a sweep from the Diagnose page checks it)."
        ]
    diffs = [paired_accuracy_difference(best.margins, o.margins) for o in others]
    if all(d["n_pairs"] and d["ci_low"] > 0 for d in diffs):
        verdict = "it held: ahead of every other run (every 95 % interval of the difference above 0)"
    elif any(d["n_pairs"] and d["ci_high"] < 0 for d in diffs):
        verdict = "it did not hold: behind at least one other run (a 95 % interval below 0)"
    else:
        verdict = "not settled: the 95 % intervals of the differences include 0 (too few steps or pairs)"
    return [f"The diagnosis recommended {pair} ({best.label}); {verdict}."]


def trained_sentence(facts: RunFacts) -> str:
    """Model, dataset, method, pairs and steps of one run, and how it ended when it did not succeed."""
    plain = {None, "none"}
    if facts.kernel in plain and facts.divergence in plain:
        method = "plain DPO"
    else:
        method = f"{facts.kernel} kernel" if facts.kernel not in plain else "no kernel"
        method += f", {facts.divergence} divergence" if facts.divergence not in plain else ", no divergence"
    pairs = f", {facts.n_train_pairs} training pairs" if facts.n_train_pairs else ""
    steps = ""
    if facts.steps_done is not None:
        steps = f", {facts.steps_done}" + (f" of {facts.steps_total}" if facts.steps_total else "") + " steps"
    model, dataset = facts.model or "unknown model", facts.dataset or "unknown dataset"
    text = f"{facts.label}: {model} on {dataset} ({method}{pairs}{steps})"
    if facts.status and facts.status != "succeeded":
        text += f"; {facts.status}" + (f": {facts.error}" if facts.error else "")
    return text + "."


# ---------------------------------------------------------------- facts and the whole summary


def _probe_point(row: pd.Series) -> tuple[int, float, float, float]:
    return int(row["step"]), float(row["probe_acc"]), float(row["probe_acc_lo"]), float(row["probe_acc_hi"])


def run_facts(run: RunData) -> RunFacts:
    summary, config = run.summary or {}, run.config or {}
    facts = RunFacts(
        run_id=run.run_id,
        label=run.run_id,
        model=(config.get("model") or {}).get("name"),
        dataset=(config.get("data") or {}).get("dataset"),
        status=summary.get("status"),
        steps_done=summary.get("steps_completed")
        if summary
        else (int(run.metrics["step"].max()) if "step" in run.metrics else None),
        steps_total=summary.get("total_steps") or run.max_steps,
        n_train_pairs=summary.get("n_train_pairs"),
        error=summary.get("error"),
        kernel=run.kernel_name,
        divergence=run.divergence_name,
    )
    found = final_margins(run.run_dir) if run.run_dir.is_dir() else None
    if found is not None:
        facts.eval_step, facts.margins = found
        facts.accuracy = accuracy_with_interval(facts.margins)
        if "step" in run.eval and "loss_pref" in run.eval:
            at = run.eval[pd.to_numeric(run.eval["step"], errors="coerce") == facts.eval_step]["loss_pref"]
            values = pd.to_numeric(at, errors="coerce").dropna()
            facts.loss_pref = float(values.iloc[-1]) if len(values) else None
    probes = separation_table(run).dropna(subset=["probe_acc"])
    if not probes.empty:
        facts.probe_first, facts.probe_last = _probe_point(probes.iloc[0]), _probe_point(probes.iloc[-1])
    facts.alerts = [f"{a.headline}: {a.evidence.rstrip('.')}" for a in health_of(run) if a.severity in SERIOUS]
    return facts


def plain_summary(runs: list[RunData], diagnosis: dict[str, Any] | None = None) -> PlainSummary:
    """The opening of the report (and of a run page) for these runs; the first run is the baseline of the
    differences."""
    facts = [run_facts(r) for r in runs]
    outcomes = []
    for f in facts:
        outcomes.append(" ".join(s for s in (accuracy_sentence(f), loss_sentence(f.loss_pref)) if s))
        probe = probe_sentence(f.probe_first, f.probe_last)
        if probe:
            outcomes.append(probe)
    differences = []
    base = facts[0] if facts else None
    for other in facts[1:]:
        if base.margins is None or other.margins is None or not base.eval_step or not other.eval_step:
            differences.append(f"{other.label} and {base.label}: not both evaluated after training, no comparison.")
        else:
            differences.append(
                difference_sentence(other.label, base.label, paired_accuracy_difference(other.margins, base.margins))
            )
    alerts = [f"{f.label}: {a}." for f in facts for a in f.alerts] or [
        "No run-health errors or warnings (details in the Run health section)."
    ]
    return PlainSummary(
        trained=[trained_sentence(f) for f in facts],
        outcomes=outcomes,
        differences=differences,
        diagnosis=diagnosis_sentences(diagnosis, facts),
        alerts=alerts,
    )
