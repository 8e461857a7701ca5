"""The shipped example runs: plain DPO and HMK + the diagnosis's divergence on the bundled HH sample.

    python scripts/make_example_run.py [--workspace DIR] [--out assets/example_runs] [--force]

The two runs are seed 0 of scripts/evidence.py's `dpo` and `hmk+<divergence>` methods (the `quick`
preset on the bundled HH sample with the bundled SmolLM2-135M-Instruct, this machine's CPU, the
evidence's fixed held-out split), trained in the same workspace, so a finished evidence run is
reused rather than trained again. The HMK run's divergence is the one the diagnosis of the same
sample recommends. Each run is stored compactly under `--out`: config.json, summary.json,
metrics.jsonl, eval.jsonl, eval_margins.jsonl, log.txt, htsr_before/after.csv and the probe-set
snapshots; no model weights, no checkpoints, no calibration tensors. A run already stored is
skipped, so an interrupted script picks up where it stopped; --force stores them again.
The app shows these runs, marked "example", until a workspace has training runs of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evidence  # noqa: E402  (the evidence study's runs and settings)

SAMPLE = evidence.SAMPLE  # relative to the repository root, as the examples' config.json records it
KEEP_FILES = (
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "eval.jsonl",
    "eval_margins.jsonl",
    "log.txt",
    "htsr_before.csv",
    "htsr_after.csv",
    "htsr_update.csv",
)
KEEP_DIRS = ("snapshots",)


def stored(out: Path, name: str) -> bool:
    summary = out / name / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "succeeded"


def store_compactly(run_dir: Path, target: Path, dataset: str = SAMPLE) -> int:
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
    config["data"]["dataset"] = dataset  # relative to the repository: not this machine's absolute path
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workspace",
        default=str(ROOT / "workspace" / "evidence"),
        help="the evidence workspace (model cache, reference cache, full run directories)",
    )
    parser.add_argument("--out", default=str(ROOT / "assets" / "example_runs"), help="where the compact runs go")
    parser.add_argument("--force", action="store_true", help="store runs again that are already stored")
    args = parser.parse_args()

    from dpo_engine.train.presets import preset_overrides
    from dpo_engine.workspace import Workspace

    workspace = Workspace.resolve(args.workspace)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = evidence.recommendation_for(workspace)
    print(f"diagnosis of {SAMPLE}: {json.dumps(rec)}", flush=True)
    plan = evidence.methods(rec)
    steps = preset_overrides("quick")["optimisation.max_steps"]
    for method, name in (("dpo", "example-dpo"), (f"hmk+{rec['divergence']}", f"example-hmk-{rec['divergence']}")):
        if stored(out, name) and not args.force:
            print(f"[{name}] already stored in {out / name}, skipped", flush=True)
            continue
        run_dir = evidence.train_run(method, 0, plan[method], steps, workspace)
        size = store_compactly(run_dir, out / name)
        print(f"[{name}] stored {size / 1e6:.2f} MB in {out / name}", flush=True)


if __name__ == "__main__":
    main()
