"""Train the shipped example runs: plain DPO and HMK + the diagnosis's divergence, quick preset, HH sample.

    python scripts/make_example_run.py [--workspace DIR] [--out assets/example_runs] [--force]

Both runs use the `quick` preset (dpo_engine/train/presets.py) on the bundled HH sample
(assets/sample_hh.jsonl.gz) with the bundled SmolLM2-135M-Instruct on this machine's CPU. The
HMK run's divergence is the one the diagnosis of the same sample recommends (the diagnosis runs
first, with its defaults). Each finished run is stored compactly under `--out`: config.json,
summary.json, metrics.jsonl, eval.jsonl, log.txt, htsr_before/after.csv and the probe-set
snapshots; no model weights, no checkpoints, no calibration tensors. A run already stored is
skipped, so an interrupted script picks up where it stopped; --force retrains everything.
The app shows these runs, marked "example", until a workspace has training runs of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = "assets/sample_hh.jsonl.gz"  # relative to the repository root, as the examples' config.json records it
KEEP_FILES = ("config.json", "summary.json", "metrics.jsonl", "eval.jsonl", "eval_margins.jsonl", "log.txt", "htsr_before.csv",
              "htsr_after.csv")
KEEP_DIRS = ("snapshots",)


def recommended_divergence(workspace) -> tuple[str, dict]:
    """The divergence the diagnosis recommends for the HH sample (and the diagnosis summary)."""
    from dpo_engine.selection.job import DiagnoseParams, run_diagnosis

    _, _, _, summary = run_diagnosis(DiagnoseParams(dataset=str(ROOT / SAMPLE)), workspace, run_dir=None)
    return summary["divergence"], {k: summary[k] for k in ("kernel", "divergence", "kernel_confidence",
                                                              "divergence_confidence", "n_pairs")}


def example_configs(divergence: str) -> dict[str, dict]:
    """Run name -> dotted overrides on top of the quick preset."""
    return {
        "example-dpo": {"method.kernel.name": "none", "method.divergence.name": "none", "method.loss.gamma": 0.0},
        f"example-hmk-{divergence}": {"method.kernel.name": "hmk", "method.divergence.name": divergence},
    }


def stored(out: Path, name: str) -> bool:
    summary = out / name / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "succeeded"


def train_one(name: str, overrides: dict, workspace, scratch: Path) -> Path:
    from dpo_engine.train.config import TrainConfig, set_dotted
    from dpo_engine.train.presets import apply_preset
    from dpo_engine.train.trainer import train

    raw = apply_preset({"data": {"dataset": str(ROOT / SAMPLE)}}, "quick")
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    config = TrainConfig.model_validate(raw)
    run_dir = scratch / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = train(config, run_dir, workspace=workspace, log=lambda line: print(f"[{name}] {line}", flush=True))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if summary.get("status") != "succeeded":
        raise SystemExit(f"{name}: training {summary.get('status')}: {summary.get('error')}")
    print(f"[{name}] wall {wall:.0f} s, process CPU {cpu:.0f} s", flush=True)
    return run_dir


def store_compactly(run_dir: Path, target: Path) -> int:
    """Copy the files the pages and the report read; returns the bytes stored."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEEP_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, tmp / name)
    for name in KEEP_DIRS:
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, tmp / name)
    config = json.loads((tmp / "config.json").read_text())
    config["data"]["dataset"] = SAMPLE  # not this machine's absolute path
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "example_build"),
                        help="scratch workspace (model cache, reference cache, full run directories)")
    parser.add_argument("--out", default=str(ROOT / "assets" / "example_runs"), help="where the compact runs go")
    parser.add_argument("--force", action="store_true", help="retrain runs already stored")
    parser.add_argument("--only", choices=("dpo", "hmk"), help="train one of the two runs (two processes can share the work)")
    parser.add_argument("--divergence", help="skip the diagnosis and use this divergence for the HMK run")
    args = parser.parse_args()

    from dpo_engine.workspace import Workspace

    workspace = Workspace.resolve(args.workspace)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.divergence:
        divergence = args.divergence
    elif args.only == "dpo":
        divergence = "none"  # the DPO run does not depend on the diagnosis
    else:
        divergence, diagnosis = recommended_divergence(workspace)
        print(f"diagnosis of {SAMPLE}: {json.dumps(diagnosis)}", flush=True)
    for name, overrides in example_configs(divergence).items():
        if args.only and not name.startswith(f"example-{args.only}"):
            continue
        if stored(out, name) and not args.force:
            print(f"[{name}] already stored in {out / name}, skipped", flush=True)
            continue
        run_dir = train_one(name, overrides, workspace, workspace.runs_dir)
        size = store_compactly(run_dir, out / name)
        print(f"[{name}] stored {size / 1e6:.2f} MB in {out / name}", flush=True)


if __name__ == "__main__":
    main()
