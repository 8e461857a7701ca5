"""How responsive is the run page on a big run? Prints render and projection times.

Builds a synthetic run directory with the contract's file formats: a 20,000-step metrics.jsonl,
an eval every 100 steps, and 10 snapshots of 512 probe pairs (256-dim). Then times:
- the cluster projection (t-SNE, 10 frames, Procrustes-aligned) with a cold and a warm disk cache;
- the run page rendered with AppTest, cold (first render) and warm (second render).

Usage: .venv/bin/python scripts/bench_pages.py [--workspace DIR] [--steps 20000] [--snapshots 10] [--pairs 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpo_engine.names import DIVERGENCE_METRICS  # noqa: E402 (after the path insert)


def build_big_run(run_dir: Path, steps: int, n_snapshots: int, n_pairs: int, dim: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"dataset": "bench"},
        "model": {"name": "tiny-random"},
        "method": {"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"epsilon_dpo": 0.01}},
        "optimisation": {"max_steps": steps},
        "monitoring": {"eval_every": 100, "probe_pairs": n_pairs},
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    t = np.arange(1, steps + 1)
    logits = rng.normal(size=(6,)) * 0.001
    with (run_dir / "metrics.jsonl").open("w") as out:
        for step in t:
            w = np.exp(logits + 0.0001 * step * np.array([1, -1, 0.5, -0.5, 0.2, -0.2]))
            out.write(
                json.dumps(
                    {
                        "step": int(step),
                        "epoch": step / 5000,
                        "loss": float(0.69 * np.exp(-step / 8000) + 0.05 * rng.random()),
                        "loss_pref": float(0.69 * np.exp(-step / 8000)),
                        "loss_div": float(0.01 * rng.random()),
                        "loss_entropy": -0.02,
                        "reward_acc": float(min(1, 0.5 + step / 40000 + 0.1 * rng.random())),
                        "margin": float(step / 10000),
                        "beta": float(0.1 * (1 + 0.00001 * step)),
                        "lr": 5e-4,
                        "grad_norm": float(rng.random()),
                        "tokens_per_s": float(2000 + 100 * rng.random()),
                        "lambda_rbf": float(w[0] / (w[0] + w[1])),
                        "lambda_poly": float(w[1] / (w[0] + w[1])),
                        "lambda_spectral": float(w[2] / (w[2] + w[3])),
                        "lambda_mahalanobis": float(w[3] / (w[2] + w[3])),
                        "tau_local": float(w[4] / (w[4] + w[5])),
                        "tau_global": float(w[5] / (w[4] + w[5])),
                    }
                )
                + "\n"
            )
    with (run_dir / "eval.jsonl").open("w") as out:
        for step in range(0, steps + 1, 100):
            out.write(
                json.dumps(
                    {
                        "step": step,
                        "loss_pref": 0.69 * np.exp(-step / 8000),
                        "reward_acc": 0.5 + step / 40000,
                        "hybrid_acc": 0.5 + step / 30000,
                        "reward_chosen": step / 10000,
                        "reward_rejected": -step / 10000,
                        **{d: float(rng.random() * step / steps) for d in DIVERGENCE_METRICS},
                    }
                )
                + "\n"
            )
    (run_dir / "snapshots").mkdir(exist_ok=True)
    base_c, base_r = rng.normal(size=(n_pairs, dim)), rng.normal(size=(n_pairs, dim))
    direction = rng.normal(size=dim)
    for i, step in enumerate(np.linspace(0, steps, n_snapshots).astype(int)):
        np.savez(
            run_dir / "snapshots" / f"step_{step}.npz",
            chosen=(base_c + 0.1 * i * direction).astype(np.float16),
            rejected=(base_r - 0.1 * i * direction).astype(np.float16),
            pair_ids=np.array([f"p{j}" for j in range(n_pairs)]),
        )
    (run_dir / "summary.json").write_text(json.dumps({"status": "succeeded", "wall_time_s": 3600.0}))
    (run_dir / "log.txt").write_text("\n".join(f"step {s}" for s in range(0, steps, 10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=512)
    args = parser.parse_args()

    root = args.workspace or Path(tempfile.mkdtemp(prefix="bench-pages-"))
    os.environ["DPO_KERNELS_WORKSPACE"] = str(root)
    from dpo_engine.analysis.projections import ProjectionConfig, cached_projection
    from dpo_engine.report.rundata import load_run
    from dpo_engine.workspace import Workspace

    ws = Workspace.resolve(root)
    run_dir = ws.run_dir("bench-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    build_big_run(run_dir, args.steps, args.snapshots, args.pairs)
    print(
        f"built run: {args.steps} metric rows, {args.snapshots} snapshots x {args.pairs} pairs "
        f"in {time.perf_counter() - t0:.1f}s"
    )

    t0 = time.perf_counter()
    run = load_run(run_dir)
    print(f"load_run (all files): {time.perf_counter() - t0:.2f}s")

    from streamlit.testing.v1 import AppTest

    def render(label: str) -> None:
        at = AppTest.from_file(str(REPO / "pages" / "runs.py"), default_timeout=600)
        at.query_params["run_id"] = "bench-run"
        t0 = time.perf_counter()
        at.run()
        elapsed = time.perf_counter() - t0
        status = "ok" if not at.exception else f"EXCEPTION {at.exception}"
        print(f"run page render ({label}, AppTest): {elapsed:.2f}s, {len(at.get('plotly_chart'))} charts, {status}")

    render("first, projection not cached: offered on request")
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        _, hit = cached_projection(run, ProjectionConfig())
        print(f"projection t-SNE {label} cache (hit={hit}): {time.perf_counter() - t0:.2f}s")
    render("projection cached")
    render("projection cached, again")


if __name__ == "__main__":
    main()
