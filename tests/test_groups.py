"""The diagnosis per category or source: each group's numbers equal those computed on the group alone,
small groups are pooled, counts add up to the whole-set audit, no column means no breakdown, and a
`source` column survives ingestion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpo_engine.analysis.audit import audit_data, length_bias, wilson_interval
from dpo_engine.analysis.audit.findings import SplitSettings
from dpo_engine.data import load_preferences
from dpo_engine.selection.groups import POOLED, group_breakdown, summary_lines
from dpo_engine.selection.metrics import METRIC_NAMES, compute_metrics, pair_quantities
from dpo_engine.viz import audit as audit_viz

DIM = 16


def _group(name: str, n: int, longer: int, start: int) -> list[dict]:
    """n pairs of one category, the first ``longer`` with the chosen response the longer one."""
    rows = []
    for i in range(n):
        k = start + i
        pad = 5 + i % 7
        chosen, rejected = f"chosen {k} " + "a" * pad, f"rejected {k} " + "b" * pad
        if i < longer:
            chosen += "a" * (3 + i % 4)
        else:
            rejected += "b" * (20 + i % 4)  # "rejected" is 2 characters longer than "chosen" already
        rows.append({"prompt": f"prompt {k % 40}", "chosen": chosen, "rejected": rejected, "category": name})
    return rows


@pytest.fixture(scope="module")
def data():
    rows = _group("chat", 100, 90, 0) + _group("safety", 60, 30, 1000) + _group("math", 5, 2, 2000)
    rows += _group("code", 3, 1, 3000)
    rows.append(dict(rows[3]))  # an exact repeat in "chat"
    swapped = dict(rows[110])  # the same comparison labelled the other way round, in "safety"
    swapped["chosen"], swapped["rejected"] = swapped["rejected"], swapped["chosen"]
    rows.append(swapped)
    table = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=(len(table), DIM)).astype(np.float32) for _ in range(3)]
    split = SplitSettings(split_by="pair", eval_fraction=0.2, min_eval_pairs=10)
    audit = audit_data(table, prompt_emb=emb[0], chosen_emb=emb[1], rejected_emb=emb[2], split=split)
    q = pair_quantities(*emb)
    return table, emb, audit, group_breakdown(table, q, audit)


def test_groups_sizes_and_pooling(data):
    table, _, _, by = data
    assert [g["name"] for g in by["groups"]] == ["chat", "safety", POOLED]
    assert [g["n_pairs"] for g in by["groups"]] == [101, 61, 8]
    assert by["pooled"] == {"math": 5, "code": 3}
    assert by["groups"][2]["pooled"] and by["groups"][2]["metrics"] is None  # under the minimum: no metrics
    assert sum(g["n_pairs"] for g in by["groups"]) == len(table)
    assert by["recommendation"] is None and by["recommendation_note"]


def test_length_bias_per_group_equals_the_subset_alone(data):
    table, _, _, by = data
    for g, expected_share in zip(by["groups"][:2], (91 / 101, 30 / 61)):
        sub = table[table["category"] == g["name"]]
        alone = length_bias(sub["chosen"].str.len().to_numpy(), sub["rejected"].str.len().to_numpy(), "characters")
        lb = g["length"]["characters"]
        assert lb["share_chosen_longer"] == pytest.approx(alone.share_chosen_longer)
        assert lb["share_chosen_longer"] == pytest.approx(expected_share)
        ci = wilson_interval(alone.chosen_longer, alone.chosen_longer + alone.chosen_shorter)
        assert (lb["interval"]["low"], lb["interval"]["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    chat, safety = by["groups"][0]["length"]["characters"], by["groups"][1]["length"]["characters"]
    assert chat["flagged"] and not safety["flagged"]


def test_metrics_per_group_equal_the_subset_alone(data):
    table, emb, _, by = data
    for g in by["groups"][:2]:
        rows = np.flatnonzero((table["category"] == g["name"]).to_numpy())
        alone = compute_metrics(pair_quantities(*(e[rows] for e in emb)))
        assert list(g["metrics"]) == list(METRIC_NAMES)
        for name in METRIC_NAMES:
            expected = getattr(alone, name)
            assert g["metrics"][name] == (None if expected is None else pytest.approx(expected, rel=1e-9, abs=1e-12))


def test_counts_add_up_to_the_whole_set_audit(data):
    _, _, audit, by = data
    counts = {k: sum(g["counts"][k] for g in by["groups"]) for k in by["groups"][0]["counts"]}
    assert counts["duplicate_pair"] == audit.duplicates.duplicate_pairs == 1
    assert by["groups"][0]["counts"]["duplicate_pair"] == 1
    assert counts["conflict"] == audit.duplicates.conflicts and by["groups"][1]["counts"]["conflict"] >= 1
    assert by["groups"][0]["counts"]["conflict"] == 0
    lk = audit.leakage["pair"]
    assert sum(g["leakage"]["held_out"] for g in by["groups"]) == lk.n_held_out
    assert sum(g["leakage"]["exact"] for g in by["groups"]) == lk.exact > 0
    assert sum(g["leakage"]["near"] for g in by["groups"]) == lk.near


def test_no_category_or_one_category_gives_no_breakdown(data):
    table, emb, audit, _ = data
    q = pair_quantities(*emb)
    assert group_breakdown(table.drop(columns="category"), q, audit) is None
    assert group_breakdown(table.assign(category="all"), q, audit) is None


def test_table_figure_and_cli_lines(data):
    *_, by = data
    frame = audit_viz.group_table(by)
    assert frame["group"].tolist() == ["chat", "safety", POOLED] and frame["pairs"].tolist() == [101, 61, 8]
    assert {"pnd", "smoothness", "conflicts", "95% interval"} <= set(frame.columns)
    assert audit_viz.group_length_figure(by) is not None
    assert "math (5)" in audit_viz.pooled_note(by)
    lines = summary_lines(by)
    assert any(line.strip().startswith("chat") for line in lines) and "math (5)" in "\n".join(lines)


def test_a_source_column_survives_ingestion():
    csv = "prompt,chosen,rejected,source\nq1,good one,bad,forum\nq2,fine answer,worse,exam\n".encode()
    result = load_preferences(csv, filename="pairs.csv")
    assert result.report.mapping.get("category") == "source"
    kept, _ = result.finalize(drop_flagged=True)
    assert kept["category"].tolist() == ["forum", "exam"]


def test_report_section_shows_the_groups_only_when_there_are_some(data):
    from dpo_engine.report.builder import _audit_section, _Figures

    _, _, audit, by = data
    plain = audit.to_json_dict()
    assert "Per group" not in _audit_section(plain, _Figures())
    html = _audit_section(plain | {"by_group": by}, _Figures())
    assert "Per group" in html and "Length bias per group" in html and "other (pooled)" in html


def test_cli_diagnose_shows_the_groups_of_a_source_column(workspace, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import dpo_engine.selection.job as job
    from dpo_engine.cli import app
    from dpo_engine.embed import PairEmbeddings

    def fake_embed(table, **_):
        rng = np.random.default_rng(0)
        e = [rng.standard_normal((len(table), DIM)).astype(np.float32) for _ in range(3)]
        return PairEmbeddings(*(x / np.linalg.norm(x, axis=1, keepdims=True) for x in e))

    monkeypatch.setattr(job, "embed_pairs", fake_embed)
    rows = [
        {"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}", "source": "web" if i < 30 else "exam"}
        for i in range(55)
    ]
    args = ["--foreground", "--no-preflight", "--bootstrap", "0", "-w", str(workspace.root)]
    for with_source in (True, False):
        path, out = tmp_path / f"pairs-{with_source}.jsonl", tmp_path / f"d-{with_source}.json"
        kept = rows if with_source else [{k: v for k, v in r.items() if k != "source"} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        result = CliRunner().invoke(app, ["diagnose", str(path), *args, "--json", str(out)])
        assert result.exit_code == 0, result.output
        audit = json.loads(out.read_text())["audit"]
        if with_source:
            assert "by group" in result.output and "exam" in result.output
            assert [(g["name"], g["n_pairs"]) for g in audit["by_group"]["groups"]] == [("web", 30), ("exam", 25)]
        else:
            assert "by group" not in result.output and "by_group" not in audit
