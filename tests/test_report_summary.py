"""The report's opening in plain words: each wording branch, on runs constructed with known results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpo_engine import rundir
from dpo_engine.report.rundata import load_run
from dpo_engine.report.summary import (
    accuracy_sentence,
    chance_verdict,
    difference_sentence,
    loss_sentence,
    plain_summary,
    probe_sentence,
    run_facts,
    trained_sentence,
)

N = 100


def _run(tmp_path, run_id, correct, *, step=10, loss=0.6, kernel="hmk", divergence="kl", ids=None, summary=None):
    """A run directory whose last evaluation got `correct` of N held-out pairs right (margin > 0)."""
    run_dir = tmp_path / run_id
    run_dir.mkdir()
    config = {
        "model": {"name": "tiny-random"},
        "data": {"dataset": "toy"},
        "method": {"kernel": {"name": kernel}, "divergence": {"name": divergence}},
        "optimisation": {"max_steps": step},
    }
    rundir.write_json(run_dir / rundir.CONFIG, config)
    rundir.write_json(
        run_dir / rundir.SUMMARY,
        {"status": "succeeded", "steps_completed": step, "total_steps": step, "n_train_pairs": 400} | (summary or {}),
    )
    margins = np.where(np.arange(N) < correct, 1.0, -1.0) if step else np.zeros(N)
    rundir.append_jsonl(run_dir / rundir.EVAL, {"step": step, "loss_pref": loss, "reward_acc": correct / N})
    rundir.append_eval_margins(run_dir, step, ids or [f"p{i}" for i in range(N)], margins)
    return load_run(run_dir, run_id)


def test_chance_verdict_reads_the_interval():
    assert chance_verdict(0.55, 0.70) == "above chance"
    assert chance_verdict(0.30, 0.45).startswith("below chance")
    assert chance_verdict(0.45, 0.58) == "not distinguishable from chance"


@pytest.mark.parametrize(
    ("correct", "verdict"),
    [(80, "above chance"), (52, "not distinguishable from chance"), (20, "below chance")],
)
def test_accuracy_sentence_states_value_interval_and_verdict(tmp_path, correct, verdict):
    facts = run_facts(_run(tmp_path, "r", correct))
    text = accuracy_sentence(facts)
    acc = facts.accuracy
    assert f"held-out reward accuracy {correct / N:.2f} ({acc['ci_low']:.2f}–{acc['ci_high']:.2f})" in text
    assert f"on {N} pairs at step 10: {verdict}" in text


def test_accuracy_sentence_without_a_result(tmp_path):
    facts = run_facts(_run(tmp_path, "tie", 0, step=0))
    assert "evaluated only before the first update" in accuracy_sentence(facts)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert accuracy_sentence(run_facts(load_run(empty))) == "empty: no held-out evaluation yet."


def test_loss_sentence_against_log_2():
    assert "about log 2" in loss_sentence(math.log(2) + 0.001)
    assert "below log 2" in loss_sentence(0.60)
    assert "above log 2" in loss_sentence(0.80) and "got worse" in loss_sentence(0.80)
    assert loss_sentence(None) == "" and loss_sentence(float("nan")) == ""


def test_probe_sentence():
    text = probe_sentence((0, 0.55, 0.45, 0.64), (20, 0.81, 0.73, 0.87))
    assert "0.81 (0.73–0.87) of held-out cases at step 20 (above chance)" in text
    assert "against 0.55 (0.45–0.64) at step 0" in text
    assert probe_sentence(None, None) == ""
    assert "against" not in probe_sentence(None, (0, 0.5, 0.4, 0.6))


def test_difference_sentence_branches():
    ahead = {"difference": 0.1, "ci_low": 0.02, "ci_high": 0.18, "n_pairs": 64}
    behind = {"difference": -0.1, "ci_low": -0.18, "ci_high": -0.02, "n_pairs": 64}
    unclear = {"difference": 0.03, "ci_low": -0.05, "ci_high": 0.11, "n_pairs": 64}
    assert difference_sentence("a", "b", ahead).startswith("a is ahead of b: accuracy difference +0.10 (+0.02 to")
    assert difference_sentence("a", "b", behind).startswith("a is behind b")
    assert difference_sentence("a", "b", unclear).startswith("No difference detected between a and b")
    assert "interval includes 0" in difference_sentence("a", "b", unclear)
    none = {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_pairs": 0}
    assert "share no held-out pairs" in difference_sentence("a", "b", none)


def test_summary_of_two_runs_compares_them_on_the_same_pairs(tmp_path):
    base = _run(tmp_path, "dpo", 50, kernel="none", divergence="none")
    better = _run(tmp_path, "hmk", 90)
    summary = plain_summary([base, better])
    assert summary.trained[0].startswith("dpo: tiny-random on toy (plain DPO, 400 training pairs, 10 of 10 steps)")
    assert summary.trained[1].startswith("hmk: tiny-random on toy (hmk kernel, kl divergence")
    assert summary.differences[0].startswith("hmk is ahead of dpo: accuracy difference +0.40")
    assert summary.differences[0].endswith(f"on the same {N} held-out pairs.")
    assert summary.diagnosis == []  # no diagnosis, no sentence about it
    assert summary.alerts == ["No run-health errors or warnings (details in the Run health section)."]
    other_split = _run(tmp_path, "other", 90, ids=[f"q{i}" for i in range(N)])
    assert "share no held-out pairs" in plain_summary([base, other_split]).differences[0]


@pytest.mark.parametrize(
    ("recommended", "others", "expected"),
    [
        (90, [50], "it held: ahead of every other run"),
        (20, [50], "it did not hold: behind at least one other run"),
        (52, [50], "not settled"),
    ],
)
def test_diagnosis_verdict(tmp_path, recommended, others, expected):
    runs = [_run(tmp_path, "rec", recommended, kernel="hmk", divergence="js")]
    runs += [_run(tmp_path, f"o{i}", c, kernel="rbf", divergence="kl") for i, c in enumerate(others)]
    lines = plain_summary(runs, {"recommendation": {"kernel": "hmk", "divergence": "js"}}).diagnosis
    assert lines == [lines[0]] and lines[0].startswith("The diagnosis recommended hmk + js (rec); ")
    assert expected in lines[0]


def test_diagnosis_not_used_or_alone(tmp_path):
    run = _run(tmp_path, "solo", 60, kernel="hmk", divergence="js")
    unused = plain_summary([run], {"recommendation": {"kernel": "rbf", "divergence": "kl"}}).diagnosis
    assert unused == ["The diagnosis recommended rbf + kl; none of these runs used it, so this report cannot tell."]
    alone = plain_summary([run], {"recommendation": {"kernel": "hmk", "divergence": "js"}}).diagnosis[0]
    assert "No other run here to compare it with" in alone and "open" in alone


def test_failed_run_states_how_it_ended_and_its_alert(tmp_path):
    error = "loss is not finite at step 3"
    run = _run(tmp_path, "broken", 50, summary={"status": "failed", "error": error, "steps_completed": 3})
    summary = plain_summary([run])
    assert trained_sentence(run_facts(run)).endswith(f"3 of 10 steps); failed: {error}.")
    assert summary.alerts == [f"broken: NaN/inf guard tripped from step 3: {error}."]
    assert "**Alerts that matter:** broken: NaN/inf guard tripped" in summary.markdown()
