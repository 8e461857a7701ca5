"""Benchmark of dataset diagnosis through the CLI, end to end, torch against onnx-int8.

Prints numbers; it is not a test. Two parts:

1. Headline (the CLI path, measured, not extrapolated). A deterministic ``--pairs``-pair JSONL file
   (default 10,000) is diagnosed by ``python -m dpo_engine.cli diagnose FILE --foreground
   --backend torch`` and ``--backend onnx-int8`` as subprocesses, the token pre-flight and the data
   audit at their defaults. Each run gets a fresh workspace (so a cold embedding cache: every text is
   embedded); the model cache (``$DPO_KERNELS_MODEL_CACHE``, else ./workspace/models) is shared, so the
   ONNX export and the pre-flight tokenizer are warm, as after the first diagnosis on a machine. One
   untimed warm-up diagnosis of a 20-pair file per backend does the export and fills the OS file
   cache. The backends alternate (torch first in even rounds, int8 first in odd ones) for
   ``--rounds`` rounds; each run's wall seconds and CPU seconds (the child's user + system time) are
   printed, and the ratio torch / int8 of the fastest run of each.

   The file: only ~1,160 real pairs are bundled (assets/sample_hh.jsonl.gz, HH; and
   assets/pandalm_test_pairs.jsonl.gz, PandaLM), and the embedding step deduplicates texts, so
   repeating them would make a large file artificially cheap. Pair i is therefore built from two
   real pairs a (the i-th in turn) and b (a seeded random other one): each of its prompt, chosen and
   rejected texts is the first part of a's text followed by the last part of b's (split at a seeded
   word position between 30% and 70%), which keeps lengths near the real ones (mean of the two) and
   chosen/rejected related as in the real pair. Every one of the 3 x pairs texts is distinct (checked;
   a clash moves the split point), so the embedder embeds all of them.

2. Quality: every one of the eight metrics of onnx-int8 (the CLI's default batch size) within one
   bootstrap SE of float32 torch, in process, on the real HH (399 pairs) and PandaLM (760) pairs, and
   on the headline file the int8 CLI run's metrics against the torch CLI run's in that run's SE.

Finished (option, round) results are kept in ``--state`` and skipped when the script runs again
(``--fresh`` starts over; a different ``--pairs`` keeps its own entries).

Usage: python scripts/bench_diagnose.py [--pairs 10000] [--rounds 1] [--state FILE] [--skip-quality]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
DATA = {
    "hh": ASSETS / "sample_hh.jsonl.gz",
    "pandalm": ASSETS / "pandalm_test_pairs.jsonl.gz",
}
BACKENDS = ("torch", "onnx-int8")
SEED = 20261203


def real_pairs() -> list[tuple[str, str, str]]:
    """The bundled real pairs (HH, then PandaLM) as (prompt, chosen, rejected), flagged rows dropped."""
    from dpo_engine.data import load_preferences

    out = []
    for path in DATA.values():
        table, _ = load_preferences(path).finalize(drop_flagged=True)
        out.extend(zip(table["prompt"], table["chosen"], table["rejected"]))
    return out


def _splice(first: str, second: str, cut: float) -> str:
    a, b = first.split(), second.split()
    head = a[: max(1, round(len(a) * cut))]
    tail = b[min(len(b) - 1, round(len(b) * cut)) :] if b else []
    return " ".join(head + tail)


def build_pairs(n: int, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` pairs of distinct texts spliced from two real pairs each (see the module docstring)."""
    real = real_pairs()
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    rows = []
    for i in range(n):
        a = real[i % len(real)]
        for _attempt in range(50):
            b = real[int(rng.integers(len(real)))]
            cut = float(rng.uniform(0.3, 0.7))
            row = {k: _splice(x, y, cut) for k, x, y in zip(("prompt", "chosen", "rejected"), a, b)}
            texts = list(row.values())
            if len(set(texts)) == 3 and not seen.intersection(texts) and all(t.strip() for t in texts):
                break
        else:
            raise RuntimeError(f"could not build distinct texts for pair {i}")
        seen.update(texts)
        rows.append(row)
    return rows


