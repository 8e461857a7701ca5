"""Label-noise candidates: per-pair scores (higher = more likely mislabeled), their combination, and how
well each finds known flipped labels.

Each signal says in its own way that the data prefers the rejected response:

- ``embedding``: the diagnosis's embedding margin, negated (the rejected response sits nearer the prompt);
- ``logprob``: the reference model's length-normalised log-probability gap (`logprob_gap`);
- ``combined``: the rank average of the signals above, so a pair several signals flag ranks first;
- ``policy``: after training, the trained policy's implicit reward margin on held-out pairs, negated.

Whether a signal finds mislabeled pairs is measured, not assumed: ``scripts/measure_label_noise.py``
flips a seeded share of a labelled sample and writes each signal's top-k precision and recall into
``label_noise_measured.json`` next to this module. The audit shows a ranking only from a signal whose
measured precision beats random by the margin in `thresholds` (METHOD.md 1.6), and the page and the
report quote the measurement from that file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel
from scipy.stats import rankdata

from dpo_engine import rundir
from dpo_engine.analysis.audit import thresholds as limits
from dpo_engine.analysis.audit.length import Interval, wilson_interval

MEASURED_JSON = Path(__file__).with_name("label_noise_measured.json")
POLICY_MEASURED_JSON = Path(__file__).with_name("label_noise_policy_measured.json")  # the after-training signal
SIGNALS: dict[str, str] = {
    "embedding": "embedding margin (rejected nearer the prompt than chosen)",
    "logprob": "reference model prefers rejected (length-normalised log-prob gap)",
    "combined": "rank average of the embedding and log-prob signals",
    "policy": "trained policy's reward margin on held-out pairs (negated)",
}


def embedding_signal(margins: np.ndarray) -> np.ndarray:
    """-(dn~ - dp~): positive when the rejected response is nearer the prompt than the chosen one."""
    return -np.asarray(margins, dtype=float)


def policy_signal(margins: pd.Series, pair_ids: pd.Series | np.ndarray) -> np.ndarray:
    """The trained policy's reward margin per held-out pair (``rundir.read_eval_margins(run)[step]``,
    indexed by pair id), negated and aligned to ``pair_ids``; NaN for pairs the run did not hold out."""
    return -pd.Series(margins, dtype=float).reindex([str(p) for p in pair_ids]).to_numpy(dtype=float)


def flip_labels(n: int, share: float, seed: int) -> np.ndarray:
    """A seeded random `share` of n rows, as a boolean mask: the rows whose labels a measurement swaps."""
    flip = np.zeros(n, dtype=bool)
    flip[np.random.default_rng(seed).choice(n, size=round(share * n), replace=False)] = True
    return flip


def policy_flip_quality(margins: np.ndarray, share: float, seed: int) -> TopKQuality:
    """How well the policy signal finds held-out pairs whose labels were swapped: a swapped pair's
    reward margin is exactly the negated margin (rho(x, y-, y+) = -rho(x, y+, y-)), so the trained
    run's held-out margins measure it without another pass."""
    margins = np.asarray(margins, dtype=float)
    flip = flip_labels(len(margins), share, seed)
    return top_k_quality(-np.where(flip, -margins, margins), flip)


POLICY_CANDIDATES_EXPLANATION = (
    "Held-out pairs where the trained policy's reward margin prefers the rejected response, the strongest "
    "disagreement first. Swapped or doubtful labels sit at the top of such a list; so do pairs the policy simply "
    "gets wrong."
)


def policy_candidates(run_dir: Path, k: int = limits.LABEL_NOISE_FLAGGED) -> tuple[int, pd.DataFrame] | None:
    """(step, pairs): the held-out pairs the run's policy disagrees with most at its last evaluation
    after training began (the k lowest reward margins, below zero only; rank, pair_id, margin). None when the
    run has not evaluated since step 0 (there the policy is the reference and every margin is 0).
    Pairs whose margin is not finite are left out (`health` reports a run that diverged)."""
    by_step = {step: m for step, m in rundir.read_eval_margins(run_dir).items() if step > 0}
    if not by_step:
        return None
    step, margins = max(by_step.items())
    score = policy_signal(margins, margins.index)
    picked = [i for i in top_k(score, k) if score[i] > 0]
    return step, pd.DataFrame(
        {
            "rank": np.arange(1, len(picked) + 1),
            "pair_id": margins.index[picked].astype(str),
            "margin": margins.to_numpy()[picked],
        }
    )


