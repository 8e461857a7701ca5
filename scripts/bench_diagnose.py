"""Benchmark of dataset diagnosis, end to end, per encoder option, on the real text that is here.

Prints numbers; it is not a test. For every option the script diagnoses the shared HH sample
(399 pairs) and the PandaLM set (760 pairs, many repeated prompts) from a cold embedding cache:
embedding (deduplicated, length-sorted batches) + the eight metrics + 200 bootstrap resamples.
Model loading (and, for ONNX, the one-time local export) is timed apart. Rows:

- baseline: the pipeline before this benchmark's options (torch sentence-transformers,
  precision "auto" = bfloat16 on CPUs with native bf16, float32 elsewhere, batches of 64);
  the default is now onnx-int8 in token-sorted batches of 8, the fastest row within 1 SE;
- the options: torch float32, ONNX Runtime float32, ONNX Runtime int8 (dynamic, per-channel),
  int8 with max_seq_length 128 (the length all-MiniLM-L6-v2 was trained with), batch sizes,
  one thread; plus what deduplication saves (texts embedded vs texts submitted).

For each option: CPU seconds of this process (all its threads; on a shared machine the fair
measure) and wall seconds, texts/s (texts submitted per second), the speed-up over the baseline,
and the largest difference of any of the eight metrics from the float32 torch reference, in that
metric's bootstrap SE ("within 1 SE" is
the bar for making an option the default). The options run in alternating order, ``--rounds``
times, and each keeps its fastest round, so a busy shared machine hurts every option alike.
Finished (option, round) results are kept in ``--state`` and skipped when the script is run again.

The 10,000-pair cold time is an *extrapolation*: there are only 1,159 real pairs here; it takes
the measured unique texts per CPU-second times the cores, assumes 30,000 distinct texts (no
duplicates) on an idle machine, adds the model load and the measured metrics + bootstrap time of
10,000 pairs (random 384-d embeddings).

Usage: python scripts/bench_diagnose.py [--rounds 2] [--options a,b,...] [--state FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from dpo_engine.data import load_preferences
from dpo_engine.embed import embed_pairs, load_embedder
from dpo_engine.embed import encoder as encoder_module
from dpo_engine.selection import diagnose
from dpo_engine.selection.metrics import METRIC_NAMES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DATA = {
    "hh": ASSETS / "sample_hh.jsonl.gz",
    "pandalm": ASSETS / "pandalm_test_pairs.jsonl.gz",
}
OPTIONS: dict[str, dict] = {
    "baseline": dict(backend="torch", precision="auto", batch_size=64),
    "torch-float32": dict(backend="torch", precision="float32", batch_size=64),
    "onnx": dict(backend="onnx", batch_size=64),
    "onnx-int8": dict(backend="onnx-int8", batch_size=64),
    "onnx-int8-b8": dict(backend="onnx-int8", batch_size=8),
    "onnx-int8-b16": dict(backend="onnx-int8", batch_size=16),
    "onnx-int8-b32": dict(backend="onnx-int8", batch_size=32),
    "onnx-int8-b128": dict(backend="onnx-int8", batch_size=128),
    "onnx-int8-len128": dict(backend="onnx-int8", batch_size=64, max_seq_length=128),
    "onnx-int8-len128-b16": dict(backend="onnx-int8", batch_size=16, max_seq_length=128),
    "torch-auto-1thread": dict(backend="torch", precision="auto", batch_size=64, threads=1),
}
REFERENCE = "torch-float32"


def _tables() -> dict:
    out = {}
    for name, path in DATA.items():
        table, _ = load_preferences(path).finalize(drop_flagged=True)
        out[name] = table[["prompt", "chosen", "rejected"]].reset_index(drop=True)
    return out


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _run_option(name: str, spec: dict, tables: dict) -> dict:
    spec = dict(spec)
    threads = spec.pop("threads", None)
    encoder_module._models.clear()  # cold model: load (and export, the first time) is timed
    kwargs = {k: v for k, v in spec.items() if k != "batch_size"}
    started = time.perf_counter()
    load_embedder(**kwargs)
    load_s = time.perf_counter() - started
    _set_threads(threads)  # after loading, which sets every core
    result = {"load_s": load_s, "datasets": {}}
    for data_name, table in tables.items():
        texts = [*table["prompt"], *table["chosen"], *table["rejected"]]
        n_unique = len(set(texts))
        t0, c0 = time.perf_counter(), time.process_time()
        emb = embed_pairs(table, batch_size=spec["batch_size"], **kwargs)  # no cache_dir: always cold
        t1, c1 = time.perf_counter(), time.process_time()
        d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=200)
        t2, c2 = time.perf_counter(), time.process_time()
        result["datasets"][data_name] = {
            "n_pairs": len(table),
            "n_texts": len(texts),
            "n_unique": n_unique,
            "embed_s": t1 - t0,
            "metrics_s": t2 - t1,
            "wall_s": t2 - t0,
            "embed_cpu_s": c1 - c0,
            "cpu_s": c2 - c0,
            "metrics": {k: getattr(d.metrics, k) for k in METRIC_NAMES},
            "se": d.standard_errors(),
            "verdict": [d.recommendation.kernel, d.recommendation.divergence],
            "chosen_embeddings_head": emb.chosen[:50].tolist(),
        }
    _set_threads(None)
    return result


def _metrics_time_10k() -> float:
    rng = np.random.default_rng(0)

    def unit() -> np.ndarray:
        x = rng.standard_normal((10_000, 384), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    p, c, r = unit(), unit(), unit()
    t0 = time.perf_counter()
    diagnose(p, c, r, n_bootstrap=200)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset of: " + ", ".join(OPTIONS))
    parser.add_argument("--state", type=Path, default=Path("workspace/bench_diagnose_state.json"))
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --state")
    args = parser.parse_args()
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for needed in ("baseline", REFERENCE):
        if needed not in names:
            names.insert(0, needed)
    state = {} if args.fresh or not args.state.is_file() else json.loads(args.state.read_text())
    args.state.parent.mkdir(parents=True, exist_ok=True)
    tables = _tables()
    print(f"load average at start: {os.getloadavg()} on {len(os.sched_getaffinity(0))} CPUs")
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            key = f"{name}#{round_index}"
            if key in state:
                continue
            state[key] = _run_option(name, OPTIONS[name], tables)
            args.state.write_text(json.dumps(state))
            walls = ", ".join(
                f"{d}: {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} CPU-s" for d, v in state[key]["datasets"].items()
            )
            print(f"  round {round_index + 1} {name:<20} load {state[key]['load_s']:.1f} s; {walls}", flush=True)
    if "metrics_10k_s" not in state:
        state["metrics_10k_s"] = _metrics_time_10k()
        args.state.write_text(json.dumps(state))

    best = {}
    for name in names:
        runs = [state[f"{name}#{i}"] for i in range(args.rounds) if f"{name}#{i}" in state]
        best[name] = min(runs, key=lambda r: sum(d["cpu_s"] for d in r["datasets"].values()))
    ref = best[REFERENCE]["datasets"]
    base = best["baseline"]["datasets"]
    base_cpu = sum(d["cpu_s"] for d in base.values())
    base_wall = sum(d["wall_s"] for d in base.values())
    cores = len(os.sched_getaffinity(0))
    print()
    print("end to end from a cold embedding cache (model loaded), HH + PandaLM, the round with the least CPU time.")
    print(
        "CPU-s = this process's CPU seconds (all threads): on a shared machine the fairer measure; wall s on "
        f"{cores} cores."
    )
    header = (
        f"{'option':<20} {'CPU-s':>7} {'wall s':>7} {'speed-up CPU':>12} {'speed-up wall':>13} {'texts/CPU-s':>11} "
        f"{'texts/s':>8} {'load s':>7} {'max |Δ|/SE':>10}  verdicts HH | PandaLM"
    )
    print(header)
    print("-" * len(header))
    rates = {}
    for name in names:
        r = best[name]
        ds = r["datasets"]
        cpu = sum(d["cpu_s"] for d in ds.values())
        wall = sum(d["wall_s"] for d in ds.values())
        n_texts = sum(d["n_texts"] for d in ds.values())
        n_unique = sum(d["n_unique"] for d in ds.values())
        rates[name] = n_unique / sum(d["embed_cpu_s"] for d in ds.values())  # unique texts per CPU-second
        worst = max(
            abs(d["metrics"][k] - ref[dn]["metrics"][k]) / ref[dn]["se"][k]
            for dn, d in ds.items()
            for k in METRIC_NAMES
            if ref[dn]["se"].get(k)
        )
        verdicts = " | ".join("+".join(d["verdict"]) for d in ds.values())
        print(
            f"{name:<20} {cpu:>7.1f} {wall:>7.1f} {base_cpu / cpu:>11.2f}x {base_wall / wall:>12.2f}x "
            f"{n_texts / cpu:>11.1f} {n_texts / wall:>8.1f} {r['load_s']:>7.1f} {worst:>10.2f}  {verdicts}"
        )
    print()
    print("metric values per option (HH / PandaLM); the reference's bootstrap SE in the last row")
    short = {"support_overlap": "overlap", "drift_magnitude": "drift", "smoothness": "smooth"}
    print(f"{'option':<20} " + " ".join(f"{short.get(k, k):>15}" for k in METRIC_NAMES))
    for name in names:
        ds = best[name]["datasets"]
        print(
            f"{name:<20} "
            + " ".join(f"{ds['hh']['metrics'][k]:>7.3f}/{ds['pandalm']['metrics'][k]:<7.3f}" for k in METRIC_NAMES)
        )
    print(
        f"{'SE (' + REFERENCE + ')':<20} "
        + " ".join(f"{ref['hh']['se'][k]:>7.3f}/{ref['pandalm']['se'][k]:<7.3f}" for k in METRIC_NAMES)
    )
    d_hh, d_pl = base["hh"], base["pandalm"]
    print()
    print(
        f"deduplication: HH {d_hh['n_unique']} unique of {d_hh['n_texts']} texts, PandaLM {d_pl['n_unique']} of "
        f"{d_pl['n_texts']} (every option embeds each distinct text once; without it PandaLM would embed "
        f"{d_pl['n_texts'] / d_pl['n_unique']:.2f}x as many)"
    )
    print(f"metrics + 200 bootstrap resamples of 10,000 pairs: {state['metrics_10k_s']:.1f} s")
    print(
        f"EXTRAPOLATED, not measured: 10,000 distinct pairs (30,000 texts) cold on {cores} idle cores = model load + "
        "30,000 / (unique texts per CPU-second x cores) + metrics:"
    )
    # every option starts a process, imports torch and sentence-transformers and loads the model: the
    # first load of the run (a cold process) stands for all of them
    cold_load = max(state[k]["load_s"] for k in state if "#" in k)
    print(f"  (model load in a cold process, measured once: {cold_load:.1f} s)")
    for name in names:
        per_core = rates[name]
        threads = OPTIONS[name].get("threads") or cores
        cold = cold_load + 30_000 / (per_core * threads) + state["metrics_10k_s"]
        print(f"  {name:<20} ~{cold:.0f} s  ({per_core:.1f} unique texts per CPU-second measured here)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
