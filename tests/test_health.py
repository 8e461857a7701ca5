"""Run-health alerts: metric files that show each pattern make the alert fire at the right step; a
healthy run raises none. Files are written with the run-directory writers and read back with
load_run, exactly as the pages and the report read them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dpo_engine import rundir
from dpo_engine.analysis import health
from dpo_engine.report.rundata import load_run

STEPS = 40


def _config(kernel="hmk", epsilon=0.0, beta=0.1):
    return {
        "data": {"dataset": "d"},
        "method": {
            "kernel": {"name": kernel},
            "divergence": {"name": "kl"},
            "loss": {"beta": beta, "epsilon_dpo": epsilon},
        },
        "optimisation": {"max_steps": STEPS},
    }


def _healthy_rows():
    """A run that learns: loss falls to ~0.45, accuracy ~0.7, chosen reward up, weights spread."""
    metrics, evals = [], []
    for step in range(1, STEPS + 1):
        t = step / STEPS
        metrics.append(
            {
                "step": step,
                "loss": 0.69 - 0.24 * t,
                "loss_pref": 0.69 - 0.24 * t,
                "reward_acc": 0.5 + 0.2 * t + 0.05 * np.sin(step),
                "margin": 0.3 * t,
                "beta": 0.1,
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens_per_s": 500.0,
                "lambda_rbf": 0.3 - 0.05 * t,
                "lambda_poly": 0.2,
                "lambda_spectral": 0.25 + 0.05 * t,
                "lambda_mahalanobis": 0.25,
                "tau_local": 0.5 + 0.1 * t,
                "tau_global": 0.5 - 0.1 * t,
            }
        )
    for step in range(0, STEPS + 1, 10):
        t = step / STEPS
        evals.append(
            {
                "step": step,
                "loss_pref": 0.693 - 0.15 * t,
                "reward_acc": 0.0 if step == 0 else 0.55 + 0.15 * t,
                "hybrid_acc": 0.5,
                "reward_chosen": 0.1 * t,
                "reward_rejected": -0.2 * t,
            }
        )
    return metrics, evals


def _write(run_dir, metrics, evals, *, config=None, summary=None, htsr_before=None, htsr_after=None, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir / rundir.CONFIG, config or _config())
    for row in metrics:
        rundir.append_jsonl(run_dir / rundir.METRICS, row)
    for row in evals:
        rundir.append_jsonl(run_dir / rundir.EVAL, row)
    if torn:
        with open(run_dir / rundir.METRICS, "a") as handle:
            handle.write('{"step": 99, "loss": 0.')
    if summary is not None:
        rundir.write_json(run_dir / rundir.SUMMARY, summary)
    if htsr_before is not None:
        htsr_before.to_csv(run_dir / rundir.HTSR_BEFORE, index=False)
    if htsr_after is not None:
        htsr_after.to_csv(run_dir / rundir.HTSR_AFTER, index=False)
    return load_run(run_dir)


def _codes(run):
    return {a.code: a for a in health.health_of(run)}


def _htsr(alphas):
    return pd.DataFrame(
        {
            "layer_id": range(len(alphas)),
            "name": [f"l{i}" for i in range(len(alphas))],
            "alpha": alphas,
            "alpha_weighted": alphas,
        }
    )


def test_healthy_run_raises_no_alert(tmp_path):
    metrics, evals = _healthy_rows()
    run = _write(
        tmp_path / "ok",
        metrics,
        evals,
        summary={"status": "succeeded", "error": None},
        htsr_before=_htsr([3.0, 4.0, 5.5]),
        htsr_after=_htsr([2.5, 3.5, 5.0]),
    )
    assert health.health_of(run) == []


def test_likelihood_displacement_fires_where_chosen_falls_while_margin_grows(tmp_path):
    metrics, evals = _healthy_rows()
    for row in evals:  # chosen reward falls from step 20 on; rejected falls faster, so the margin grows
        t = row["step"] / STEPS
        row["reward_chosen"] = 0.02 if row["step"] < 20 else -0.3 * t
        row["reward_rejected"] = -0.05 * t if row["step"] < 20 else -1.0 * t
    alerts = _codes(_write(tmp_path / "disp", metrics, evals))
    assert set(alerts) == {"likelihood_displacement"}
    alert = alerts["likelihood_displacement"]
    assert alert.step == 20 and alert.severity == "warning"
    assert "chosen" in alert.meaning and "β" in alert.advice


def test_a_chosen_dip_that_recovers_is_not_displacement(tmp_path):
    metrics, evals = _healthy_rows()
    evals[2]["reward_chosen"] = -0.2  # step 20 only
    evals[2]["reward_rejected"] = -0.6
    assert "likelihood_displacement" not in _codes(_write(tmp_path / "dip", metrics, evals))


def test_memorising_fires_when_train_fits_and_held_out_stays_flat(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        if row["step"] >= 12:
            row["loss_pref"], row["reward_acc"] = 0.01, 1.0
    for row in evals:
        if row["step"] >= 10:
            row["loss_pref"], row["reward_acc"] = 0.66, 0.56
    alerts = _codes(_write(tmp_path / "memo", metrics, evals))
    assert set(alerts) == {"memorising"}
    assert alerts["memorising"].step == 12


def test_train_fit_with_held_out_improving_is_not_memorising(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        if row["step"] >= 12:
            row["reward_acc"] = 1.0
    for row in evals:
        if row["step"] >= 20:
            row["loss_pref"], row["reward_acc"] = 0.4, 0.8
    assert "memorising" not in _codes(_write(tmp_path / "ok", metrics, evals))


def test_nan_guard_alert_from_the_trainer_error_and_from_null_rows(tmp_path):
    metrics, evals = _healthy_rows()
    error = (
        "training diverged at step 7: loss is not finite (NaN or inf). Try a lower learning rate (now 1e+10), "
        "model.dtype float32 (now auto), or a smaller beta (now 0.1)"
    )
    alerts = _codes(_write(tmp_path / "a", metrics[:6], evals[:1], summary={"status": "failed", "error": error}))
    assert set(alerts) == {"non_finite"} and alerts["non_finite"].step == 7
    assert alerts["non_finite"].severity == "error"
    metrics[8]["margin"] = float("nan")  # written as null by the run-directory writer
    alerts = _codes(_write(tmp_path / "b", metrics, evals))
    assert alerts["non_finite"].step == 9


def test_kernel_weight_collapse_names_the_kernel_and_its_step(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        if row["step"] >= 25:
            row["lambda_poly"] = 0.03
    alerts = _codes(_write(tmp_path / "kw", metrics, evals))
    assert set(alerts) == {"kernel_weight_collapse"}
    assert alerts["kernel_weight_collapse"].step == 25 and "λ2 polynomial" in alerts["kernel_weight_collapse"].evidence


def test_epsilon_dpo_beta_leaving_its_range(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        row["beta"] = 0.1 * 0.85 ** (row["step"] - 1)  # ε-DPO shrinking β every step
    first_out = next(r["step"] for r in metrics if r["beta"] < health.BETA_SANE_RANGE[0])
    alerts = _codes(_write(tmp_path / "beta", metrics, evals, config=_config(epsilon=0.05)))
    assert set(alerts) == {"beta_out_of_range"} and alerts["beta_out_of_range"].step == first_out


def test_fixed_beta_is_never_an_epsilon_dpo_alert(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        row["beta"] = 2.0
    assert _codes(_write(tmp_path / "b", metrics, evals, config=_config(beta=2.0))) == {}


def test_epsilon_dpo_configured_outside_the_range_is_the_config_not_the_run(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics:
        row["beta"] = 2.0 * 0.99 ** row["step"]  # started at β = 2 and stays above 1
    assert _codes(_write(tmp_path / "b2", metrics, evals, config=_config(epsilon=0.05, beta=2.0))) == {}


def test_htsr_alert_fires_for_layers_that_left_the_range_during_training(tmp_path):
    metrics, evals = _healthy_rows()
    alerts = _codes(
        _write(tmp_path / "h", metrics, evals, htsr_before=_htsr([3.0, 4.0, 7.5]), htsr_after=_htsr([1.5, 4.0, 8.0]))
    )
    alert = alerts["htsr_alpha"]
    assert set(alerts) == {"htsr_alpha"} and alert.heuristic and alert.severity == "info"
    assert "1 of 3 layers left 2–6 during training (1 now below 2, 0 above 6: 0)" in alert.evidence
    assert "(heuristic)" in alert.headline and alert.step == STEPS


def test_htsr_alert_ignores_the_base_models_own_out_of_range_layers(tmp_path):
    metrics, evals = _healthy_rows()
    before, after = _htsr([1.2, 4.0, 7.5, 9.0]), _htsr([1.3, 4.1, 7.4, 12.0])
    run = _write(tmp_path / "same", metrics, evals, htsr_before=before, htsr_after=after)
    assert _codes(run) == {}
    assert list(health.htsr_base_out_of_range(before)["layer"]) == ["0", "2", "3"]  # shown as information
    assert _codes(_write(tmp_path / "only-before", metrics, evals, htsr_before=before)) == {}
    assert _codes(_write(tmp_path / "only-after", metrics, evals, htsr_after=after)) == {}


def test_htsr_alert_fires_for_an_over_fit_update_spectrum(tmp_path):
    metrics, evals = _healthy_rows()
    run = _write(tmp_path / "u", metrics, evals, htsr_before=_htsr([3.0, 4.0]), htsr_after=_htsr([3.0, 4.0]))
    update = pd.DataFrame({"longname": ["a", "b", "c"], "status": ["fitted", "fitted", "not fitted"]})
    update["alpha"] = [1.6, 3.0, np.nan]
    update.to_csv(run.run_dir / rundir.HTSR_UPDATE, index=False)
    alert = _codes(load_run(run.run_dir))["htsr_alpha"]
    assert alert.evidence == "1 layers' update ΔW has a fitted alpha below 2 (a)"
    update["alpha"] = [2.5, 3.0, np.nan]
    update.to_csv(run.run_dir / rundir.HTSR_UPDATE, index=False)
    assert _codes(load_run(run.run_dir)) == {}


def test_alerts_work_on_a_live_run_with_a_torn_last_line(tmp_path):
    metrics, evals = _healthy_rows()
    for row in metrics[:20]:
        if row["step"] >= 12:
            row["lambda_rbf"] = 0.01
    run = _write(tmp_path / "live", metrics[:20], evals[:2], torn=True)
    assert not run.warnings  # a torn last line is a write in progress
    assert _codes(run)["kernel_weight_collapse"].step == 12


@pytest.mark.parametrize("state", ["empty", "no-eval"])
def test_missing_files_give_no_alert_and_no_error(tmp_path, state):
    metrics, _ = _healthy_rows()
    run = _write(tmp_path / state, [] if state == "empty" else metrics, [])
    assert health.health_of(run) == []
    assert json.dumps([a.to_dict() for a in health.health_of(run)]) == "[]"
