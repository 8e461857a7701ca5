"""Training throughput on a GPU (bf16 mixed precision): tokens/s per kernel and divergence, then the peer benchmark.

Part 1 runs our trainer for `--steps` timed steps (after `--warmup`) per method on the HH sample with
the quick settings (LoRA r=8 on the seven projections, `--batch-size` pairs, `--max-length` tokens)
and prints tokens/s (pair tokens as the plain layout reads them) and peak GPU memory.
Part 2 runs `scripts/bench_peer.py --device cuda` (TRL's DPOTrainer vs ours) unless `--no-peer`.

    .venv/bin/python scripts/bench_gpu.py                                  # on a CUDA machine
    .venv/bin/python scripts/bench_gpu.py --device cpu --model tiny-random --steps 1 --warmup 0 --no-peer   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DPO_KERNELS_MODEL_CACHE", str(REPO / ".cache" / "models"))
HH_SAMPLE = REPO / "assets" / "sample_hh.jsonl.gz"

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def methods() -> dict[str, dict]:
    plain = {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}}
    out = {"dpo": plain}
    for k in ("rbf", "polynomial", "spectral", "mahalanobis", "mixture", "hmk"):
        out[f"kernel:{k}"] = {"kernel": {"name": k}, "divergence": {"name": "none"}, "loss": {"gamma": 0.5}}
    out["hmk+js"] = {"kernel": {"name": "hmk"}, "divergence": {"name": "js", "alpha": 0.1}, "loss": {"gamma": 0.5}}
    out["eps-dpo"] = {**plain, "loss": {"gamma": 0.0, "epsilon_dpo": 0.01}}
    return out


def throughput(args, name: str, method: dict, workspace) -> dict:
    import torch

    from dpo_engine.train.checkpoint import save_reference_cache
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.trainer import DPOTrainer, peak_memory_mb

    cuda = args.device.startswith("cuda")
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": str(HH_SAMPLE), "max_length": args.max_length},
            "model": {
                "name": args.model,
                "lora": True,
                "lora_r": 8,
                "lora_target_modules": LORA_TARGETS,
                "dtype": "bfloat16" if cuda else "float32",
            },
            "method": {**method, "calibration_pairs": args.calibration_pairs},
            "optimisation": {"max_steps": args.warmup + args.steps, "batch_size": args.batch_size, "seed": 0},
            "monitoring": {"htsr": False},
        }
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = DPOTrainer(cfg, run_dir, workspace=workspace, device=args.device, log=lambda m: None)
        trainer.setup()
        for _ in range(args.warmup):
            trainer.step.run()
        if cuda:
            torch.cuda.synchronize()
        t0, tokens = time.perf_counter(), 0.0
        for _ in range(args.steps):
            t = time.perf_counter()
            row = trainer.step.run()
            tokens += row["tokens_per_s"] * (time.perf_counter() - t)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        save_reference_cache(trainer.parts)
        peak = peak_memory_mb(trainer.parts.device)
    return {"method": name, "step_s": elapsed / args.steps, "tokens_per_s": tokens / elapsed, "peak_memory_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--calibration-pairs", type=int, default=256)
    p.add_argument("--methods", nargs="*", default=None, help="subset of: " + ", ".join(methods()))
    p.add_argument("--no-peer", action="store_true", help="skip the TRL comparison")
    p.add_argument("--peer-repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "workspace" / "bench_gpu"))
    args = p.parse_args()

    import torch

    from dpo_engine.workspace import Workspace

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; use --device cpu for a smoke run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workspace = Workspace.resolve(out / "ws")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"device {device_name}, model {args.model}, batch {args.batch_size} pairs, max_length {args.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )
    rows = []
    for name, method in methods().items():
        if args.methods and name not in args.methods:
            continue
        rows.append(throughput(args, name, method, workspace))
        r = rows[-1]
        print(
            f"{name:<20}{r['step_s']:>8.3f} s/step{r['tokens_per_s']:>10.0f} tokens/s{r['peak_memory_mb']:>9.0f} MB "
            "peak",
            flush=True,
        )
    (out / "throughput.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    if not args.no_peer:
        cmd = [
            sys.executable,
            str(REPO / "scripts" / "bench_peer.py"),
            "--device",
            args.device,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--repeats",
            str(args.peer_repeats),
            "--out",
            str(out / "bench_peer.jsonl"),
        ]
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
