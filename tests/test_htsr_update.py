"""HT-SR of the update: ΔW from the adapters is the merge's W_merged − W_base, the table's spectrum
numbers are numpy's SVD of ΔW, and alpha is left empty (with the reason) where the rank is too small."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_engine import rundir
from dpo_engine.analysis.health import UPDATE_MIN_EVALS
from dpo_engine.analysis.htsr_update import (
    FITTED,
    NOT_FITTED,
    SKIPPED,
    lora_deltas,
    update_table,
    weight_deltas,
)
from dpo_engine.train.trainer import train
from tests.test_train import make_config, toy_pairs


def _low_rank(rng, shape, rank, scale=1e-3):
    return rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])) * scale


def test_spectrum_numbers_equal_numpy_svd_of_the_update():
    rng = np.random.default_rng(0)
    deltas = {"full": rng.standard_normal((96, 48)) * 1e-4, "wide": rng.standard_normal((24, 80)) * 1e-2}
    deltas["low"] = _low_rank(rng, (64, 32), 6)
    table = update_table(((n, d, "") for n, d in deltas.items()), source="full").set_index("longname")
    for name, delta in deltas.items():
        s = np.linalg.svd(delta, compute_uv=False)
        row = table.loc[name]
        assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-9)
        assert row["lambda_max"] == pytest.approx(s[0] ** 2, rel=1e-9)
        assert row["frobenius_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
        assert row["rank"] == np.linalg.matrix_rank(delta)
        assert (row["N"], row["M"]) == (max(delta.shape), min(delta.shape))


def test_alpha_is_left_empty_with_the_reason_when_the_rank_is_too_small():
    rng = np.random.default_rng(1)
    deltas = [
        ("lora", _low_rank(rng, (128, 64), UPDATE_MIN_EVALS), ""),
        ("full", rng.standard_normal((128, 64)), ""),
        ("zero", np.zeros((8, 8)), ""),
        ("dora", None, "DoRA rescales the merged weight"),
    ]
    base = pd.DataFrame({"longname": ["lora", "full", "frozen"], "alpha": [3.0, 7.0, 9.0], "lambda_max": 4.0})
    table = update_table(deltas, source="lora", base=base, missing_reason="no LoRA adapter: frozen")
    rows = table.set_index("longname")
    assert rows.loc["lora", "status"] == NOT_FITTED and np.isnan(rows.loc["lora", "alpha"])
    assert f"rank {UPDATE_MIN_EVALS} ≤ {UPDATE_MIN_EVALS}" in rows.loc["lora", "reason"]
    assert rows.loc["full", "status"] == FITTED and np.isfinite(rows.loc["full", "alpha"])
    assert rows.loc["zero", "status"] == SKIPPED and "unchanged" in rows.loc["zero", "reason"]
    assert rows.loc["dora", "status"] == SKIPPED and "DoRA" in rows.loc["dora", "reason"]
    assert rows.loc["frozen", "status"] == SKIPPED and rows.loc["frozen", "reason"] == "no LoRA adapter: frozen"
    assert rows.loc["lora", "base_alpha"] == 3.0 and rows.loc["frozen", "base_alpha"] == 9.0
    assert rows.loc["lora", "relative_norm"] == pytest.approx(rows.loc["lora", "spectral_norm"] / 2.0)
    assert list(table["longname"][:3]) == ["lora", "full", "frozen"]  # the base table's order first


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-finetune"])
def test_update_of_a_tiny_run_is_what_the_merge_or_the_step_wrote(workspace, tmp_path, lora):
    from peft import PeftModel

    from dpo_engine.models.loading import load_policy

    cfg = make_config(
        model={"lora": lora, "lora_dropout": 0.0},
        optimisation={"max_steps": 2},
        monitoring={"htsr": True, "eval_every": 100, "snapshot_every": 100},
    )
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs(24))
    assert summary["status"] == "succeeded", summary["error"]
    written = rundir.read_htsr(tmp_path / "run", "update").set_index("longname")
    base, _ = load_policy("tiny-random", workspace=workspace, dtype="float32")
    base_weights = {n: m.weight.detach().double().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    if lora:
        adapted = PeftModel.from_pretrained(base, tmp_path / "run" / rundir.MODEL)
        deltas = {n: d for n, d, _ in lora_deltas(adapted)}
        merged = adapted.merge_and_unload()
        assert deltas
        for name, delta in deltas.items():
            w_merged = merged.get_submodule(name).weight.detach().double()
            np.testing.assert_allclose(delta, (w_merged - base_weights[name]).numpy(), rtol=0, atol=1e-6)
            assert written.loc[name, "rank"] <= cfg.model.lora_r < UPDATE_MIN_EVALS
            assert written.loc[name, "status"] == NOT_FITTED and np.isnan(written.loc[name, "alpha"])
        assert written.loc["lm_head", "status"] == SKIPPED  # no adapter there
    else:
        trained, _ = load_policy(str(tmp_path / "run" / rundir.MODEL), workspace=workspace, dtype="float32")
        deltas = {n: d for n, d, _ in weight_deltas(trained, base)}
        changed = written[written["status"] != SKIPPED]
        assert len(changed) and (changed["status"] == FITTED).any()
        for name in changed.index:
            s = np.linalg.svd(deltas[name], compute_uv=False)
            assert written.loc[name, "spectral_norm"] == pytest.approx(s[0], rel=1e-5)
    before = rundir.read_htsr(tmp_path / "run", "before").set_index("longname")
    shared = written.index.intersection(before.index)
    np.testing.assert_allclose(written.loc[shared, "base_alpha"], before.loc[shared, "alpha"])


def test_weight_deltas_name_layers_without_a_match():
    torch.manual_seed(0)
    after = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    before = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3))
    (first, d1, r1), (second, d2, r2) = weight_deltas(after, before)
    assert first == "0" and r1 == "" and np.allclose(d1, (after[0].weight - before[0].weight).detach().numpy())
    assert second == "1" and d2 is None and "same shape" in r2


def _update_rows():
    table = pd.DataFrame(
        {
            "longname": ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj", "lm_head"],
            "status": [FITTED, NOT_FITTED, SKIPPED],
            "reason": ["", "rank 8 ≤ 10: too few eigenvalues for a power-law tail", "no LoRA adapter: frozen"],
            "alpha": [1.5, np.nan, np.nan],
            "base_alpha": [3.0, 4.0, 9.0],
            "spectral_norm": [0.02, 0.01, np.nan],
            "relative_norm": [0.01, 0.005, np.nan],
            "stable_rank": [3.0, 2.0, np.nan],
            "rank": [64, 8, 0],
            "N": [128, 64, 100],
            "M": [64, 64, 64],
        }
    )
    table["flag"] = ["α < 2 (over-fit?)", "", ""]
    return table


def test_update_figure_and_tables_show_changed_layers_and_flags():
    from dpo_engine.viz import htsr_update as viz_update

    table = _update_rows()
    fig = viz_update.update_figure(table)
    assert [t.name for t in fig.data] == ["update α < 2 (over-fit?)"]  # the one fitted layer, flagged
    assert list(viz_update.update_flag_table(table)["longname"]) == ["model.layers.0.mlp.up_proj"]
    assert list(viz_update.update_display_table(table)["longname"])[-1] == "lm_head"  # skipped layers last
    lora = table.assign(alpha=np.nan, flag="")
    fig = viz_update.update_figure(lora)  # no fitted alpha: the relative norm against the base alpha
    assert len(fig.data) == 1 and list(fig.data[0].y) == [0.01, 0.005] and "relative" in fig.layout.yaxis.title.text


def test_report_shows_the_update(tmp_path, workspace, monkeypatch):
    import shutil
    from pathlib import Path

    import dpo_engine.report.rundata as rundata
    from dpo_engine.report import build_report

    repo = Path(__file__).resolve().parent.parent
    shipped = tmp_path / "shipped"
    source = repo / "assets" / "example_runs" / "example-dpo"
    shutil.copytree(source, shipped / "example-dpo", ignore=shutil.ignore_patterns("snapshots"))  # no projections
    _update_rows().to_csv(shipped / "example-dpo" / rundir.HTSR_UPDATE, index=False)
    monkeypatch.setattr(rundata, "shipped_examples_dir", lambda: shipped)
    html = build_report(workspace, ["example-dpo"])
    assert "What training changed (HT-SR of the update)" in html and "model.layers.0.mlp.up_proj" in html
    assert "Layers that left [2, 6] during training: 0" in html and "The base model has 87 of" in html
    assert "Under LoRA it can show only a large change" in html
