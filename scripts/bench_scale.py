"""What users bring, measured on CPU: a ~1.1B-parameter model and a 100k-pair file.

Each part is a training run in a subprocess (`dpo-kernels train --foreground`) whose process tree's
resident memory is sampled every 0.1 s:

- `model-1b`: a Llama with TinyLlama-1.1B's shapes and random bf16 weights (built once from a config,
  dpo_engine/models/synthetic.py), LoRA, `--dtype bfloat16`, max_length 256, batch 2, on the bundled
  HH sample. Goal: peak RSS at most 1.5x the bf16 weight bytes + 1.5 GB.
- `pairs-100k`: the bundled sample repeated as 100,000 tagged variants, the tiny model, default
  settings, 20 steps, the workspace's token and reference caches emptied first (cold). Goals: setup
  + evaluation at most 25 % of the wall time; tokenisation under 60 s. `pairs-100k-warm` runs it
  again on what the cold run cached.
- `estimate`: the memory estimate of `train --dry-run` beside the measured peak, for SmolLM2-135M
  (fp32) and the 1.1B model (bf16, LoRA) at two lengths each, batch 2. Goal: within 15 %.

Results go to <out>/<part>.json; a finished part is skipped unless --force. The table it prints goes
into docs/BENCHMARKS.md ("At the scale users train").

    python scripts/bench_scale.py [--parts model-1b pairs-100k pairs-100k-warm estimate]
        [--out build/bench_scale] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpo_engine.data.file_cache import CACHE_DIR as FILE_CACHE_DIR  # noqa: E402
from dpo_engine.data.token_cache import CACHE_DIR as TOKEN_CACHE_DIR  # noqa: E402
from dpo_engine.models.synthetic import build_random_llama, llama_parameter_count  # noqa: E402
from dpo_engine.train.reference import CACHE_DIR  # noqa: E402
from dpo_engine.workspace import Workspace  # noqa: E402

HH_SAMPLE = REPO / "assets" / "sample_hh.jsonl.gz"
GiB = 1024**3


class PeakRSS:
    """The largest resident set of a process and its children, sampled in a thread (the process's own
    peak, which sampling can miss, comes from the kernel when it ends)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_train(args: list[str], run_dir: Path, workspace: Path, log_path: Path) -> dict:
    """One foreground training run; its summary.json, wall time and peak RSS of the process tree."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dpo_engine.cli", "train", *args, "--foreground", "-w", str(workspace)]
    cmd += ["--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = PeakRSS(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # the kernel's own peak for this process (ru_maxrss, KiB)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    peak = max(sampler.stop(), usage.ru_maxrss * 1024)
    wall = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        raise SystemExit(f"training run failed (exit {rc}); see {log_path}")
    return {"summary": json.loads(summary_path.read_text()), "wall_s": wall, "peak_rss_bytes": peak}


def part_model_1b(out: Path) -> dict:
    workspace = out / "ws"
    ws = Workspace.resolve(workspace)
    print("building the 1.1B random-weight model (once) ...", flush=True)
    model_dir = build_random_llama("llama-1b", out / "models" / "llama-1b", workspace=ws)
    weight_bytes = 2 * llama_parameter_count("llama-1b")
    args = [str(HH_SAMPLE), "--model", str(model_dir), "--dtype", "bfloat16", "--max-length", "256"]
    args += ["--batch-size", "2", "--max-steps", "3", "--calibration-pairs", "8", "--eval-max-pairs", "8"]
    args += ["--eval-every", "100", "--divergence-pairs", "2", "--probe-pairs", "8", "--htsr", "off"]
    # cache cold: the calibration's reference pass is part of what is measured
    shutil.rmtree(workspace / CACHE_DIR, ignore_errors=True)
    print("training 3 steps of the 1.1B model (bf16, LoRA), reference cache cold ...", flush=True)
    result = run_train(args, workspace / "runs" / "model-1b", workspace, out / "model-1b.log")
    goal = 1.5 * weight_bytes + 1.5 * GiB
    return {
        **result,
        "parameters": llama_parameter_count("llama-1b"),
        "weight_bytes_bf16": weight_bytes,
        "goal_peak_bytes": goal,
        "meets_goal": result["peak_rss_bytes"] <= goal,
    }


def hundred_thousand_pairs(path: Path, n: int = 100_000) -> Path:
    """The bundled sample repeated as n pairs, each repeat tagged so no two pairs are identical."""
    if path.is_file():
        return path
    rows = [json.loads(line) for line in gzip.open(HH_SAMPLE, "rt")]
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as fh:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            tag = f" (variant {i // len(rows)})"
            row = {k: (v + tag if isinstance(v, str) else v) for k, v in row.items()}
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def part_pairs_100k(out: Path, *, warm: bool = False) -> dict:
    """Cold: the workspace's file, token and reference caches emptied first (the first run on a dataset);
    warm: the same run again, reading what the cold run cached."""
    data = hundred_thousand_pairs(out / "pairs_100k.jsonl.gz")
    args = [str(data), "--model", "tiny-random", "--max-steps", "20"]
    name = "pairs-100k-warm" if warm else "pairs-100k"
    if not warm:
        for cache in (FILE_CACHE_DIR, TOKEN_CACHE_DIR, CACHE_DIR):
            shutil.rmtree(out / "ws" / cache, ignore_errors=True)
    print(f"training 20 steps of the tiny model on 100,000 pairs ({'warm' if warm else 'cold'} caches) ...", flush=True)
    result = run_train(args, out / "ws" / "runs" / name, out / "ws", out / f"{name}.log")
    split = result["summary"].get("time_split_s") or {}
    overhead = sum(v for k, v in split.items() if k != "train")
    return {
        **result,
        "setup_and_eval_share": overhead / result["wall_s"],
        "tokenise_s": split.get("tokenise"),
        "meets_goal": overhead / result["wall_s"] <= 0.25 and (split.get("tokenise") or 0) < 60,
    }


# (model, max_length) settings whose measured peak is set beside the memory estimate.
ESTIMATE_SETTINGS = (
    ("smollm2-135m-instruct", 128),
    ("smollm2-135m-instruct", 512),
    ("llama-1b", 128),
    ("llama-1b", 256),
)


def _estimate_config(out: Path, ws: Workspace, model: str, length: int):
    from dpo_engine.train.config import TrainConfig

    name = (
        str(build_random_llama("llama-1b", out / "models" / "llama-1b", workspace=ws)) if model == "llama-1b" else model
    )
    dtype = "bfloat16" if model == "llama-1b" else "float32"
    return TrainConfig.model_validate(
        {
            "data": {"dataset": str(HH_SAMPLE), "max_length": length, "max_prompt_length": length // 2},
            "model": {"name": name, "dtype": dtype},
            "optimisation": {"batch_size": 2},
        }
    )


def part_estimate(out: Path) -> dict:
    """Measured peaks of the settings the memory estimate is checked on (the estimate itself is
    computed when the table is printed, so a change of its constants needs no new measurement)."""
    workspace = out / "ws"
    ws = Workspace.resolve(workspace)
    rows = []
    for model, length in ESTIMATE_SETTINGS:
        cfg = _estimate_config(out, ws, model, length)
        args = [str(HH_SAMPLE), "--model", cfg.model.name, "--dtype", cfg.model.dtype, "--max-length", str(length)]
        args += ["--max-prompt-length", str(length // 2), "--batch-size", "2", "--max-steps", "2"]
        args += ["--calibration-pairs", "4", "--eval-max-pairs", "4", "--eval-every", "100", "--divergence-pairs", "2"]
        args += ["--probe-pairs", "4", "--htsr", "off", "--no-pack-pairs"]
        shutil.rmtree(workspace / CACHE_DIR, ignore_errors=True)
        print(f"training 2 steps of {model} at max_length {length} ...", flush=True)
        result = run_train(args, workspace / "runs" / f"estimate-{model}-{length}", workspace, out / "estimate.log")
        rows.append({"model": model, "max_length": length, "measured_peak_bytes": result["peak_rss_bytes"]})
    return {"rows": rows}


PARTS = {
    "model-1b": part_model_1b,
    "pairs-100k": part_pairs_100k,
    "pairs-100k-warm": lambda out: part_pairs_100k(out, warm=True),
    "estimate": part_estimate,
}


def report(out: Path) -> None:
    print("\n| part | wall s | peak RSS GB | time split s | goal | met |\n|---|---|---|---|---|---|")
    for name in PARTS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        if name == "estimate":
            continue
        split = r["summary"].get("time_split_s") or {}
        split_text = ", ".join(f"{k} {v:.0f}" for k, v in split.items())
        if name == "model-1b":
            weights, limit = r["weight_bytes_bf16"] / 1e9, r["goal_peak_bytes"] / 1e9
            goal = f"peak <= 1.5 x {weights:.2f} GB + 1.5 GiB = {limit:.2f} GB"
        else:
            goal = f"setup+eval share {r['setup_and_eval_share']:.0%} <= 25 %, tokenise < 60 s"
        print(
            f"| {name} | {r['wall_s']:.0f} | {r['peak_rss_bytes'] / 1e9:.2f} | {split_text} | {goal} | "
            f"{'yes' if r['meets_goal'] else 'no'} |"
        )


def report_estimate(out: Path) -> None:
    from dpo_engine.train.inputs import memory_estimate

    path = out / "estimate.json"
    if not path.is_file():
        return
    ws = Workspace.resolve(out / "ws")
    print("\n| model | dtype | max_length | estimate GiB | measured peak GiB | error | within 15 % |")
    print("|---|---|---|---|---|---|---|")
    for r in json.loads(path.read_text())["rows"]:
        cfg = _estimate_config(out, ws, r["model"], r["max_length"])
        estimate = memory_estimate(cfg, ws, "cpu").total
        error = estimate / r["measured_peak_bytes"] - 1
        print(
            f"| {r['model']} | {cfg.model.dtype} | {r['max_length']} | {estimate / GiB:.2f} | "
            f"{r['measured_peak_bytes'] / GiB:.2f} | {error:+.0%} | {'yes' if abs(error) <= 0.15 else 'no'} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--out", default=str(REPO / "build" / "bench_scale"))
    p.add_argument("--force", action="store_true", help="rerun parts that already have a result")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.parts:
        path = out / f"{name}.json"
        if path.is_file() and not args.force:
            print(f"{name}: done before ({path}); --force reruns it", flush=True)
            continue
        result = PARTS[name](out)
        path.write_text(json.dumps(result, indent=1))
        if "wall_s" in result:  # the estimate part's rows carry their own peaks
            print(
                f"{name}: wall {result['wall_s']:.0f} s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True
            )
    report(out)
    report_estimate(out)


if __name__ == "__main__":
    main()
