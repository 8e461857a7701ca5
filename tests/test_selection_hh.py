"""Diagnosis on the real HH-RLHF sample: metric ranges, stability, npz round trip, CLI, job, figures."""

from __future__ import annotations

import json
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from typer.testing import CliRunner

from dpo_engine.cli import app
from dpo_engine.data import load_preferences
from dpo_engine.embed import PairEmbeddings, embed_pairs
from dpo_engine.selection import diagnose, suspicious_pairs
from dpo_engine.workspace import Workspace
from tests.conftest import HH_SAMPLE

N_PAIRS = 40


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    """40 HH pairs (flagged rows dropped, file order), embedded once into a workspace cache."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    table, _ = load_preferences(HH_SAMPLE).finalize(drop_flagged=True)
    table = table.head(N_PAIRS).reset_index(drop=True)
    emb = embed_pairs(table, cache_dir=ws.embeddings_dir)
    return ws, table, emb


def test_hh_metrics_are_finite_and_in_documented_ranges(hh):
    _, table, emb = hh
    assert emb.prompt.shape == (N_PAIRS, 384)
    assert all(p.endswith("Assistant:") for p in table["prompt"])  # prompt ends at the last shared assistant turn
    d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=100)
    m = d.metrics
    assert d.n_pairs == N_PAIRS
    assert all(np.isfinite(v) for v in m.as_row())
    assert 0.0 <= m.tat <= 1.0 and -1.0 <= m.nag <= 1.0 and 0.0 <= m.support_overlap <= 1.0
    assert m.kurtosis >= 1.0 and m.pnav >= 0.0 and m.drift_magnitude >= 0.0 and abs(m.smoothness) < 1.0
    assert d.pairs.chunk_w1.size == 1  # 40 pairs: 2 chunks of 20
    assert np.all((d.pairs.tat >= 0) & (d.pairs.tat <= 1))
    assert np.all(np.isfinite(d.pairs.bootstrap))


def test_hh_recommendation_is_stable_across_runs(hh):
    _, _, emb = hh
    first = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=100, seed=0)
    again = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=100, seed=0)
    other_seed = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=100, seed=1)
    assert first.to_json_dict() == again.to_json_dict()
    assert (other_seed.recommendation.kernel, other_seed.recommendation.divergence) == (
        first.recommendation.kernel,
        first.recommendation.divergence,
    )
    for kind in ("kernel", "divergence"):
        a = getattr(first.recommendation.confidence, kind)
        b = getattr(other_seed.recommendation.confidence, kind)
        assert max(abs(a[k] - b[k]) for k in a) < 0.2


def test_hh_npz_round_trip_gives_the_same_metrics(hh, tmp_path):
    _, _, emb = hh
    path = emb.save_npz(tmp_path / "emb.npz")
    back = PairEmbeddings.load_npz(path)
    a = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=20)
    b = diagnose(back.prompt, back.chosen, back.rejected, n_bootstrap=20)
    assert a.to_json_dict() == b.to_json_dict()


def test_cli_foreground_end_to_end(hh, tmp_path):
    ws, _, emb = hh
    out_json, out_npz = tmp_path / "d.json", tmp_path / "e.npz"
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            str(HH_SAMPLE),
            "--max-pairs",
            str(N_PAIRS),
            "--foreground",
            "--threshold",
            "kurt=2.5",
            "--json",
            str(out_json),
            "--save-embeddings",
            str(out_npz),
            "--bootstrap",
            "50",
            "-w",
            str(ws.root),
            "--model",
            "tiny-random",
            "--max-length",
            "128",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "pairs cut now; suggested max_length" in result.stdout
    assert "kernel" in result.stdout and "divergence" in result.stdout
    assert "dropped" in result.stdout  # the sample has flagged rows, and the user is told
    data = json.loads(out_json.read_text())
    for key in (
        "n_pairs",
        "embedder",
        "distance",
        "kernel_metrics",
        "divergence_metrics",
        "recommendation",
        "rules",
        "thresholds",
    ):
        assert key in data
    assert data["n_pairs"] == N_PAIRS and data["embedder"] == "all-MiniLM-L6-v2"
    assert data["thresholds"]["kurt"] == 2.5
    assert set(data["recommendation"]["confidence"]) == {"kernel", "divergence"}
    for kind in ("kernel", "divergence"):
        assert isinstance(data["recommendation"][f"{kind}_uncertain"], bool)
        assert f"{kind}_runner_up" in data["recommendation"]
    preflight = data["token_preflight"]
    assert preflight["model"] == "tiny-random" and preflight["max_length"] == 128 and preflight["n_pairs"] == N_PAIRS
    assert set(preflight["lengths"]) == {"prompt", "chosen", "rejected"}
    saved = PairEmbeddings.load_npz(out_npz)
    assert saved.prompt.dtype == np.float32 and saved.prompt.shape == (N_PAIRS, 384)
    np.testing.assert_allclose(np.linalg.norm(saved.chosen, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(saved.rejected, emb.rejected)
    again = diagnose(saved.prompt, saved.chosen, saved.rejected, n_bootstrap=0)
    for k, v in data["kernel_metrics"].items():
        assert getattr(again.metrics, k) == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "nope=1"], "unknown threshold nope"),
        (["--threshold", "eps1=abc"], "must be a number"),
        (["--threshold", "eps1"], "NAME=VALUE"),
        (["--distance", "manhattan"], "--distance"),
        (["--max-pairs", "1"], "--max-pairs"),
    ],
)
def test_cli_rejects_bad_options_with_exit_2(hh, args, message):
    ws, _, _ = hh
    result = CliRunner().invoke(app, ["diagnose", str(HH_SAMPLE), "--foreground", *args, "-w", str(ws.root)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_dataset_exit_2(hh):
    ws, _, _ = hh
    result = CliRunner().invoke(app, ["diagnose", "no-such-dataset", "-w", str(ws.root)])
    assert result.exit_code == 2 and "neither a file nor a stored dataset" in result.output


def test_cli_job_path_runs_on_a_worker(hh, tmp_path):
    """Without --foreground the command submits a diagnose job and waits for a worker to run it."""
    from dpo_engine.jobs import JobStore
    from dpo_engine.jobs.worker import Worker

    ws, _, _ = hh
    store = JobStore.for_workspace(ws)
    errors: list[BaseException] = []

    def worker_when_job_appears() -> None:
        try:
            deadline = time.monotonic() + 60
            while not store.list(status="queued", kind="diagnose") and time.monotonic() < deadline:
                time.sleep(0.1)
            Worker(ws, device="cpu", poll_s=0.2).run(once=True)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=worker_when_job_appears, daemon=True)
    thread.start()
    out_json = tmp_path / "job.json"
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            str(HH_SAMPLE),
            "--max-pairs",
            str(N_PAIRS),
            "--bootstrap",
            "30",
            "--json",
            str(out_json),
            "--timeout",
            "120",
            "-w",
            str(ws.root),
        ],
    )
    thread.join(timeout=60)
    assert not errors, errors
    assert result.exit_code == 0, result.output
    job = store.list(kind="diagnose")[0]
    assert job.status == "succeeded" and job.progress == 1.0
    run_dir = job.run_dir
    data = json.loads(out_json.read_text())
    assert data == json.loads(open(os.path.join(run_dir, "diagnosis.json")).read())
    saved = PairEmbeddings.load_npz(os.path.join(run_dir, "embeddings.npz"))
    assert saved.n_pairs == N_PAIRS
    assert job.result["kernel"] == data["recommendation"]["kernel"]


def test_suspicious_pairs_lists_lowest_margins_first(hh):
    _, table, emb = hh
    d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=0)
    sus = suspicious_pairs(table, d, n=10)
    assert len(sus) == 10
    assert list(sus["margin"]) == sorted(d.pairs.margins)[:10]
    first = sus.iloc[0]
    assert table["rejected"].iloc[first["row"]].startswith(first["rejected"])
    assert first["dn"] < first["dp"]  # the most suspicious pair: rejected nearer the prompt than chosen
    with pytest.raises(ValueError, match="rows"):
        suspicious_pairs(table.head(5), d)


def test_diagnosis_figures_are_labelled(hh):
    from dpo_engine.viz.diagnosis import (
        CHOSEN_COLOR,
        PROMPT_COLOR,
        REJECTED_COLOR,
        diagnosis_figures,
        embedding_map,
        overlap_figure,
    )

    _, table, emb = hh
    d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=40)
    for key, fig in diagnosis_figures(d).items():
        assert fig.layout.title.text, key
        if key != "confidence":
            assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text, key
    overlap = overlap_figure(d)
    chosen, rejected, kde_chosen, kde_rejected, shaded = overlap.data
    np.testing.assert_allclose(shaded.y, np.minimum(kde_chosen.y, kde_rejected.y))
    width = chosen.width
    # each KDE is a density scaled to share per bin: it integrates to ~1 over the grid, like the bars sum to 1
    assert np.trapezoid(kde_chosen.y, kde_chosen.x) / width == pytest.approx(1.0, abs=0.01)
    assert np.sum(chosen.y) == pytest.approx(1.0)
    assert chosen.marker.color == CHOSEN_COLOR and rejected.marker.color == REJECTED_COLOR
    fig = embedding_map(emb.prompt, emb.chosen, emb.rejected, table, method="tsne", seed=0)
    assert [t.name for t in fig.data] == ["prompt", "chosen", "rejected"]
    assert [t.marker.color for t in fig.data] == [PROMPT_COLOR, CHOSEN_COLOR, REJECTED_COLOR]
    assert all(len(t.x) == N_PAIRS for t in fig.data)
    assert "chosen" in fig.data[1].hovertext[0]
    again = embedding_map(emb.prompt, emb.chosen, emb.rejected, table, method="tsne", seed=0)
    np.testing.assert_allclose(again.data[0].x, fig.data[0].x)  # fixed seed: same picture


def test_stored_dataset_by_id_and_embed_job(hh, tmp_path):
    """A stored dataset is found by id (CLI) and the "embed" job fills the same cache the diagnosis uses."""
    from dpo_engine.data import DatasetStore
    from dpo_engine.jobs import JobStore
    from dpo_engine.jobs.worker import Worker

    ws, table, emb = hh
    flat = tmp_path / "pairs.jsonl"
    table[["prompt", "chosen", "rejected"]].to_json(flat, orient="records", lines=True)
    info = DatasetStore(ws).add(load_preferences(flat), name="hh-40", source=str(flat))
    stored = DatasetStore(ws).load(info.id)
    assert list(stored["chosen"]) == list(table["chosen"])

    out_json = tmp_path / "d.json"
    result = CliRunner().invoke(
        app, ["diagnose", info.id, "--foreground", "--bootstrap", "10", "--json", str(out_json), "-w", str(ws.root)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out_json.read_text())["dataset"]["dataset_id"] == info.id

    store = JobStore.for_workspace(ws)
    job = store.submit("embed", {"dataset_id": info.id}, title="embed hh-40")
    Worker(ws, device="cpu", poll_s=0.2).run(once=True)
    done = store.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.result["n_pairs"] == N_PAIRS and done.result["dim"] == 384
    saved = PairEmbeddings.load_npz(os.path.join(done.run_dir, "embeddings.npz"))
    np.testing.assert_array_equal(saved.prompt, emb.prompt)
