"""Peak memory and wall time of ingesting uploads through `dpo-kernels data add`.

Parts (each result is kept in build/bench_ingest/<label>.json; a finished part is skipped, so the
script resumes where it stopped):

* ``bomb``: a 2 MB ``.jsonl.gz`` holding 2 GiB of zeros, which must be refused quickly (through
  the CLI, whose start-up imports the training stack, and ``bomb-engine``: the ingestion call
  alone in a fresh interpreter);
* ``jsonl-100k``: a JSONL file of 100,000 pairs (the bundled HH sample repeated with tagged
  prompts, about 150 MB), stored as a dataset.

Every part runs the CLI in its own process; peak RSS is the child's ``ru_maxrss``. ``--label``
names the result set, so the figures of two versions of the code print side by side::

    python scripts/bench_ingest.py --label after
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench_ingest"
BOMB_BYTES = 2 * 1024**3
N_PAIRS = 100_000


def build_bomb(path: Path) -> Path:
    if not path.exists():
        chunk = bytes(1 << 20)
        with gzip.open(path.with_suffix(".tmp"), "wb", compresslevel=9) as gz:
            for _ in range(BOMB_BYTES // len(chunk)):
                gz.write(chunk)
        path.with_suffix(".tmp").rename(path)
    return path


def build_jsonl(path: Path) -> Path:
    if not path.exists():
        rows = [json.loads(line) for line in gzip.open(ROOT / "assets" / "sample_hh.jsonl.gz", "rt")]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for i in range(N_PAIRS):
                row = dict(rows[i % len(rows)])
                tag = f"[variant {i // len(rows)}]"
                row["chosen"] = row["chosen"].replace("\n\nHuman:", f"\n\nHuman: {tag}", 1)
                row["rejected"] = row["rejected"].replace("\n\nHuman:", f"\n\nHuman: {tag}", 1)
                out.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


ENGINE_CALL = """
import sys
from dpo_engine.data import DataFormatError, stage_preferences
try:
    stage_preferences(sys.argv[1], sys.argv[2])
except DataFormatError as exc:
    sys.exit(f"error: {exc}")
"""


def run_child(args: list[str], workspace: Path) -> dict:
    """Run `python ARGS` in a child; wall time, peak RSS (MB), exit code, last stderr line."""
    env = dict(os.environ, DPO_KERNELS_WORKSPACE=str(workspace))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stdout.close()
    proc.stderr.close()
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit_code": os.waitstatus_to_exitcode(status),
        "stderr_last": err[-1] if err else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="current", help="name of this result set (e.g. before / after)")
    parser.add_argument("--parts", default="bomb,bomb-engine,jsonl-100k")
    parser.add_argument("--force", action="store_true", help="rerun parts that already have a result")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result_path = OUT / f"{args.label}.json"
    results = json.loads(result_path.read_text()) if result_path.exists() else {}
    inputs = {
        "bomb": lambda: build_bomb(OUT / "zeros.jsonl.gz"),
        "bomb-engine": lambda: build_bomb(OUT / "zeros.jsonl.gz"),
        "jsonl-100k": lambda: build_jsonl(OUT / "pairs_100k.jsonl"),
    }
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        if part in results and not args.force:
            print(f"{part}: done already ({results[part]})", flush=True)
            continue
        source = inputs[part]()
        print(f"{part}: {source.name} ({source.stat().st_size / 1e6:.1f} MB on disk) ...", flush=True)
        workspace = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        try:
            if part.endswith("-engine"):
                args_ = ["-c", ENGINE_CALL, str(source), str(workspace / "staged")]
            else:
                args_ = ["-m", "dpo_engine.cli", "data", "add", str(source), "--name", part]
            results[part] = run_child(args_, workspace)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        result_path.write_text(json.dumps(results, indent=2))
        print(f"{part}: {results[part]}", flush=True)

    labels = sorted(p.stem for p in OUT.glob("*.json"))
    table = {label: json.loads((OUT / f"{label}.json").read_text()) for label in labels}
    print(f"\n{'part':<12} {'label':<10} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}  outcome")
    for part in inputs:
        for label, res in table.items():
            if part in res:
                r = res[part]
                print(
                    f"{part:<12} {label:<10} {r['wall_s']:>8} {r['peak_rss_mb']:>12} {r['exit_code']:>5}  "
                    f"{r['stderr_last'][:80]}"
                )


if __name__ == "__main__":
    main()