def rank_average(signals: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean over signals of each pair's rank share in (0, 1] (1 = most suspicious); a signal missing
    for a pair (NaN) is left out of that pair's mean, and a pair no signal scores gets NaN."""
    columns = []
    for values in signals.values():
        values = np.asarray(values, dtype=float)
        share = np.full(values.shape, np.nan)
        known = np.isfinite(values)
        if known.any():
            share[known] = rankdata(values[known], method="average") / known.sum()
        columns.append(share)
    if not columns:
        raise ValueError("rank_average needs at least one signal")
    stacked = np.vstack(columns)
    counts = np.isfinite(stacked).sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.nansum(stacked, 0) / np.maximum(counts, 1), np.nan)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest finite scores, highest first (ties broken by row)."""
    scores = np.asarray(scores, dtype=float)
    rows = np.flatnonzero(np.isfinite(scores))
    order = rows[np.lexsort((rows, -scores[rows]))]
    return order[:k]


class TopKQuality(BaseModel):
    """How many of the k top-ranked pairs are truly mislabeled (precision) and how many of the
    mislabeled pairs the top k catch (recall), with Wilson intervals, against random ranking."""

    k: int
    n_pairs: int
    n_mislabeled: int
    hits: int
    precision: float
    precision_interval: Interval
    recall: float
    recall_interval: Interval
    random_precision: float
    beats_random: bool  # precision's lower bound above random x LABEL_NOISE_LIFT


def top_k_quality(scores: np.ndarray, mislabeled: np.ndarray, k: int | None = None) -> TopKQuality:
    """Score a ranking against known mislabeled rows; k defaults to the number mislabeled."""
    mislabeled = np.asarray(mislabeled, dtype=bool)
    n_bad = int(mislabeled.sum())
    k = n_bad if k is None else int(k)
    if k < 1 or n_bad < 1:
        raise ValueError("top_k_quality needs k >= 1 and at least one mislabeled row")
    picked = top_k(scores, k)
    hits = int(mislabeled[picked].sum())
    random = n_bad / mislabeled.size
    precision_ci = wilson_interval(hits, k)
    return TopKQuality(
        k=k,
        n_pairs=int(mislabeled.size),
        n_mislabeled=n_bad,
        hits=hits,
        precision=hits / k,
        precision_interval=precision_ci,
        recall=hits / n_bad,
        recall_interval=wilson_interval(hits, n_bad),
        random_precision=random,
        beats_random=precision_ci.low > random * limits.LABEL_NOISE_LIFT,
    )


def load_measured(path: Path | None = None) -> dict[str, Any] | None:
    """The last measurement (``scripts/measure_label_noise.py``), or None when there is none."""
    path = path or MEASURED_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def shown_signal(measured: dict[str, Any] | None, available: set[str]) -> str | None:
    """The signal the audit ranks by: of the available ones that beat random in the measurement, the one
    with the highest lower precision bound; None when none did (or nothing was measured)."""
    if not measured:
        return None
    kept = [
        (q["precision_interval"]["low"], name)
        for name, q in measured.get("signals", {}).items()
        if name in available and q.get("beats_random")
    ]
    return max(kept)[1] if kept else None


class LabelNoise(BaseModel):
    """``diagnosis.json["audit"]["label_noise"]``: what was scored, which ranking is shown and why."""

    n_pairs: int
    n_scored: dict[str, int]  # pairs each signal scored (the log-prob signal runs on a sample of large sets)
    model: str | None  # the reference model of the log-prob signal
    shown: str | None  # the signal the flagged list is ranked by; None: no signal beat random
    n_flagged: int
    measured: dict[str, Any] | None  # the measurement this choice rests on (label_noise_measured.json)


def label_noise(
    signals: Mapping[str, np.ndarray], *, model: str | None = None, n_flagged: int = limits.LABEL_NOISE_FLAGGED
) -> tuple[LabelNoise, pd.DataFrame]:
    """Combine the signals, choose the measured-good ranking and list its top pairs as audit flags.

    ``signals`` maps names of `SIGNALS` to per-pair scores (NaN where a signal did not score a pair).
    The flag rows carry every signal's value so a reader sees why a pair is listed."""
    signals = {name: np.asarray(values, dtype=float) for name, values in signals.items()}
    n = len(next(iter(signals.values()))) if signals else 0
    base = {name: v for name, v in signals.items() if name in ("embedding", "logprob")}
    if len(base) > 1:
        signals["combined"] = rank_average(base)
    measured = load_measured()
    comparable = set(signals)
    if measured and model != measured.get("model"):  # the log-prob measurement holds for its model only
        comparable -= {"logprob", "combined"}
    shown = shown_signal(measured, comparable)
    flags = pd.DataFrame(columns=["row", "finding", "detail", "related_row", "similarity"])
    picked = np.zeros(0, dtype=np.int64)
    if shown is not None:
        picked = top_k(signals[shown], n_flagged)
        flags = pd.DataFrame(
            {
                "row": picked,
                "finding": "label_noise",
                "detail": [f"rank {i + 1} by {shown}" for i in range(len(picked))],
                "related_row": pd.array([None] * len(picked), dtype="Int64"),
                "similarity": np.full(len(picked), np.nan),
                **{f"signal_{name}": values[picked] for name, values in signals.items()},
            }
        )
    summary = LabelNoise(
        n_pairs=n,
        n_scored={name: int(np.isfinite(v).sum()) for name, v in signals.items()},
        model=model,
        shown=shown,
        n_flagged=len(picked),
        measured=measured,
    )
    return summary, flags


