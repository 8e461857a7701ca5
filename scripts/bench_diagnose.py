"""Benchmark of dataset diagnosis: embedder throughput, end-to-end cold/warm runs, metrics + bootstrap.

Prints numbers; it is not a test. Cases:
1. embedder throughput (texts/s) on the HH sample's own texts (prompts and responses);
2. N pairs end to end from a cold cache, "real distribution": pairs drawn with replacement from the
   HH sample, so prompts and responses repeat and deduplication does most of the work;
3. the same with no duplicates: every text gets a distinct suffix, so every text is embedded;
4. the warm second run of case 3 (cache hit: load + metrics + bootstrap);
   then case 3 again with the encoder forced to float32 (and the cosine between the two);
5. metrics + 200 bootstrap resamples on 100,000 pairs of random 384-d embeddings.

Usage: python scripts/bench_diagnose.py [--pairs 10000] [--nodup-pairs 10000] [--metrics-pairs 100000]
A smaller --nodup-pairs gives a measured rate and a linear extrapolation to --pairs (labelled as such).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd

from dpo_engine.data import load_preferences
from dpo_engine.embed import embed_pairs, embed_texts, load_embedder, resolve_precision
from dpo_engine.selection import diagnose
from dpo_engine.selection.diagnosis import diagnose_quantities
from dpo_engine.selection.metrics import pair_quantities

HH_SAMPLE = Path("/work/shared/data/hh_harmless_dev.jsonl.gz")


def _hh_table(path: Path) -> pd.DataFrame:
    table, _ = load_preferences(path).finalize(drop_flagged=True)
    return table[["prompt", "chosen", "rejected"]]


def _recombined(base: pd.DataFrame, n: int, unique: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
    if unique:
        suffix = pd.Series([f" (variant {i})" for i in range(n)])
        rows = rows.assign(
            prompt=rows["prompt"] + suffix, chosen=rows["chosen"] + suffix, rejected=rows["rejected"] + suffix
        )
    return rows


class Clock:
    """Wall time and this process's CPU time: on a shared machine the CPU time shows the work itself."""

    def __enter__(self) -> "Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0

    def __str__(self) -> str:
        return f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU"


def _end_to_end(table: pd.DataFrame, cache_dir: Path, precision: str = "auto") -> Clock:
    with Clock() as clock:
        clock.embeddings = embed_pairs(table, cache_dir=cache_dir, precision=precision)
        emb = clock.embeddings
        diagnose(emb.prompt, emb.chosen, emb.rejected, n_bootstrap=200)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HH_SAMPLE)
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs for the real-distribution case")
    parser.add_argument("--nodup-pairs", type=int, default=10_000, help="pairs for the no-duplicates case")
    parser.add_argument("--metrics-pairs", type=int, default=100_000)
    parser.add_argument("--throughput-texts", type=int, default=300)
    args = parser.parse_args()

    load_start = time.perf_counter()
    load_embedder()
    print(f"embedder load: {time.perf_counter() - load_start:.1f} s (once per process); "
          f"default precision here: {resolve_precision('auto', 'cpu')}")
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")
    base = _hh_table(args.data)

    texts = list(dict.fromkeys([*base["prompt"], *base["chosen"], *base["rejected"]]))[: args.throughput_texts]
    mean_chars = np.mean([len(t) for t in texts])
    with Clock() as clock:
        embed_texts(texts)
    print(
        f"[1] throughput: {len(texts) / clock.wall:.1f} texts/s wall ({len(texts) / clock.cpu:.1f} texts per CPU-second) "
        f"on {len(texts)} unique HH texts (mean {mean_chars:.0f} chars)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        real = _recombined(base, args.pairs, unique=False)
        n_unique = len(set([*real["prompt"], *real["chosen"], *real["rejected"]]))
        t = _end_to_end(real, cache)
        print(f"[2] {args.pairs} pairs, real distribution ({n_unique} unique of {3 * args.pairs} texts), cold: {t}")
        print(f"    same, warm cache: {_end_to_end(real, cache)}")

        nodup = _recombined(base, args.nodup_pairs, unique=True, seed=1)
        t_cold = _end_to_end(nodup, cache)
        print(f"[3] {args.nodup_pairs} pairs, no duplicates ({3 * args.nodup_pairs} texts), cold: {t_cold}")
        if args.nodup_pairs < args.pairs:
            k = args.pairs / args.nodup_pairs
            print(
                f"    extrapolated linearly to {args.pairs} pairs: {t_cold.wall * k:.0f} s wall here, "
                f"{t_cold.cpu * k:.0f} CPU-s (= {t_cold.cpu * k / 2:.0f} s on 2 idle cores)"
            )
        print(f"[4] same, warm cache: {_end_to_end(nodup, cache)}")
        load_embedder(precision="float32")
        t_f32 = _end_to_end(nodup, cache, precision="float32")
        cosine = np.sum(t_f32.embeddings.chosen * t_cold.embeddings.chosen, axis=1)
        print(
            f"[3b] same {args.nodup_pairs} pairs forced to float32, cold: {t_f32} "
            f"(CPU ratio float32/default {t_f32.cpu / t_cold.cpu:.2f}; min cosine between them {cosine.min():.4f})"
        )
        if args.nodup_pairs < args.pairs:
            k = args.pairs / args.nodup_pairs
            print(f"    extrapolated to {args.pairs} pairs: {t_f32.cpu * k:.0f} CPU-s (= {t_f32.cpu * k / 2:.0f} s on 2 idle cores)")

    rng = np.random.default_rng(0)
    n, dim = args.metrics_pairs, 384

    def unit() -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    p, c, r = unit(), unit(), unit()
    with Clock() as total:
        with Clock() as per_pair:
            q = pair_quantities(p, c, r)
        diagnose_quantities(q, n_bootstrap=200)
    print(f"[5] {n} pairs: per-pair quantities {per_pair}; metrics + 200 bootstrap resamples in all {total}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