def write_pairs(n: int, path: Path) -> dict:
    rows = build_pairs(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    texts = [t for r in rows for t in r.values()]
    real_lengths = [len(t) for p in real_pairs() for t in p]
    return {
        "n_pairs": n,
        "n_texts": len(texts),
        "n_distinct": len(set(texts)),
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "real_mean_chars": float(np.mean(real_lengths)),
    }


def run_cli(data: Path, backend: str, workspace: Path, env: dict, json_out: Path) -> dict:
    """One foreground diagnosis as a subprocess in a fresh workspace: wall and CPU seconds."""
    if workspace.exists():
        shutil.rmtree(workspace)
    cmd = [sys.executable, "-m", "dpo_engine.cli", "diagnose", str(data), "--foreground", "--backend", backend]
    cmd += ["--json", str(json_out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "DPO_KERNELS_WORKSPACE": str(workspace)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(workspace, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_avg": os.getloadavg()[0]}


def metrics_of(json_path: Path) -> tuple[dict, dict]:
    """(metrics, bootstrap SEs) of a diagnosis.json written by the CLI."""
    data = json.loads(json_path.read_text())
    metrics = {**data["kernel_metrics"], **data["divergence_metrics"]}
    return metrics, data["bootstrap"]["standard_errors"]


def quality_real_pairs() -> dict:
    """The eight metrics of int8 and float32 torch in process on the real pairs, and their SEs."""
    from dpo_engine.data import load_preferences
    from dpo_engine.embed import embed_pairs
    from dpo_engine.selection import diagnose
    from dpo_engine.selection.metrics import METRIC_NAMES

    out = {}
    for name, path in DATA.items():
        table, _ = load_preferences(path).finalize(drop_flagged=True)
        per = {}
        for option, kwargs in (
            ("torch-float32", dict(backend="torch", precision="float32")),
            ("onnx-int8", dict(backend="onnx-int8")),
        ):
            emb = embed_pairs(table, **kwargs)  # no cache_dir: always embedded
            d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=200)
            per[option] = {
                "metrics": {k: getattr(d.metrics, k) for k in METRIC_NAMES},
                "se": d.standard_errors(),
                "verdict": [d.recommendation.kernel, d.recommendation.divergence],
            }
        out[name] = per
    return out


def quality_spliced(n: int) -> dict:
    """The eight metrics of float32 torch, torch at precision "auto" (the CLI's torch run) and int8, in
    process, on the first ``n`` pairs of the benchmark file's construction (float32 is too slow for
    the whole headline file on a shared 2-core machine)."""
    import pandas as pd

    from dpo_engine.embed import embed_pairs
    from dpo_engine.selection import diagnose
    from dpo_engine.selection.metrics import METRIC_NAMES

    table = pd.DataFrame(build_pairs(n))
    out = {}
    for option, kwargs in (
        ("torch-float32", dict(backend="torch", precision="float32")),
        ("torch-auto", dict(backend="torch", precision="auto")),
        ("onnx-int8", dict(backend="onnx-int8")),
    ):
        emb = embed_pairs(table, **kwargs)
        d = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=200)
        out[option] = {"metrics": {k: getattr(d.metrics, k) for k in METRIC_NAMES}, "se": d.standard_errors()}
    return out


def worst_in_se(metrics: dict, reference: dict, se: dict) -> tuple[float, str]:
    pairs = [
        (abs(metrics[k] - reference[k]) / se[k], k)
        for k in reference
        if se.get(k) and metrics.get(k) is not None and reference.get(k) is not None
    ]
    return max(pairs) if pairs else (float("nan"), "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--state", type=Path, default=ROOT / "workspace/bench_diagnose_state.json")
    parser.add_argument("--workdir", type=Path, default=ROOT / "workspace/bench_diagnose")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --state")
    parser.add_argument("--skip-quality", action="store_true", help="skip the in-process check on the real pairs")
    parser.add_argument(
        "--spliced-quality",
        type=int,
        default=0,
        metavar="N",
        help="also compare int8 and torch auto with float32 torch in process on N spliced pairs",
    )
    args = parser.parse_args()
    state = {} if args.fresh or not args.state.is_file() else json.loads(args.state.read_text())
    args.state.parent.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.state.write_text(json.dumps(state, indent=1))

    env = dict(os.environ)
    env.setdefault("DPO_KERNELS_MODEL_CACHE", str(ROOT / "workspace/models"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cores = len(os.sched_getaffinity(0))
    print(f"load average at start: {os.getloadavg()} on {cores} CPUs", flush=True)

    data = args.workdir / f"pairs-{args.pairs}.jsonl.gz"
    key_data = f"data#{args.pairs}"
    if key_data not in state or not data.is_file():
        state[key_data] = write_pairs(args.pairs, data)
        save()
    d = state[key_data]
    print(
        f"{data}: {d['n_pairs']} pairs, {d['n_distinct']} distinct of {d['n_texts']} texts, mean "
        f"{d['mean_chars']:.0f} characters per text (real pairs: {d['real_mean_chars']:.0f})",
        flush=True,
    )
    if "warmup" not in state:
        small = args.workdir / "pairs-20.jsonl.gz"
        write_pairs(20, small)
        for backend in BACKENDS:
            r = run_cli(small, backend, args.workdir / "ws-warmup", env, args.workdir / "warmup.json")
            print(f"  warm-up {backend:<10} (export, file cache) {r['wall_s']:.1f} s", flush=True)
        state["warmup"] = True
        save()

    for round_index in range(args.rounds):
        order = BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]
        for backend in order:
            key = f"cli#{args.pairs}#{backend}#{round_index}"
            if key in state:
                continue
            json_out = args.workdir / f"diagnosis-{args.pairs}-{backend}-{round_index}.json"
            result = run_cli(data, backend, args.workdir / f"ws-{backend}-{round_index}", env, json_out)
            result["metrics"], result["se"] = metrics_of(json_out)
            state[key] = result
            save()
            print(
                f"  round {round_index + 1} {backend:<10} {result['wall_s']:7.1f} s wall {result['cpu_s']:7.1f} CPU-s "
                f"(load average {result['load_avg']:.1f})",
                flush=True,
            )

    if not args.skip_quality and "quality" not in state:
        state["quality"] = quality_real_pairs()
        save()

    key_spliced = f"spliced#{args.spliced_quality}"
    if args.spliced_quality and key_spliced not in state:
        state[key_spliced] = quality_spliced(args.spliced_quality)
        save()

    best = {}
    for backend in BACKENDS:
        runs = [state[k] for k in state if k.startswith(f"cli#{args.pairs}#{backend}#")]
        if runs:
            best[backend] = min(runs, key=lambda r: r["wall_s"])
    print()
    print(f"CLI end to end, {args.pairs} pairs ({3 * args.pairs} distinct texts), pre-flight and audit on, cold")
    print(f"embedding cache, warm model cache, {cores} CPUs; the fastest of the rounds run:")
    for backend, r in best.items():
        print(f"  {backend:<10} {r['wall_s']:7.1f} s wall  {r['cpu_s']:7.1f} CPU-s")
    if len(best) == 2:
        t, q = best["torch"], best["onnx-int8"]
        print(
            f"  torch / onnx-int8: {t['wall_s'] / q['wall_s']:.2f}x wall, {t['cpu_s'] / q['cpu_s']:.2f}x CPU (goal: 3x)"
        )
        worst, name = worst_in_se(q["metrics"], t["metrics"], t["se"])
        print(f"  metrics of the int8 run vs the torch run on this file: max |Δ| = {worst:.2f} SE ({name})")
    if "quality" in state:
        print()
        print("int8 (CLI batch size) vs float32 torch on the real pairs, in float32's bootstrap SE:")
        for name, per in state["quality"].items():
            ref, q = per["torch-float32"], per["onnx-int8"]
            worst, metric = worst_in_se(q["metrics"], ref["metrics"], ref["se"])
            print(
                f"  {name:<8} max |Δ| = {worst:.2f} SE ({metric}); verdicts {'+'.join(ref['verdict'])} | "
                f"{'+'.join(q['verdict'])}"
            )
    for key in (k for k in state if k.startswith("spliced#")):
        per = state[key]
        ref = per["torch-float32"]
        print()
        print(f"on the first {key.split('#')[1]} spliced pairs, in float32 torch's bootstrap SE:")
        for option in ("torch-auto", "onnx-int8"):
            worst, metric = worst_in_se(per[option]["metrics"], ref["metrics"], ref["se"])
            print(f"  {option:<10} max |Δ| = {worst:.2f} SE ({metric})")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
