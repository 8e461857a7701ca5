"""Benchmark the training step of every kernel and divergence against plain DPO, and learning on real data.

Speed mode (default): each configuration runs in its own process (so peak memory is its own) on the
same pairs, seed and model, times `--steps` optimiser steps after `--warmup` untimed ones, and reports
step time and peak memory as ratios to plain DPO (kernel none, gamma 0, divergence none).
Learning mode (--learning): LoRA on the HH sample, HMK + a divergence vs plain DPO with the same
steps and seed; held-out reward accuracy and Davies-Bouldin score at the start and the end.

    .venv/bin/python scripts/bench_train.py --steps 3 --max-length 256
    .venv/bin/python scripts/bench_train.py --learning --steps 20
    .venv/bin/python scripts/bench_train.py --wall-split --steps 20 --batch-size 4   # time outside the step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HH_SAMPLE = REPO / "assets" / "sample_hh.jsonl.gz"

from dpo_engine.names import ALL_DIVERGENCES  # noqa: E402 (after the path insert)

KERNELS = ("rbf", "polynomial", "spectral", "mahalanobis", "mixture", "hmk")


def variants() -> dict[str, dict]:
    plain = {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}}
    out = {"dpo": plain}
    for k in KERNELS:
        out[f"kernel:{k}"] = {"kernel": {"name": k}, "divergence": {"name": "none"}, "loss": {"gamma": 0.5}}
    for d in ALL_DIVERGENCES:
        out[f"div:{d}"] = {"kernel": {"name": "none"}, "divergence": {"name": d, "alpha": 0.1}, "loss": {"gamma": 0.0}}
    return out


def base_config(args, method: dict, dataset: str) -> dict:
    return {
        "data": {"dataset": dataset, "max_length": args.max_length, "max_pairs": args.pairs, "min_eval_pairs": 8},
        "model": {"name": args.model, "lora": True},
        "method": {**method, "calibration_pairs": 32},
        "optimisation": {"max_steps": args.steps + args.warmup, "batch_size": args.batch_size, "seed": 0},
        "monitoring": {"htsr": False, "eval_divergences": False, "probe_pairs": 16},
    }


def one_variant(args) -> None:
    """Child process: set up, run warm-up steps, time the rest, print one JSON line."""
    import psutil
    import torch

    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import DPOTrainer
    from dpo_engine.workspace import Workspace

    torch.set_num_threads(args.threads)
    method = variants()[args.variant]
    cfg = TrainConfig.model_validate(base_config(args, method, str(HH_SAMPLE)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DPOTrainer(cfg, tmp, workspace=Workspace.resolve(args.workspace), log=lambda m: None)
        trainer.setup()
        for _ in range(args.warmup):
            trainer.step.run()
        rss_before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.step.run()
        step_s = (time.perf_counter() - t0) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "variant": args.variant,
                "step_s": step_s,
                "peak_rss_mb": peak / 2**20,
                "step_increment_mb": max(peak - rss_before, 0) / 2**20,
            }
        )
    )


def speed(args) -> None:
    rows = []
    for name in variants():
        if args.only and name not in args.only:
            continue
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--max-length",
            str(args.max_length),
            "--batch-size",
            str(args.batch_size),
            "--model",
            args.model,
            "--pairs",
            str(args.pairs),
            "--workspace",
            args.workspace,
            "--threads",
            str(args.threads),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not line:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["variant"] == "dpo"), None)
    if base is None:
        return
    print(f"\n{'variant':<20}{'step s':>9}{'time x':>8}{'peak MB':>9}{'mem x':>7}  target")
    for r in rows:
        target = (
            1.0
            if r["variant"] == "dpo"
            else 1.5
            if r["variant"] == "div:wasserstein"
            else 1.3
            if r["variant"].startswith("div:")
            else 1.15
        )
        tx = r["step_s"] / base["step_s"]
        mx = r["peak_rss_mb"] / base["peak_rss_mb"]
        flag = "" if r["variant"] == "dpo" else ("ok" if tx <= target and mx <= 1.2 else "OVER")
        print(
            f"{r['variant']:<20}{r['step_s']:>9.2f}{tx:>8.2f}{r['peak_rss_mb']:>9.0f}{mx:>7.2f}  <= {target:.2f}x "
            f"{flag}"
        )


def learning(args) -> None:
    import torch

    from dpo_engine import rundir
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import train
    from dpo_engine.workspace import Workspace

    torch.set_num_threads(args.threads)
    ws = Workspace.resolve(args.workspace)
    methods = {
        "dpo": {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}},
        f"hmk+{args.divergence}": {
            "kernel": {"name": "hmk"},
            "divergence": {"name": args.divergence, "alpha": 0.1},
            "loss": {"gamma": 0.5},
        },
    }
    for name, method in methods.items():
        if args.methods and name.split("+")[0] not in args.methods:
            continue
        raw = base_config(args, method, str(HH_SAMPLE))
        raw["optimisation"].update(max_steps=args.steps)
        raw["monitoring"].update(
            eval_every=args.steps, snapshot_every=args.steps, probe_pairs=32, checkpoint_every=args.steps
        )
        raw["data"]["min_eval_pairs"] = 32
        out = Path(args.out) / name.replace("+", "_")
        t0 = time.perf_counter()
        summary = train(TrainConfig.model_validate(raw), out, workspace=ws, log=lambda m: None)
        ev = rundir.read_eval(out)
        first, last = ev.iloc[0], ev.iloc[-1]
        print(
            json.dumps(
                {
                    "method": name,
                    "status": summary["status"],
                    "steps": args.steps,
                    "reward_acc_start": first["reward_acc"],
                    "reward_acc_end": last["reward_acc"],
                    "hybrid_acc_end": last["hybrid_acc"],
                    "loss_pref_start": first["loss_pref"],
                    "loss_pref_end": last["loss_pref"],
                    "dbs_start": first.get("dbs"),
                    "dbs_end": last.get("dbs"),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )


def wall_split(args) -> None:
    """A default-cadence run (eval, snapshots, HT-SR, checkpoints as configured by default) on the HH
    sample, twice on one workspace (reference cache cold, then warm), each in its own process so its
    peak RSS is its own: where the wall time goes."""
    import shutil

    from dpo_engine.jobs.allocator import with_allocator
    from dpo_engine.train.reference import CACHE_DIR

    # The first run must find no cached reference (nor HT-SR "before"); a converted model stays converted.
    shutil.rmtree(Path(args.out) / "wall_split_ws" / CACHE_DIR, ignore_errors=True)
    env = with_allocator(dict(os.environ), args.allocator)  # the runs allocate like job processes
    print(f"allocator: {'jemalloc' if 'jemalloc' in env.get('LD_PRELOAD', '') else 'system'}", flush=True)
    for label in ("cold", "warm")[: 1 if args.cold_only else 2]:
        cmd = [
            sys.executable,
            __file__,
            "--wall-split",
            "--wall-run",
            label,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--threads",
            str(args.threads),
            "--model",
            args.model,
            "--wall-method",
            args.wall_method,
            "--out",
            args.out,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            print(f"cache {label}: failed\n{res.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1])
        wall, split = r["wall_s"], r["split"]
        other = wall - sum(split.values())
        parts = ", ".join(f"{k} {v:.1f}s ({v / wall:.0%})" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
        print(
            f"cache {label}: {r['status']}, {args.steps} steps, wall {wall:.1f}s: {parts}, other {other:.1f}s "
            f"({other / wall:.0%}); training share {split.get('train', 0) / wall:.0%} (goal >= 75%); "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )


def wall_split_run(args) -> None:
    """Child of --wall-split: one run on the shared workspace; prints one JSON line."""
    import torch

    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import train
    from dpo_engine.workspace import Workspace

    torch.set_num_threads(args.threads)
    raw = {
        "data": {"dataset": str(HH_SAMPLE), "max_length": args.max_length},
        "model": {"name": args.model},
        "optimisation": {"max_steps": args.steps, "batch_size": args.batch_size},
    }
    if args.wall_method == "dpo":
        raw["method"] = variants()["dpo"]
    run = Path(args.out) / f"wall_split_{args.wall_run}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(
        TrainConfig.model_validate(raw),
        run,
        workspace=Workspace.resolve(Path(args.out) / "wall_split_ws"),
        log=lambda m: print("   ", m, file=sys.stderr, flush=True),
    )
    print(
        json.dumps(
            {
                "status": summary["status"],
                "wall_s": time.perf_counter() - t0,
                "split": summary.get("time_split_s") or {},
                "peak_rss_mb": summary.get("peak_memory_mb"),
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--pairs", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workspace", default=str(REPO / "workspace"))
    p.add_argument("--only", nargs="*", help="benchmark only these variants (e.g. dpo kernel:hmk div:kl)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--learning", action="store_true")
    p.add_argument(
        "--wall-split",
        action="store_true",
        help="one default-cadence run of --steps steps (use 20), cache cold then warm: the wall-time split",
    )
    p.add_argument(
        "--wall-method",
        choices=("default", "dpo"),
        default="default",
        help="wall split: the default method (HMK + KL) or plain DPO",
    )
    p.add_argument("--cold-only", action="store_true", help="wall split: only the first (cache cold) run")
    p.add_argument(
        "--allocator",
        choices=("jemalloc", "system"),
        default=None,
        help="wall split: malloc of the runs (default: as job processes, jemalloc when the machine has it)",
    )
    p.add_argument("--wall-run", choices=("cold", "warm"), help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="*", default=None, help="learning mode: run only these (dpo, hmk)")
    p.add_argument("--divergence", default="kl")
    p.add_argument("--out", default=str(REPO / "workspace" / "bench_runs"))
    args = p.parse_args()
    if args.variant:
        one_variant(args)
    elif args.learning:
        learning(args)
    elif args.wall_split and args.wall_run:
        wall_split_run(args)
    elif args.wall_split:
        wall_split(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
