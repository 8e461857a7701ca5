"""Per-step time and peak memory of our training step against TRL's DPOTrainer, side by side.

Same model (SmolLM2-135M-Instruct, the bundled policy, loaded from the converted cache), same pairs
(the first pairs of the shared HH sample, rendered through the same chat template), LoRA r=8 on the
seven projections, `--batch-size` pairs per step, `--max-length` tokens, fp32 on CPU (bf16 mixed
precision with `--device cuda`). Runs:

- trl-default        TRL DPOTrainer with its defaults (reference forward every step, gradient
                     checkpointing on as TRL ships it; precision set to fp32 like ours on CPU);
- trl-precompute     the same with precompute_ref_log_probs=True;
- ours-<method>-cold our trainer, fresh reference cache (the first run on this data);
- ours-<method>-warm our trainer again on the same workspace (the cache from the cold run).
`--allocator jemalloc` runs every process on jemalloc, as our job processes run
(dpo_engine/jobs/allocator.py); `--ours-allocator jemalloc` only ours, against TRL as shipped.
Methods: dpo (plain), hmk, hmk+js (divergence regulariser), eps (ε-DPO).

Every run is its own process (so peak RSS is its own), `--warmup` steps are untimed, the rest are
timed one by one. Runs alternate (TRL, ours, TRL, ours, ...) within each repeat, and ratios are
formed between runs of the same repeat, so slow drift on a shared machine cancels out; the summary
prints the median, min and max of those ratios over repeats. Results are appended per run to
`--out` (JSON lines) with the settings they were taken under; finished runs with the same settings
are skipped when the script is started again.

    .venv/bin/pip install -e '.[peer]'
    .venv/bin/python scripts/bench_peer.py                       # 2 repeats, 1 warm-up + 3 timed steps
    .venv/bin/python scripts/bench_peer.py --repeats 3 --steps 5 --methods dpo hmk
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
HH_SAMPLE = REPO / "assets" / "sample_hh.jsonl.gz"

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "dpo": {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}},
    "hmk": {"kernel": {"name": "hmk"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.5}},
    "hmk+js": {"kernel": {"name": "hmk"}, "divergence": {"name": "js", "alpha": 0.1}, "loss": {"gamma": 0.5}},
    "eps": {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0, "epsilon_dpo": 0.01}},
}


def load_rows(n: int) -> list[dict]:
    from dpo_engine.data import open_dataset
    from dpo_engine.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        table = open_dataset(Workspace.resolve(tmp), str(HH_SAMPLE)).table
    return table.iloc[:n][["pair_id", "prompt", "chosen", "rejected"]].to_dict("records")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------- shared with bench_gpu.py
def our_config(
    model: str,
    method: str,
    *,
    device: str,
    max_length: int,
    batch_size: int,
    steps: int,
    calibration_pairs: int,
    gradient_checkpointing: bool | str = False,
    attn_implementation: str = "sdpa",
):
    """Our trainer's config for a benchmark run: LoRA r8 on the seven projections, the compute dtype of
    the device (bf16 on CUDA), no HT-SR, one held-out pair (the benchmark times steps, not evaluation)."""
    from dpo_engine.train.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "data": {"dataset": "bench", "max_length": max_length, "eval_fraction": 0.01, "min_eval_pairs": 1},
            "model": {
                "name": model,
                "lora": True,
                "lora_r": 8,
                "lora_target_modules": LORA_TARGETS,
                "dtype": "bfloat16" if device.startswith("cuda") else "float32",
                "gradient_checkpointing": gradient_checkpointing,
                "attn_implementation": attn_implementation,
            },
            "method": {**METHODS[method], "calibration_pairs": calibration_pairs},
            "optimisation": {"max_steps": steps, "batch_size": batch_size, "seed": 0},
            "monitoring": {"htsr": False},
        }
    )


def trl_dataset(rows: list[dict]):
    """The pairs as TRL reads conversations, so its chat template renders them as ours does (a
    dialogue turn by turn: dpo_engine.data.tokenize.render_prompt)."""
    from datasets import Dataset

    from dpo_engine.data.layouts import dialogue_turns

    def prompt(text: str) -> list[dict]:
        return [{"role": role, "content": content} for role, content in dialogue_turns(text) or [("user", text)]]

    return Dataset.from_list(
        [
            {
                "prompt": prompt(r["prompt"]),
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )


def trl_pair_tokens(example: dict, cap: int) -> int | None:
    """Tokens of one tokenized TRL example as our plain layout counts them (prompt once per response,
    each sequence cut at `cap`); None when this TRL version names its columns otherwise."""
    if not all(k in example for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
        return None
    lp = len(example["prompt_ids"])
    return min(lp + len(example["chosen_ids"]), cap) + min(lp + len(example["rejected_ids"]), cap)


def build_trl(
    model_name: str,
    rows: list[dict],
    *,
    device: str,
    batch_size: int,
    max_length: int,
    steps: int,
    out_dir: Path,
    precompute: bool,
    gradient_checkpointing: bool,
    options: dict | None = None,
    callbacks: list | None = None,
):
    """TRL's DPOTrainer over the same model and pairs with LoRA r8 on the same projections; the base is
    loaded in the dtype ours computes in (fp32 on CPU, bf16 on CUDA with bf16 mixed precision).
    `options` are further DPOConfig fields; those this TRL version lacks are left out and returned."""
    import dataclasses

    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dpo_engine.models import load_policy
    from dpo_engine.workspace import Workspace

    cuda = device.startswith("cuda")
    model, tokenizer = load_policy(
        model_name,
        workspace=Workspace.resolve(Path(out_dir) / "ws"),
        dtype="bfloat16" if cuda else "float32",
        device=device if cuda else "cpu",
    )
    model.train()
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    options = options or {}
    missing = sorted(k for k in options if k not in known)
    config = DPOConfig(
        output_dir=str(Path(out_dir) / "out"),
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        max_steps=steps,
        precompute_ref_log_probs=precompute,
        use_cpu=not cuda,
        bf16=cuda,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
        seed=0,
        gradient_checkpointing=gradient_checkpointing,
        **{k: v for k, v in options.items() if k in known},
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks or [],
    )
    return trainer, missing


# ----------------------------------------------------------------------------------- child: ours
def run_ours(args, method: str, workspace: str) -> dict:
    import pandas as pd
    import torch

    from dpo_engine.train.checkpoint import save_reference_cache
    from dpo_engine.train.trainer import DPOTrainer
    from dpo_engine.workspace import Workspace

    torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps
    rows = load_rows(n_steps * args.batch_size + 1)
    cfg = our_config(
        args.model,
        method,
        device=args.device,
        max_length=args.max_length,
        batch_size=args.batch_size,
        steps=n_steps,
        calibration_pairs=args.calibration_pairs,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = DPOTrainer(
            cfg,
            run_dir,
            workspace=Workspace.resolve(workspace),
            pairs=pd.DataFrame(rows),
            device=args.device,
            log=lambda m: None,
        )
        trainer.setup()
        setup_s = time.perf_counter() - t0
        times, tokens = [], []
        for _ in range(n_steps):
            t = time.perf_counter()
            seen = trainer.state.tokens_seen
            trainer.step.run()
            times.append(time.perf_counter() - t)
            tokens.append(trainer.state.tokens_seen - seen)
        save_reference_cache(trainer.parts)
    return {"setup_s": setup_s, "step_s": times[args.warmup :], "tokens": tokens[args.warmup :]}


# ----------------------------------------------------------------------------------- child: TRL
def run_trl(args, precompute: bool) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps
    rows = load_rows(n_steps * args.batch_size)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t = 0.0

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    timer = StepTimer()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trl(
            args.model,
            rows,
            device=args.device,
            batch_size=args.batch_size,
            max_length=args.max_length,
            steps=n_steps,
            out_dir=Path(tmp),
            precompute=precompute,
            gradient_checkpointing=not args.trl_no_gradient_checkpointing,
            callbacks=[timer],
        )
        setup_s = time.perf_counter() - t0
        trainer.train()
        lengths = [trl_pair_tokens(r, args.max_length) for r in trainer.train_dataset]
    per_step = None
    if all(x is not None for x in lengths):
        per_step = [sum(lengths[i : i + args.batch_size]) for i in range(0, len(lengths), args.batch_size)]
    return {
        "setup_s": setup_s,
        "step_s": timer.times[args.warmup :],
        "tokens": [statistics.mean(per_step)] * args.steps if per_step else None,
    }


def child(args) -> None:
    kind = args.run
    if kind.startswith("trl-"):
        result = run_trl(args, precompute=kind == "trl-precompute")
    else:
        _, method, _ = kind.split(":")
        result = run_ours(args, method, args.workspace)
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_gpu_mb"] = peak_gpu_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- parent
def plan(args) -> list[tuple[int, str]]:
    """Run order per repeat: TRL default, half of ours, TRL precompute, the other half; odd repeats reversed."""
    out = []
    for rep in range(args.repeats):
        ours = [f"ours:{m}:{temp}" for m in args.methods for temp in ("cold", "warm")]
        half = len(ours) // 2 + len(ours) % 2
        order = (
            ([] if args.no_trl else ["trl-default"])
            + ours[:half]
            + ([] if args.no_trl else ["trl-precompute"])
            + ours[half:]
        )
        if rep % 2:  # reverse, but a warm run must still follow its cold run
            pairs = [order[i : i + 1] for i in range(len(order))]
            order = [run for chunk in reversed(pairs) for run in chunk]
            for i, run in enumerate(order):
                if run.endswith(":warm"):
                    j = order.index(run.replace(":warm", ":cold"))
                    if j > i:
                        order[i], order[j] = order[j], order[i]
        out += [(rep, run) for run in order]
    return out


def summarise(results: list[dict], args) -> None:
    import numpy as np

    def median_step(r):
        return float(np.median(r["step_s"])) if r.get("step_s") else float("nan")

    by = {(r["repeat"], r["run"]): r for r in results if "error" not in r}
    print(
        f"\nper-step time (median over the {args.steps} timed steps of a run), ratios within each repeat; "
        f"{args.threads} threads, batch {args.batch_size} pairs, max_length {args.max_length}"
    )
    print(
        f"{'run':<22}{'step s':>8}{'/TRL dflt (med min max)':>26}{'/TRL precomp (med min max)':>30}"
        f"{'/ours dpo':>10}{'peak RSS MB':>12}{'RSS /TRL':>9}{'tok/step':>9}"
    )
    runs = sorted({r for _, r in by}, key=lambda x: (not x.startswith("trl"), x))
    for run in runs:
        reps = [rep for rep in range(args.repeats) if (rep, run) in by]
        steps = [median_step(by[(rep, run)]) for rep in reps]
        rss = [by[(rep, run)]["peak_rss_mb"] for rep in reps]

        def ratios(other: str, run: str = run, reps: list[int] = reps):
            vals = [median_step(by[(rep, run)]) / median_step(by[(rep, other)]) for rep in reps if (rep, other) in by]
            return f"{np.median(vals):.2f} {min(vals):.2f} {max(vals):.2f}" if vals else "-"

        temp = run.split(":")[-1] if run.startswith("ours") else ""
        own_dpo = f"ours:dpo:{temp}"
        rss_trl = [by[(rep, "trl-default")]["peak_rss_mb"] for rep in reps if (rep, "trl-default") in by]
        print(
            f"{run:<22}{np.median(steps):>8.2f}{ratios('trl-default'):>26}{ratios('trl-precompute'):>30}"
            f"{(ratios(own_dpo).split()[0] if run.startswith('ours') else '-'):>10}{np.median(rss):>12.0f}"
            f"{(np.median(rss) / np.median(rss_trl) if rss_trl else float('nan')):>9.2f}"
            f"{np.median([t for rep in reps for t in (by[(rep, run)].get('tokens') or [float('nan')])]):>9.0f}"
        )
    print("tok/step: tokens of the step's pairs with the prompt counted once per response (TRL: after its truncation)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats (ratios are taken within one)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda / cuda:N (bf16 mixed precision for both sides)")
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="policy for both sides (tiny-random for a smoke run)"
    )
    p.add_argument("--calibration-pairs", type=int, default=32, help="kernel calibration pairs in our runs")
    p.add_argument(
        "--trl-no-gradient-checkpointing",
        action="store_true",
        help="turn off TRL's default gradient checkpointing (ours has it off by default)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="turn on gradient checkpointing in our runs too (TRL has it on by default): same settings on both sides",
    )
    p.add_argument(
        "--allocator",
        choices=["system", "jemalloc"],
        default="system",
        help="malloc of every run (jemalloc: preloaded as our job processes do, dpo_engine/jobs/allocator.py)",
    )
    p.add_argument(
        "--ours-allocator",
        choices=["system", "jemalloc"],
        help="malloc of our runs only (default: --allocator); e.g. jemalloc, as our jobs run, against TRL as shipped",
    )
    p.add_argument("--no-trl", action="store_true", help="only our runs")
    p.add_argument("--out", default=str(REPO / "workspace" / "bench_peer.jsonl"))
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--workspace", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        child(args)
        return

    from dpo_engine.jobs.allocator import jemalloc_library, with_allocator  # the parent only: children stay lean

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: getattr(args, k)
        for k in (
            "steps",
            "warmup",
            "batch_size",
            "max_length",
            "threads",
            "device",
            "model",
            "calibration_pairs",
            "trl_no_gradient_checkpointing",
            "gradient_checkpointing",
            "allocator",
            "ours_allocator",
        )
    }
    done = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    done = [r for r in done if r.get("settings") == settings]  # runs taken with other settings are not reused
    finished = {(r["repeat"], r["run"]) for r in done if "error" not in r}  # failed runs are tried again
    todo = plan(args)
    print(f"{len(todo)} runs planned, {sum(1 for k in todo if k in finished)} already in {out}", flush=True)
    cache_root = out.parent / "bench_peer_workspaces"
    for i, (rep, run) in enumerate(todo):
        if (rep, run) in finished:
            continue
        ws = cache_root / f"repeat{rep}_{run.split(':')[1] if run.startswith('ours') else 'trl'}"
        if run.endswith(":cold"):
            import shutil

            shutil.rmtree(ws / "reference_cache", ignore_errors=True)  # cold means no cached reference
        cmd = [
            sys.executable,
            __file__,
            "--run",
            run,
            "--workspace",
            str(ws),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--threads",
            str(args.threads),
            "--calibration-pairs",
            str(args.calibration_pairs),
            "--device",
            args.device,
            "--model",
            args.model,
        ]
        if args.trl_no_gradient_checkpointing:
            cmd.append("--trl-no-gradient-checkpointing")
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        env = {
            **os.environ,
            "DPO_KERNELS_MODEL_CACHE": os.environ.get("DPO_KERNELS_MODEL_CACHE", str(REPO / ".cache" / "models")),
        }
        allocator = (args.ours_allocator or args.allocator) if run.startswith("ours") else args.allocator
        if allocator == "jemalloc" and jemalloc_library() is None:
            raise SystemExit(
                "--allocator jemalloc: no libjemalloc on this machine (Debian: apt-get install libjemalloc2)"
            )
        env = with_allocator(env, allocator)
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(todo)}] repeat {rep} {run} ...", end=" ", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            record = {"repeat": rep, "run": run, "settings": settings, "error": res.stderr[-3000:]}
            print(f"failed ({time.perf_counter() - t0:.0f}s)\n{res.stderr[-1500:]}", flush=True)
        else:
            record = {"repeat": rep, "run": run, "settings": settings, **json.loads(line[-1][len("RESULT ") :])}
            print(
                f"{statistics.median(record['step_s']):.2f} s/step, peak RSS {record['peak_rss_mb']:.0f} MB "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        with open(out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        done.append(record)
    print(f"allocator: TRL {args.allocator}, ours {args.ours_allocator or args.allocator}")
    summarise([r for r in done if r["repeat"] < args.repeats], args)


if __name__ == "__main__":
    main()
