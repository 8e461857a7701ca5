"""Wall time and peak memory of the data audit at 100,000 pairs.

Texts: the bundled HH sample repeated until there are ``--pairs`` pairs (so exact duplicate prompts
and pairs abound, as in a file that repeats itself). Embeddings: random unit vectors of 384
dimensions (the encoder's width), with a tenth of the prompts replaced by near copies of others, so
the neighbour search has hits to collect. Token counts: the character counts divided by four (the
tokenizer itself is the pre-flight's cost, timed there). Every part is timed separately::

    python scripts/bench_audit.py --pairs 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpo_engine.analysis.audit import audit_data, near_neighbours
from dpo_engine.analysis.audit.findings import SplitSettings
from dpo_engine.data import load_preferences

ROOT = Path(__file__).resolve().parents[1]
DIM = 384


def table_of(n: int) -> pd.DataFrame:
    sample = load_preferences(ROOT / "assets" / "sample_hh.jsonl.gz").table
    reps = -(-n // len(sample))
    table = pd.concat([sample] * reps, ignore_index=True).head(n)
    table["pair_id"] = [f"p{i}" for i in range(n)]
    return table


def embeddings(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    src, dst = rng.choice(n, n // 10, replace=False), rng.choice(n, n // 10, replace=False)
    out[0][dst] = out[0][src] + 0.1 * rng.standard_normal((n // 10, DIM), dtype=np.float32) / np.sqrt(DIM)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    args = parser.parse_args()
    n = args.pairs
    timings = {}
    t = time.perf_counter()
    table = table_of(n)
    p, c, r = embeddings(n)
    tokens = {side: table[side].str.len().to_numpy() // 4 for side in ("prompt", "chosen", "rejected")}
    timings["build inputs (not audit)"] = time.perf_counter() - t

    t = time.perf_counter()
    audit_data(table, token_counts=tokens, split=SplitSettings())
    timings["texts only (length, exact duplicates, conflicts, exact leakage)"] = time.perf_counter() - t

    t = time.perf_counter()
    count, _, _ = near_neighbours(p, 0.95)
    timings[f"near-duplicate search alone, {n} distinct random prompts ({count} pairs found)"] = time.perf_counter() - t

    # the full audit on text-distinct prompts, so the neighbour search runs over all n of them
    distinct = table.assign(prompt=[f"{i}: {q}" for i, q in enumerate(table["prompt"])])
    t = time.perf_counter()
    audit = audit_data(distinct, prompt_emb=p, chosen_emb=c, rejected_emb=r, token_counts=tokens)
    timings["full audit, all prompts distinct (search over n)"] = time.perf_counter() - t

    t = time.perf_counter()
    repeated = audit_data(table, prompt_emb=p, chosen_emb=c, rejected_emb=r, token_counts=tokens)
    timings[f"full audit, HH repeated ({repeated.duplicates.distinct_prompts} distinct prompts)"] = (
        time.perf_counter() - t
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for name, seconds in timings.items():
        print(f"{seconds:8.1f} s  {name}")
    print(
        f"peak RSS {peak_mb:.0f} MB; flagged rows {len(audit.flagged)} (distinct), {len(repeated.flagged)} (repeated)"
    )
    print(json.dumps({k: round(v, 2) for k, v in timings.items()} | {"pairs": n, "peak_rss_mb": round(peak_mb)}))


if __name__ == "__main__":
    main()