def quality_table(measured: dict[str, Any] | None) -> pd.DataFrame:
    """The measurement as rows (signal, precision and recall with intervals, random, kept), for the page,
    the report and the docs."""
    rows = []
    for name, q in ((measured or {}).get("signals") or {}).items():
        p, r = q["precision_interval"], q["recall_interval"]
        rows.append(
            {
                "signal": name,
                "what it measures": SIGNALS.get(name, name),
                "precision@k": f"{q['precision']:.2f} [{p['low']:.2f}, {p['high']:.2f}]",
                "recall@k": f"{q['recall']:.2f} [{r['low']:.2f}, {r['high']:.2f}]",
                "random": f"{q['random_precision']:.2f}",
                "shown to users": "yes" if q["beats_random"] else "no",
            }
        )
    return pd.DataFrame(rows)


def policy_reliability(measured: dict[str, Any] | None = None) -> str | None:
    """One sentence on how well the policy signal found swapped labels in the measurement
    (`POLICY_MEASURED_JSON`), for the Runs page and the report; None when it was not measured."""
    runs = ((measured if measured is not None else load_measured(POLICY_MEASURED_JSON)) or {}).get("runs") or []
    if not runs:
        return None
    parts = []
    for q in runs:
        p, spread = q["precision_interval"], q["precision_over_seeds"]
        parts.append(
            f"{q['hits']} of the top {q['k']} ({q['precision']:.0%}, 95 % interval {p['low']:.0%}-{p['high']:.0%}; "
            f"{spread['mean']:.0%} on average over {spread['seeds']} draws of the swapped pairs, the interval's low "
            f"end above {limits.LABEL_NOISE_LIFT:g} x random in {spread.get('clearing_the_bar', '?')} of them) "
            f"for {q['run'].rsplit('/', 1)[-1]}"
        )
    first = runs[0]
    return (
        f"How reliable: with the labels of a random {first['n_mislabeled'] / first['n_pairs']:.0%} of the held-out "
        f"pairs swapped on purpose, this list caught " + "; ".join(parts) + f", against "
        f"{first['random_precision']:.0%} for a random list (bundled example runs, {first['n_pairs']} held-out pairs). "
        "It is only as good as the policy: a pair listed here is one to read, not one to drop unread."
    )
