"""scripts/bench_gpu.py --smoke on CPU: the table a maintainer reads, resuming, and the section it writes."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # two training processes

SCRIPT = REPO_ROOT / "scripts" / "bench_gpu.py"
COLUMNS = [
    "size",
    "run",
    "grad ckpt",
    "setup s",
    "step s p50",
    "step s p90",
    "pair tok/s",
    "pair tok/step",
    "computed tok/step",
    "padding",
    "ref tok/step",
    "MFU",
    "setup peak GB",
    "steps peak GB",
]


def smoke(tmp_path, doc):
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--sizes", "tiny", "--methods", "dpo", "--threads", "1"]
    cmd += ["--out", str(tmp_path / "out"), "--write", "--doc", str(doc)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def rows(out: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    table = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), ln
        table[cells[1]] = dict(zip(COLUMNS, cells))
    return table


def number(cell: str) -> float:
    value = float(cell.replace(",", "").removesuffix(" RSS").removesuffix("%"))
    assert math.isfinite(value), cell
    return value


def test_smoke_prints_the_table_resumes_and_writes_its_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nWhat comes before stays.\n")
    out = smoke(tmp_path, doc)
    assert "torch" in out and "attention" in out and "weights float32" in out
    table = rows(out)
    trl = importlib.util.find_spec("trl") is not None  # the peer runs beside ours when the extra is installed
    expected = {"ours-dpo-cold", "ours-dpo-warm"} | ({"trl-default", "trl-fast"} if trl else set())
    assert set(table) == expected
    for run, row in table.items():
        assert row["size"] == "tiny"
        for col in ("setup s", "step s p50", "step s p90", "pair tok/s", "pair tok/step", "computed tok/step"):
            assert number(row[col]) > 0, (run, col, row[col])
        assert number(row["step s p90"]) >= number(row["step s p50"])
        assert 0 <= number(row["padding"]) < 100
        assert row["MFU"] == "n/a"  # CPU: no peak FLOPS to divide by
        assert number(row["setup peak GB"]) > 0 and number(row["steps peak GB"]) > 0
    # cold runs the reference in its steps; warm reads what the cold run cached
    assert number(table["ours-dpo-cold"]["ref tok/step"]) > 0
    assert number(table["ours-dpo-warm"]["ref tok/step"]) == 0
    assert table["ours-dpo-cold"]["pair tok/step"] == table["ours-dpo-warm"]["pair tok/step"]
    if not trl:
        assert "trl-default: skipped, TRL is not installed" in out
    assert (tmp_path / "out" / "results" / "tiny" / "ours-dpo-warm.json").is_file()

    again = smoke(tmp_path, doc)  # finished runs are read back, and the section is replaced, not added
    assert again.count("done before") == len(expected)
    assert rows(again) == table
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nWhat comes before stays.\n")
    assert text.count("## On one GPU") == 1 and text.count("| tiny | ours-dpo-cold |") == 1


def test_the_gpu_plan_puts_flex_attention_beside_sdpa_on_the_warm_cache():
    """On a GPU the first method's warm run is repeated with flex_attention on the same workspace, and
    a missing cache sends it back to that method's cold run."""
    spec = importlib.util.spec_from_file_location("bench_gpu_plan", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = type("Args", (), {})()
    args.out, args.sizes, args.methods, args.smoke, args.no_peer = "out", ["135m"], None, False, True
    args.warmup = args.steps = None
    args.device, args.batch_size, args.max_length, args.calibration_pairs, args.threads = "cuda", 8, 512, 256, 1
    args.attention = ["sdpa", "flex_attention"]
    runs = {r["run"]: r for r in bench.plan(args)}
    flex = runs["ours-dpo-flex-warm"]
    assert flex["attention"] == "flex_attention" and flex["cold"] == "ours-dpo-cold"
    assert flex["workspace"] == runs["ours-dpo-warm"]["workspace"] == runs["ours-dpo-cold"]["workspace"]
    assert not any(r.get("attention") for name, r in runs.items() if name != "ours-dpo-flex-warm")
    args.attention = ["sdpa"]
    assert "ours-dpo-flex-warm" not in {r["run"] for r in bench.plan(args)}


def test_the_token_counter_reads_every_mask_form():
    """A padding mask is counted; a dense or flex_attention block mask leaves padding to the step."""
    import torch

    from dpo_engine.data.tokenize import TokenizedPair
    from dpo_engine.train.data import collate_packed, packed_attention_mask, packed_block_mask

    spec = importlib.util.spec_from_file_location("bench_gpu_counter", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counter = bench.TokenCounter(torch.nn.Identity())
    batch = collate_packed([TokenizedPair("a", [1, 2], [3], [4, 5]), TokenizedPair("b", [6], [7, 8], [9])], 0)
    ids = batch.input_ids
    counter._count(None, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert counter.take() == {"computed": ids.numel(), "padding": 0, "reference": 0}
    for mask in (packed_attention_mask(batch.segment, batch.owner), packed_block_mask(batch.segment, batch.owner)):
        counter._count(None, (), {"input_ids": ids, "attention_mask": mask})
        assert counter.take() == {"computed": ids.numel(), "padding": None, "reference": 0}
