"""Do the label-noise signals find mislabeled pairs? Flip known labels and count what each signal finds.

The bundled HH sample (every pair, or the first ``--pairs``) gets the labels of a seeded random
``--flip`` share swapped (chosen <-> rejected). Each signal ranks the flipped table; its top k
(k = pairs flipped) is scored against the flipped rows: precision and recall with 95 % Wilson
intervals, against random ranking (precision = the flipped share). A signal is kept for users when
its precision's lower bound exceeds random x ``LABEL_NOISE_LIFT`` (audit/thresholds.py).

The reference model's log-probs are the slow part (SmolLM2-135M on CPU); they are saved per chunk
under ``--out``, so a stopped run resumes where it stopped. ``--write`` stores the result as
``dpo_engine/analysis/audit/label_noise_measured.json``, which the audit, the Diagnose page and the
report read::

    python scripts/measure_label_noise.py --write

The trained policy's signal is measured on runs (``--policy-runs``, default the two bundled example
runs): their last evaluation's per-pair reward margins, with the labels of a seeded share of those
held-out pairs swapped (a swapped pair's margin is the negated margin, so no pass is needed), and the
same over ``--policy-seeds`` seeds to show the spread. It is stored apart
(``label_noise_policy_measured.json``); ``--policy-only`` measures only it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpo_engine import rundir
from dpo_engine.analysis.audit.label_noise import (
    MEASURED_JSON,
    POLICY_MEASURED_JSON,
    embedding_signal,
    flip_labels,
    policy_flip_quality,
    quality_table,
    rank_average,
    top_k_quality,
)
from dpo_engine.analysis.audit.logprob_gap import logprob_gap
from dpo_engine.data import load_preferences
from dpo_engine.embed import DEFAULT_EMBEDDER, embed_pairs
from dpo_engine.models.loading import DEFAULT_MODEL, load_policy
from dpo_engine.selection import diagnose
from dpo_engine.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "sample_hh.jsonl.gz"
EXAMPLE_RUNS = sorted((ROOT / "assets" / "example_runs").glob("example-*"))
CHUNK = 40


def flipped_table(pairs: int | None, share: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    table, _ = load_preferences(SAMPLE).finalize(drop_flagged=True)
    if pairs is not None:
        table = table.head(pairs).reset_index(drop=True)
    flip = flip_labels(len(table), share, seed)
    out = table.copy()
    out.loc[flip, ["chosen", "rejected"]] = table.loc[flip, ["rejected", "chosen"]].to_numpy()
    return out, flip


def logprob_signal(table: pd.DataFrame, args, workspace: Workspace, out: Path) -> tuple[np.ndarray, float]:
    """The log-prob gap, chunk by chunk, each chunk saved (keyed by its texts and the settings)."""
    model = tokenizer = None
    parts, seconds = [], 0.0
    for start in range(0, len(table), CHUNK):
        part = table.iloc[start : start + CHUNK]
        key = hashlib.sha256(
            json.dumps(
                [
                    args.model,
                    args.max_length,
                    args.max_prompt_length,
                    part[["prompt", "chosen", "rejected"]].to_numpy().tolist(),
                ]
            ).encode()
        ).hexdigest()[:16]
        path = out / f"logprob-{start:06d}-{key}.npz"
        if path.is_file():
            saved = np.load(path)
            parts.append(saved["gap"])
            seconds += float(saved["seconds"])
            continue
        if model is None:
            model, tokenizer = load_policy(args.model, workspace=workspace, device=args.device)
        began = time.perf_counter()
        gap = logprob_gap(part, model, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
        took = time.perf_counter() - began
        np.savez(path, gap=gap, seconds=took)
        parts.append(gap)
        seconds += took
        print(f"  log-probs of pairs {start}..{start + len(part) - 1}: {took:.0f} s", flush=True)
    return np.concatenate(parts), seconds


def policy_measurement(runs: list[Path], share: float, seed: int, seeds: int) -> list[dict]:
    """Per run: the policy signal's top-k quality at `seed`, and its precision over `seeds` seeds."""
    out = []
    for run in runs:
        by_step = rundir.read_eval_margins(run)
        if not by_step:
            raise SystemExit(f"{run} has no eval_margins.jsonl")
        step, margins = max(by_step.items())
        values = margins.to_numpy()
        quality = policy_flip_quality(values, share, seed).model_dump(mode="json")
        draws = [policy_flip_quality(values, share, s) for s in range(seeds)]
        spread = [q.precision for q in draws]
        config = rundir.read_json(run / "config.json") or {}
        method = config.get("method", {})
        out.append(
            {
                "run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
                "dataset": config.get("data", {}).get("dataset"),
                "kernel": (method.get("kernel") or {}).get("name"),
                "divergence": (method.get("divergence") or {}).get("name"),
                "step": step,
                "agrees_with_unflipped": round(float((values[~flip_labels(len(values), share, seed)] > 0).mean()), 4),
                **quality,
                "precision_over_seeds": {
                    "seeds": seeds,
                    "mean": round(float(np.mean(spread)), 4),
                    "min": round(float(np.min(spread)), 4),
                    "max": round(float(np.max(spread)), 4),
                    # each draw swaps other pairs of the same run's margins, so draws are not independent
                    "clearing_the_bar": sum(q.beats_random for q in draws),
                },
            }
        )
        p = quality["precision_interval"]
        print(
            f"policy of {out[-1]['run']} (step {step}, {len(values)} held-out pairs): precision@{quality['k']} "
            f"{quality['precision']:.2f} [{p['low']:.2f}, {p['high']:.2f}] "
            f"vs random {quality['random_precision']:.2f}; "
            f"over {seeds} seeds {out[-1]['precision_over_seeds']['mean']:.2f} "
            f"({out[-1]['precision_over_seeds']['min']:.2f}-{out[-1]['precision_over_seeds']['max']:.2f}), "
            f"clearing the bar on {out[-1]['precision_over_seeds']['clearing_the_bar']} of {seeds}"
        )
    return out


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (for docs/METHOD.md and docs/BENCHMARKS.md)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="the first N pairs of the sample (default: all)")
    parser.add_argument("--flip", type=float, default=0.1, help="share of pairs whose labels are swapped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "measure_label_noise")
    parser.add_argument("--write", action="store_true", help=f"store the result as {MEASURED_JSON.name}")
    parser.add_argument("--policy-runs", type=Path, nargs="*", default=EXAMPLE_RUNS, help="trained runs to measure")
    parser.add_argument("--policy-seeds", type=int, default=20, help="seeds for the policy signal's spread")
    parser.add_argument("--policy-only", action="store_true", help="measure and store only the policy signal")
    args = parser.parse_args()
    policy = {
        "flip_share": args.flip,
        "seed": args.seed,
        "command": "python scripts/measure_label_noise.py --policy-only --write",
        "runs": policy_measurement(args.policy_runs, args.flip, args.seed, args.policy_seeds),
    }
    if args.write:
        POLICY_MEASURED_JSON.write_text(json.dumps(policy, indent=2) + "\n")
        print(f"wrote {POLICY_MEASURED_JSON.relative_to(ROOT)}")
    if args.policy_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    workspace = Workspace.resolve(args.out / "workspace")
    table, flip = flipped_table(args.pairs, args.flip, args.seed)
    print(f"{len(table)} pairs, {int(flip.sum())} labels flipped (seed {args.seed})", flush=True)

    began = time.perf_counter()
    emb = embed_pairs(table, embedder=DEFAULT_EMBEDDER, cache_dir=workspace.embeddings_dir)
    margins = diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=0).pairs.margins
    embed_s = time.perf_counter() - began
    gap, logprob_s = logprob_signal(table, args, workspace, args.out)
    signals = {"embedding": embedding_signal(margins), "logprob": gap}
    signals["combined"] = rank_average(signals)
    quality = {name: top_k_quality(values, flip).model_dump(mode="json") for name, values in signals.items()}
    # A signal can only single out flipped pairs if it agrees with the labels of the others (score < 0).
    for name in ("embedding", "logprob"):
        quality[name]["agrees_with_unflipped"] = round(float((signals[name][~flip] < 0).mean()), 4)
    result = {
        "dataset": f"{SAMPLE.relative_to(ROOT)} ({len(table)} pairs)",
        "n_pairs": len(table),
        "flip_share": args.flip,
        "seed": args.seed,
        "model": args.model,
        "embedder": DEFAULT_EMBEDDER,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "logprob_seconds": round(logprob_s, 1),  # summed over the saved chunks, so stable across resumes
        "command": "python scripts/measure_label_noise.py --write"
        + (f" --pairs {args.pairs}" if args.pairs is not None else ""),
        "signals": quality,
    }
    print(f"embedding (or its cache) {embed_s:.0f} s; log-probs {logprob_s:.0f} s")
    for name in ("embedding", "logprob"):
        print(f"{name}: agrees with the labels of {quality[name]['agrees_with_unflipped']:.1%} of the unflipped pairs")
    print(markdown(quality_table(result)))
    if args.write:
        MEASURED_JSON.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {MEASURED_JSON.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
