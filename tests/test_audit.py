"""The data audit: length bias against an independent Wilson interval, planted duplicates and conflicts,
the blocked neighbour search against brute force, leakage against a brute-force count, the prompt split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

import dpo_engine.analysis.audit.neighbours as neighbours
from dpo_engine.analysis.audit import audit_data, length_bias, near_neighbours, near_pairs, nearest_in
from dpo_engine.analysis.audit.findings import SplitSettings
from dpo_engine.analysis.audit.leakage import leakage
from dpo_engine.analysis.audit.thresholds import LENGTH_BIAS_MARGIN, NEAR_DUPLICATE_PROMPT_COSINE
from dpo_engine.data.split import normalise_text, split_by_group, split_pairs, split_train_eval, text_keys

DIM = 32


def _wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval written out (Wilson 1927)."""
    z = norm.ppf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("longer, shorter, ties", [(70, 30, 10), (50, 50, 0), (3, 9, 4), (40, 0, 2)])
def test_length_bias_share_interval_and_baseline(longer, shorter, ties):
    rng = np.random.default_rng(0)
    rejected = rng.integers(10, 100, longer + shorter + ties)
    diff = np.r_[rng.integers(1, 50, longer), -rng.integers(1, 50, shorter), np.zeros(ties, int)]
    lb = length_bias(rejected + diff, rejected, "characters")
    n = longer + shorter + ties
    assert (lb.chosen_longer, lb.chosen_shorter, lb.ties, lb.n_pairs) == (longer, shorter, ties, n)
    assert lb.share_chosen_longer == pytest.approx(longer / (longer + shorter))
    low, high = _wilson(longer, longer + shorter)
    assert (lb.interval.low, lb.interval.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert lb.baseline_accuracy == pytest.approx((longer + ties / 2) / n)
    t = ties / n
    assert lb.baseline_interval.low == pytest.approx((1 - t) * low + t / 2)
    assert lb.flagged == (low > 0.5 + LENGTH_BIAS_MARGIN or high < 0.5 - LENGTH_BIAS_MARGIN)
    assert sum(lb.histogram.counts) + lb.histogram.below + lb.histogram.above == n


def test_length_bias_flags_only_beyond_the_margin():
    assert length_bias(np.r_[np.full(80, 9), np.full(20, 1)], np.full(100, 5), "tokens").flagged  # 80 %
    assert not length_bias(np.r_[np.full(52, 9), np.full(48, 1)], np.full(100, 5), "tokens").flagged  # 52 %
    assert length_bias(np.full(5, 3), np.full(5, 3), "tokens").share_chosen_longer is None  # all ties


def test_normalisation_ignores_case_and_whitespace_only():
    assert normalise_text("  Hello\n\tWORLD ") == normalise_text("hello world")
    assert normalise_text("hello, world") != normalise_text("hello world")
    assert list(text_keys(["a", "B", " A", "b ", "c"])) == [0, 1, 0, 1, 2]


# ---------------------------------------------------------------- neighbour search


def _brute_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u.astype(np.float64) @ u.T.astype(np.float64)
    i, j = np.nonzero(np.triu(s, 1) >= threshold)
    return set(zip(i.tolist(), j.tolist())), s


def _planted(n: int, dim: int, seed: int) -> np.ndarray:
    """Random vectors with a tenth of them replaced by near copies of others (cosine ~0.97-1.0)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    src, dst = rng.choice(n, n // 10, replace=False), rng.choice(n, n // 10, replace=False)
    x[dst] = x[src] + rng.uniform(0.0, 0.25, (len(src), 1)).astype(np.float32) * rng.standard_normal(
        (len(src), dim)
    ).astype(np.float32)
    return x


@pytest.mark.parametrize("block_bytes", [4 * 300 * 7, neighbours.BLOCK_BYTES])
def test_blocked_search_equals_brute_force(monkeypatch, block_bytes):
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", block_bytes)  # 7 rows a block: many blocks and a ragged end
    x = _planted(300, DIM, seed=1)
    threshold = 0.9
    expected, s = _brute_pairs(x, threshold)
    i, j, c = near_pairs(x, threshold)
    got = set(zip(i.tolist(), j.tolist()))
    borderline = {(a, b) for a, b in expected ^ got if abs(s[a, b] - threshold) < 1e-5}
    assert expected ^ got == borderline and len(expected) > 20
    np.testing.assert_allclose(c, s[i, j], atol=1e-5)

    count, best, partner = near_neighbours(x, threshold)
    assert count == len(got)
    np.fill_diagonal(s, -np.inf)
    has = s.max(axis=1) >= threshold
    assert np.array_equal(partner >= 0, has)
    np.testing.assert_allclose(best[has], s.max(axis=1)[has], atol=1e-5)
    np.testing.assert_allclose(s[np.flatnonzero(has), partner[has]], s.max(axis=1)[has], atol=1e-5)

    q, b = x[:40], x[40:]
    top, where = nearest_in(q, b)
    sq = s[:40, 40:]
    np.testing.assert_allclose(top, sq.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(sq[np.arange(40), where], sq.max(axis=1), atol=1e-5)


# ---------------------------------------------------------------- duplicates and conflicts


def _clean_table(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": [f"question number {i} about topic {i * 7 % 13}?" for i in range(n)],
            "chosen": [f"a careful answer {i}" for i in range(n)],
            "rejected": [f"a careless reply {i}" for i in range(n)],
        }
    )
    emb = [rng.standard_normal((n, DIM)).astype(np.float32) for _ in range(3)]
    return table, *emb


def _counts(audit) -> dict[str, int]:
    return {f.key: f.count for f in audit.findings}


def test_a_clean_table_has_no_findings():
    table, p, c, r = _clean_table(120)
    audit = audit_data(table, prompt_emb=p, chosen_emb=c, rejected_emb=r)
    counts = _counts(audit)
    for key in ("duplicate_pair", "conflict", "identical_responses", "near_identical_responses", "duplicate_prompt"):
        assert counts[key] == 0, key
    assert counts["near_duplicate_prompt"] == 0
    assert all(lk.exact == 0 and lk.near == 0 for lk in audit.leakage.values())
    assert audit.flagged.empty


def test_planted_duplicates_conflicts_and_near_copies_are_found():
    table, p, c, r = _clean_table(100)
    # 1: exact repeat of pair 0, up to case and spacing
    table.loc[1, ["prompt", "chosen", "rejected"]] = [
        "  QUESTION number 0 about topic 0? ",
        "A careful  answer 0",
        "a careless reply 0",
    ]
    p[1] = p[0]
    # 3: pair 2 with the labels the other way round (also a shared prompt)
    table.loc[3, ["prompt", "chosen", "rejected"]] = [table.prompt[2], table.rejected[2], table.chosen[2]]
    p[3] = p[2]
    # 4: chosen = rejected; 5: chosen and rejected embeddings nearly equal
    table.loc[4, "rejected"] = table.chosen[4].upper()
    r[5] = c[5] + 0.01 * np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    # 6: a reworded prompt 7 (different text, embedding nearly equal)
    p[7] = p[6] + 0.05 * np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    audit = audit_data(table, prompt_emb=p, chosen_emb=c, rejected_emb=r)
    dup = audit.duplicates
    assert (dup.duplicate_pairs, dup.duplicate_pair_groups) == (1, 1)
    assert (dup.duplicate_prompt_pairs, dup.duplicate_prompt_groups) == (4, 2)
    assert dup.conflicts == 2 and dup.identical_responses == 1 and dup.near_identical_responses == 1
    assert (dup.near_duplicate_prompts, dup.near_duplicate_prompt_pairs, dup.near_duplicate_prompt_rows) == (2, 1, 2)
    rows = audit.flagged.groupby("finding")["row"].apply(sorted).to_dict()
    assert rows["duplicate_pair"] == [1] and rows["conflict"] == [2, 3]
    assert rows["identical_responses"] == [4] and rows["near_identical_responses"] == [5]
    assert rows["near_duplicate_prompt"] == [6, 7] and rows["duplicate_prompt"] == [0, 1, 2, 3]
    related = audit.flagged.set_index(["finding", "row"])["related_row"]
    assert (
        related["duplicate_pair", 1] == 0 and related["conflict", 2] == 3 and related["near_duplicate_prompt", 7] == 6
    )
    export = audit.flagged_with_texts(table)
    assert {"pair_id", "related_pair_id", "prompt", "chosen", "rejected"} <= set(export.columns)
    assert export.loc[export.finding == "duplicate_pair", "related_pair_id"].item() == "p0"
    json.dumps(audit.to_json_dict())  # the diagnosis.json entry is plain JSON


# ---------------------------------------------------------------- split and leakage


def _old_split(n: int, *, eval_fraction: float, min_eval_pairs: int, seed: int):
    """split_train_eval as it was before split_by existed."""
    n_eval = min(max(int(round(eval_fraction * n)), min_eval_pairs), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


@pytest.mark.parametrize("n, fraction, minimum, seed", [(40, 0.1, 8, 0), (1000, 0.2, 32, 3), (5, 0.5, 1, 7)])
def test_pair_split_is_the_old_split_and_unique_prompts_split_the_same(n, fraction, minimum, seed):
    old = _old_split(n, eval_fraction=fraction, min_eval_pairs=minimum, seed=seed)
    kwargs = dict(eval_fraction=fraction, min_eval_pairs=minimum, seed=seed)
    for got in (
        split_train_eval(n, **kwargs),
        split_pairs([f"q{i}" for i in range(n)], split_by="pair", **kwargs),
        split_pairs([f"q{i}" for i in range(n)], split_by="prompt", **kwargs),  # every group a single pair
    ):
        np.testing.assert_array_equal(got[0], old[0])
        np.testing.assert_array_equal(got[1], old[1])


def test_prompt_split_keeps_every_prompt_on_one_side():
    rng = np.random.default_rng(0)
    prompts = [f"prompt {k}" for k in rng.integers(0, 60, 500)]
    prompts = [p.upper() if i % 3 == 0 else p for i, p in enumerate(prompts)]  # same prompt, other case
    train, held = split_pairs(prompts, split_by="prompt", eval_fraction=0.1, min_eval_pairs=8, seed=1)
    keys = text_keys(prompts)
    assert not set(keys[train]) & set(keys[held])
    assert len(held) >= 50 and len(train) + len(held) == 500 and len(train) > 0
    pair_train, pair_held = split_pairs(prompts, split_by="pair", eval_fraction=0.1, min_eval_pairs=8, seed=1)
    assert set(keys[pair_train]) & set(keys[pair_held])  # the pair split leaks on the same data
    with pytest.raises(ValueError, match="same prompt"):
        split_by_group(np.zeros(10, int), eval_fraction=0.1, min_eval_pairs=2, seed=0)


@pytest.mark.parametrize("split_by", ["pair", "prompt"])
def test_leakage_equals_a_brute_force_count(split_by):
    rng = np.random.default_rng(2)
    n = 400
    base = rng.integers(0, 150, n)
    prompts = [f"prompt {k}" for k in base]
    vectors = rng.standard_normal((150, DIM)).astype(np.float32)
    vectors[100:120] = vectors[:20] + 0.05 * rng.standard_normal((20, DIM)).astype(np.float32)  # reworded
    emb = vectors[base]
    keys = text_keys(prompts)
    train, held = split_pairs(prompts, split_by=split_by, eval_fraction=0.15, min_eval_pairs=8, seed=4)
    result, flags = leakage(keys, train, held, split_by, emb)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    exact = near = 0
    for i in held:
        same = any(prompts[j] == prompts[i] for j in train)
        close = same or bool(((u[train] @ u[i]) >= NEAR_DUPLICATE_PROMPT_COSINE).any())
        exact += same
        near += close
    assert (result.exact, result.near) == (exact, near)
    assert near > 0 and (split_by == "prompt") == (exact == 0)
    assert len(flags) == near  # one row per held-out pair that leaks (exact, else near)


def test_audit_reports_both_splits_and_marks_the_one_training_uses():
    table, p, c, r = _clean_table(80)
    table.loc[40:, "prompt"] = table.prompt[:40].to_numpy()  # every prompt twice
    p[40:] = p[:40]
    audit = audit_data(table, prompt_emb=p, chosen_emb=c, rejected_emb=r, split=SplitSettings(seed=3))
    assert audit.leakage["prompt"].exact == 0 and audit.leakage["pair"].exact > 0
    titles = {f.key: f.title for f in audit.findings}
    assert "training will use" in titles["leak_exact_prompt"] and "comparison" in titles["leak_exact_pair"]


def test_diagnose_split_defaults_are_the_training_defaults():
    from dpo_engine.selection.job import DiagnoseParams
    from dpo_engine.train.config import DataConfig, OptimConfig

    d = DiagnoseParams(dataset="x")
    data = DataConfig(dataset="x")
    assert (d.split_by, d.eval_fraction, d.min_eval_pairs) == (data.split_by, data.eval_fraction, data.min_eval_pairs)
    assert data.split_seed is None and d.split_seed == OptimConfig().seed
    assert SplitSettings() == d.split_settings()


# ---------------------------------------------------------------- where it is shown


def _audit_dict() -> tuple[dict, pd.DataFrame]:
    table, p, c, r = _clean_table(60)
    table.loc[1, ["prompt", "chosen", "rejected"]] = table.loc[0, ["prompt", "chosen", "rejected"]].to_numpy()
    audit = audit_data(table, prompt_emb=p, chosen_emb=c, rejected_emb=r, token_counts=None)
    return audit.to_json_dict(), audit.flagged_with_texts(table)


def test_report_shows_the_audit_section():
    from dpo_engine.report.builder import _audit_section, _Figures

    audit, _ = _audit_dict()
    html = _audit_section(audit, _Figures())
    assert "Data audit" in html and "exact duplicate pairs" in html and "Drop the repeats" in html
    assert "Chosen minus rejected length in characters" in html
    assert "without a data audit" in _audit_section(None, _Figures())


def test_cli_diagnose_writes_the_audit_and_its_flagged_rows(workspace, tmp_path, monkeypatch):
    import dpo_engine.selection.job as job
    from dpo_engine.cli import app
    from dpo_engine.embed import PairEmbeddings

    def fake_embed(table, **_):
        rng = np.random.default_rng(0)
        e = [rng.standard_normal((len(table), DIM)).astype(np.float32) for _ in range(3)]
        return PairEmbeddings(*(x / np.linalg.norm(x, axis=1, keepdims=True) for x in e))

    monkeypatch.setattr(job, "embed_pairs", fake_embed)
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(50)]
    rows.append({"prompt": "q3", "chosen": "bad 3", "rejected": "good answer 3"})  # a conflict
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json, out_csv = tmp_path / "d.json", tmp_path / "flagged.csv"
    args = ["diagnose", str(path), "--foreground", "--no-preflight", "--bootstrap", "0"]
    result = CliRunner().invoke(
        app, [*args, "--json", str(out_json), "--audit-out", str(out_csv), "-w", str(workspace.root)]
    )
    assert result.exit_code == 0, result.output
    assert "conflicting pairs" in result.output and "chosen is the longer response" in result.output
    audit = json.loads(out_json.read_text())["audit"]
    assert audit["duplicates"]["conflicts"] == 2 and audit["length"]["characters"]["flagged"]
    flagged = pd.read_csv(out_csv)
    assert sorted(flagged.loc[flagged.finding == "conflict", "row"]) == [3, 50]
    out_jsonl = tmp_path / "flagged.jsonl"
    result = CliRunner().invoke(app, [*args, "--audit-out", str(out_jsonl), "-w", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert len(out_jsonl.read_text().splitlines()) == len(flagged)
    bad = CliRunner().invoke(app, [*args, "--split-by", "row", "-w", str(workspace.root)])
    assert bad.exit_code == 2 and "--split-by" in bad.output
