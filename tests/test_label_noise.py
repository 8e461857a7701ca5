"""Label-noise signals: the log-prob gap against the model's own logits, the rank combination, top-k
precision and recall, and the audit section that carries them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_engine.analysis.audit import label_noise as ln
from dpo_engine.analysis.audit.label_noise import policy_signal, rank_average, top_k, top_k_quality


def _logprob_gap_by_hand(model, tokenizer, row, max_length: int, max_prompt_length: int) -> float:
    """One pair at a time, full logits, log_softmax: -(mean token log-prob of chosen - of rejected)."""
    from dpo_engine.data.tokenize import tokenize_pair

    pair = tokenize_pair(
        tokenizer, "0", row.prompt, row.chosen, row.rejected, max_length=max_length, max_prompt_length=max_prompt_length
    )
    means = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        start = len(pair.prompt_ids)
        total = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
        means.append(total / len(response))
    return -(means[0] - means[1])


def test_logprob_gap_equals_the_models_own_log_softmax(workspace, hh_sample_path):
    from dpo_engine.analysis.audit.logprob_gap import logprob_gap
    from dpo_engine.data import load_preferences
    from dpo_engine.models.loading import TINY_RANDOM, load_policy

    table, _ = load_preferences(hh_sample_path).finalize(drop_flagged=True)
    table = table.head(5).reset_index(drop=True)
    table.loc[4, "chosen"] = "Yes."  # short against long: padding inside a batch
    model, tokenizer = load_policy(TINY_RANDOM, workspace=workspace, dtype="float32")
    gap = logprob_gap(table, model, tokenizer, max_length=96, max_prompt_length=48, batch_pairs=3)
    expected = [_logprob_gap_by_hand(model, tokenizer, row, 96, 48) for row in table.itertuples()]
    np.testing.assert_allclose(gap, expected, rtol=1e-4, atol=1e-4)
    swapped = table.rename(columns={"chosen": "rejected", "rejected": "chosen"})
    np.testing.assert_allclose(
        logprob_gap(swapped, model, tokenizer, max_length=96, max_prompt_length=48), -gap, rtol=1e-4, atol=1e-4
    )


def test_rank_average_puts_pairs_several_signals_flag_first():
    a = np.array([0.9, 0.8, 0.1, 0.2, np.nan])
    b = np.array([10.0, -5.0, 7.0, 0.0, 3.0])
    combined = rank_average({"a": a, "b": b})
    # ranks share of a: [4, 3, 1, 2]/4 over the 4 known; of b: [5, 1, 4, 2, 3]/5
    np.testing.assert_allclose(combined, [(1 + 1) / 2, (0.75 + 0.2) / 2, (0.25 + 0.8) / 2, (0.5 + 0.4) / 2, 0.6])
    assert top_k(combined, 3).tolist() == [0, 4, 2]  # row 4 ranks by b alone (a did not score it)
    assert np.isnan(rank_average({"a": np.array([np.nan, 1.0])})[0])


def test_top_k_precision_and_recall_arithmetic():
    scores = np.arange(20, dtype=float)[::-1]  # row 0 ranks first
    bad = np.zeros(20, dtype=bool)
    bad[[0, 1, 10, 11]] = True  # the top 4 holds 2 of them
    q = top_k_quality(scores, bad)
    assert (q.k, q.hits, q.n_mislabeled) == (4, 2, 4)
    assert q.precision == pytest.approx(0.5) and q.recall == pytest.approx(0.5)
    assert q.random_precision == pytest.approx(0.2)
    assert q.precision_interval.low < 0.5 < q.precision_interval.high
    assert not q.beats_random  # 2 of 4: the interval's lower bound is below 1.5 x random
    q12 = top_k_quality(scores, bad, k=12)
    assert (q12.hits, q12.precision, q12.recall) == (4, 4 / 12, 1.0)
    many = np.zeros(400, dtype=bool)
    many[:40] = True
    assert top_k_quality(-np.arange(400.0), many).beats_random  # a perfect ranking clears the bar


def test_policy_signal_negates_and_aligns_held_out_margins():
    margins = pd.Series([2.0, -1.0], index=["b", "c"])
    np.testing.assert_allclose(policy_signal(margins, ["a", "b", "c"]), [np.nan, -2.0, 1.0])


def _measured(beats: dict[str, bool]) -> dict:
    def q(name):
        low = 0.3 if beats[name] else 0.05
        return {
            "k": 40,
            "precision": low + 0.1,
            "precision_interval": {"low": low, "high": low + 0.2},
            "recall": low + 0.1,
            "recall_interval": {"low": low, "high": low + 0.2},
            "random_precision": 0.1,
            "beats_random": beats[name],
        }

    return {
        "dataset": "a sample (400 pairs)",
        "n_pairs": 400,
        "flip_share": 0.1,
        "model": "ref",
        "signals": {name: q(name) for name in beats},
    }


def test_the_audit_carries_the_label_noise_ranking(tmp_path, monkeypatch):
    from dpo_engine.analysis.audit import audit_data
    from dpo_engine.report.builder import _audit_section, _Figures
    from dpo_engine.viz import audit as audit_viz

    path = tmp_path / "measured.json"
    path.write_text(json.dumps(_measured({"embedding": False, "logprob": True, "combined": False})))
    monkeypatch.setattr(ln, "MEASURED_JSON", path)
    n = 80
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {"prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n, "rejected": ["b"] * n, "pair_id": range(n)}
    )
    logprob = rng.standard_normal(n)
    logprob[7] = 9.0
    signals = {"embedding": rng.standard_normal(n), "logprob": logprob}
    audit = audit_data(table, label_noise_signals=signals, label_noise_model="ref")
    data = audit.to_json_dict()
    assert data["label_noise"]["shown"] == "logprob" and data["label_noise"]["n_scored"]["combined"] == n
    finding = next(f for f in data["findings"] if f["key"] == "label_noise")
    assert finding["count"] == data["label_noise"]["n_flagged"] == 50 and "log" in finding["title"]
    rows = audit.flagged_with_texts(table)
    noisy = rows[rows.finding == "label_noise"]
    assert noisy["row"].iloc[0] == 7 and noisy["signal_logprob"].iloc[0] == 9.0
    assert {"signal_embedding", "signal_combined", "prompt", "chosen"} <= set(noisy.columns)
    quality = audit_viz.label_noise_table(data)
    assert quality.set_index("signal").loc["logprob", "shown to users"] == "yes"
    html = _audit_section(data, _Figures())
    assert "Label noise" in html and "precision@k" in html

    path.write_text(json.dumps(_measured({"embedding": False, "logprob": False, "combined": False})))
    quiet = audit_data(table, label_noise_signals=signals, label_noise_model="ref")
    assert quiet.label_noise.shown is None and not (quiet.flagged.finding == "label_noise").any()
    path.write_text(json.dumps(_measured({"embedding": False, "logprob": True, "combined": True})))
    other = audit_data(table, label_noise_signals=signals, label_noise_model="another model")
    assert other.label_noise.shown is None  # the log-prob measurement holds for its own model only


def test_the_diagnose_job_scores_a_seeded_sample_with_the_training_model(workspace, monkeypatch):
    import dpo_engine.selection.job as job
    from dpo_engine.embed import PairEmbeddings

    def fake_embed(table, **_):
        rng = np.random.default_rng(0)
        e = [rng.standard_normal((len(table), 16)).astype(np.float32) for _ in range(3)]
        return PairEmbeddings(*(x / np.linalg.norm(x, axis=1, keepdims=True) for x in e))

    monkeypatch.setattr(job, "embed_pairs", fake_embed)
    monkeypatch.setattr(job, "LABEL_NOISE_MAX_PAIRS", 5)
    rows = [{"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": f"no {i}"} for i in range(12)]
    path = workspace.root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = job.DiagnoseParams(
        dataset=str(path), preflight_model="tiny-random", max_length=32, n_bootstrap=0, label_noise_logprob=True
    )
    _, _, _, summary = job.run_diagnosis(params, workspace, workspace.root / "run")
    noise = summary["audit"]["label_noise"]
    assert noise["n_scored"] == {"embedding": 12, "logprob": 5, "combined": 12} and noise["model"] == "tiny-random"
    assert json.loads((workspace.root / "run" / "diagnosis.json").read_text())["audit"]["label_noise"] == noise
    skipped = job.run_diagnosis(params.model_copy(update={"label_noise": False}), workspace, None)[3]
    assert skipped["audit"]["label_noise"] is None
    default = job.run_diagnosis(params.model_copy(update={"label_noise_logprob": False}), workspace, None)[3]
    assert default["audit"]["label_noise"]["n_scored"] == {"embedding": 12}  # no model pass unless asked


def test_policy_flip_quality_on_closed_form_margins():
    """A policy that agrees with every label (all margins > 0) finds every swapped pair: its swapped
    margins are the only negative ones. Margins symmetric about 0 with no relation to the swap find
    about the random share. The swap is the seeded `flip_labels` mask."""
    n = 400
    agreeing = np.linspace(0.1, 5.0, n)
    q = ln.policy_flip_quality(agreeing, 0.1, seed=3)
    assert (q.k, q.hits, q.precision, q.recall) == (40, 40, 1.0, 1.0)
    flip = ln.flip_labels(n, 0.1, seed=3)
    assert flip.sum() == 40 and np.array_equal(flip, ln.flip_labels(n, 0.1, seed=3))
    precisions = [
        ln.policy_flip_quality(np.random.default_rng(s).standard_normal(n), 0.1, seed=s).precision for s in range(200)
    ]
    assert abs(np.mean(precisions) - 0.1) < 0.02  # no information: the random share


def test_policy_candidates_are_the_last_evaluations_negative_margins(tmp_path):
    from dpo_engine import rundir

    rundir.append_eval_margins(tmp_path, 0, ["a", "b", "c", "d"], np.array([0.0, 0.0, 0.0, 0.0]))
    assert ln.policy_candidates(tmp_path) is None  # step 0 only: the policy is the reference, no list yet
    rundir.append_eval_margins(tmp_path, 10, ["a", "b", "c", "d"], np.array([0.5, -2.0, -0.1, -3.0]))
    step, got = ln.policy_candidates(tmp_path, k=2)
    assert step == 10 and got["pair_id"].tolist() == ["d", "b"] and got["margin"].tolist() == [-3.0, -2.0]
    assert got["rank"].tolist() == [1, 2]
    assert ln.policy_candidates(tmp_path)[1]["pair_id"].tolist() == ["d", "b", "c"]  # never a pair it agrees with
    rundir.append_eval_margins(tmp_path, 20, ["a", "b", "c", "d"], np.array([np.nan, 1.0, -1.0, np.nan]))
    step, got = ln.policy_candidates(tmp_path)
    assert step == 20 and got["pair_id"].tolist() == ["c"]  # not-finite margins are left out
    assert ln.policy_candidates(tmp_path / "none") is None
