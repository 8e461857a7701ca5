"""The Diagnose page under AppTest, on a real diagnose job run by a real worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dpo_engine.data import DatasetStore, load_preferences
from dpo_engine.jobs import JobStore
from tests.helpers import run_worker_once

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "diagnose.py")


@pytest.fixture
def small_dataset(workspace, hh_sample_path, tmp_path):
    import gzip

    lines = gzip.open(hh_sample_path, "rt").read().splitlines()[:60]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return DatasetStore(workspace).add(load_preferences(path), name="small-hh", source=str(path))


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _set_threshold(at, name: str, value: float):
    next(n for n in at.number_input if n.label == name).set_value(value)


def test_diagnose_page_end_to_end(workspace, small_dataset):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert any("not been diagnosed" in i.value for i in at.info)

    next(s for s in at.selectbox if s.label == "Model").set_value("tiny-random")  # its log-probs: a fast pass
    next(b for b in at.button if b.label == "Run diagnosis").click().run()
    assert not at.exception
    jobs = JobStore.for_workspace(workspace).list(kind="diagnose")
    assert len(jobs) == 1 and jobs[0].params["dataset"] == small_dataset.id

    run_worker_once(workspace, timeout=300)
    assert JobStore.for_workspace(workspace).get(jobs[0].id).status == "succeeded"

    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    metrics = _metrics(at)
    assert metrics["Kernel"] in {"rbf", "polynomial", "spectral", "mahalanobis", "hmk"}
    assert metrics["Divergence"] in {"kl", "js", "hellinger", "renyi", "bhattacharyya", "wasserstein", "fdiv"}
    assert metrics["Kernel confidence"].endswith("%")
    # The rule tables list every rule, exactly one of which fired per table.
    kernel_rules, divergence_rules = at.dataframe[1].value, at.dataframe[2].value
    assert set(kernel_rules["rule"]) == {"rbf", "polynomial", "mahalanobis", "spectral", "hmk"}
    assert kernel_rules.groupby("rule")["fired"].first().sum() == 1
    assert divergence_rules.groupby("rule")["fired"].first().sum() == 1
    # The token pre-flight shows per-side lengths and cuts, and pairs as the model sees them.
    frames = [d.value for d in at.dataframe]
    sides = next(f for f in frames if "pairs cut" in f.columns)
    assert list(sides["side"]) == ["prompt", "chosen", "rejected"]
    examples = next(f for f in frames if "as the model sees it" in f.columns)
    assert examples["as the model sees it"].str.contains("<|im_start|>", regex=False).any()
    assert len(at.get("plotly_chart")) >= 6
    # The data audit: findings with what to do, leakage per split, the length histograms, the flagged rows.
    assert any(h.value.startswith("Data audit") for h in at.subheader)
    findings = next(f for f in frames if "what to do" in f.columns)
    assert {"exact duplicate pairs (repeats of an earlier pair)"} <= set(findings["finding"])
    assert findings["finding"].str.startswith("chosen is the longer response (tokens").any()
    leaks = next(f for f in frames if "held-out prompt trained on" in f.columns)
    assert list(leaks["split by"]) == ["pair", "prompt (training's)"]
    assert any(b.label == "Export flagged pairs (CSV)" for b in at.get("download_button"))

    # Thresholds change the recommendation without recomputing: PNAV >= 0 > -1 and TAT <= 1 < 2 make RBF fire;
    # overlap >= 0 > -1 makes Bhattacharyya fire.
    _set_threshold(at, "eps1", -1.0)
    _set_threshold(at, "eps2", 2.0)
    _set_threshold(at, "overlap_hi", -1.0)
    at.run()
    assert not at.exception
    assert _metrics(at)["Kernel"] == "rbf"
    assert _metrics(at)["Divergence"] == "bhattacharyya"
    # No overlap rule can fire now, and drift >= 0 > -1 makes Wasserstein fire next.
    _set_threshold(at, "overlap_hi", 2.0)
    _set_threshold(at, "drift", -1.0)
    at.run()
    assert _metrics(at)["Divergence"] == "wasserstein"

    # Label noise: how well each signal found known flipped labels (the measurement the ranking rests on).
    assert any(h.value.startswith("Label noise") for h in at.subheader)
    quality = next(d.value for d in at.dataframe if "precision@k" in d.value.columns)
    assert {"embedding", "logprob", "combined"} <= set(quality["signal"])

    # One button queues the sweep: the recommended pair and its runners-up, same seed, on this dataset.
    next(t for t in at.text_input if t.key == "sweep-model").set_value("tiny-random")
    next(n for n in at.number_input if n.key == "sweep-steps").set_value(2)
    next(b for b in at.button if b.key == "sweep-launch").click().run()
    assert not at.exception
    from dpo_engine.train.sweep import list_sweeps

    train_jobs = JobStore.for_workspace(workspace).list(kind="train")
    assert len(train_jobs) == 3
    assert {(j.params["method"]["kernel"]["name"], j.params["method"]["divergence"]["name"]) for j in train_jobs} >= {
        ("rbf", "wasserstein")
    }
    assert {j.params["model"]["name"] for j in train_jobs} == {"tiny-random"}
    assert {j.params["data"]["dataset"] for j in train_jobs} == {small_dataset.id}
    (sweep,) = list_sweeps(workspace)
    assert [r["role"] for r in sweep["runs"]][0] == "recommended" and at.session_state["sweep_id"] == sweep["sweep_id"]

    next(b for b in at.button if b.label == "Train with this recommendation").click().run()
    assert at.session_state["recommendation"]["kernel"] == "rbf"
    assert at.session_state["recommendation"]["divergence"] == "wasserstein"
    assert at.session_state["recommendation"]["dataset_id"] == small_dataset.id
