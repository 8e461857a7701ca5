"""Page latency with several people on one app: p50/p95 per page with N concurrent browser sessions.

Starts `dpo-kernels app` (app + its worker) on a fresh workspace, drives N Chromium sessions at
once (each uploads and stores a small file, queues a diagnosis and a training run), prints the
latency of every page as p50/p95 over all sessions, and checks that every job was recorded
exactly once. With ``--db postgresql`` it starts a private PostgreSQL server for the job table.

Results are kept in build/bench_load/<db>-<n>.json (a finished setting is skipped)::

    python scripts/bench_load.py --sessions 8 --db sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_engine.jobs import JobStore  # noqa: E402 (after the path insert)
from dpo_engine.workspace import Workspace  # noqa: E402
from tests.browser import running_app  # noqa: E402
from tests.load import percentile, run_sessions, session_files  # noqa: E402

OUT = ROOT / "build" / "bench_load"


def measure(n_sessions: int, db: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    server = None
    if db == "postgresql":
        from tests.jobs_db import PostgresServer

        server = PostgresServer()
        os.environ["DPO_KERNELS_DB_URL"] = server.url(server.new_database())
    try:
        uploads = session_files(ROOT / "assets" / "sample_hh.jsonl.gz", tmp / "uploads", n_sessions)
        with running_app(tmp / "ws", tmp / "app.log") as url:
            start = time.perf_counter()
            logs = run_sessions(url, uploads)
            wall = time.perf_counter() - start
            jobs = JobStore.for_workspace(Workspace.resolve(tmp / "ws"))
            recorded = jobs.list(limit=1000)
            for job in recorded:
                if job.status in ("queued", "running"):
                    jobs.request_cancel(job.id)
        kinds = Counter(f"{j.kind}:{j.params.get('step') or ''}" for j in recorded)
        pages = sorted({name for log in logs for name in log.latencies})
        latency = {
            name: {
                "p50_s": round(percentile([t for log in logs for t in log.latencies.get(name, [])], 50), 2),
                "p95_s": round(percentile([t for log in logs for t in log.latencies.get(name, [])], 95), 2),
            }
            for name in pages
        }
        every = [t for log in logs for ts in log.latencies.values() for t in ts]
        return {
            "sessions": n_sessions,
            "db": db,
            "wall_s": round(wall, 1),
            "latency": latency,
            "all_pages": {"p50_s": round(percentile(every, 50), 2), "p95_s": round(percentile(every, 95), 2)},
            "jobs_by_kind": dict(kinds),
            "exactly_once": all(n == n_sessions for n in kinds.values()) and len(kinds) == 4,
            "session_errors": [e for log in logs for e in log.errors],
            "database_locked_in_log": "database is locked" in (tmp / "app.log").read_text(errors="replace"),
        }
    finally:
        if server is not None:
            server.stop()
            os.environ.pop("DPO_KERNELS_DB_URL", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.db}-{args.sessions}.json"
    if path.exists() and not args.force:
        result = json.loads(path.read_text())
    else:
        result = measure(args.sessions, args.db)
        path.write_text(json.dumps(result, indent=2))
    print(f"{result['sessions']} sessions on {result['db']}: wall {result['wall_s']} s")
    print(f"{'page':<10} {'p50 s':>7} {'p95 s':>7}")
    for name, lat in result["latency"].items():
        print(f"{name:<10} {lat['p50_s']:>7} {lat['p95_s']:>7}")
    print(f"{'all':<10} {result['all_pages']['p50_s']:>7} {result['all_pages']['p95_s']:>7}")
    print(f"jobs: {result['jobs_by_kind']} exactly once: {result['exactly_once']}")
    print(
        f"session errors: {result['session_errors'] or 'none'}; 'database is locked' in log: "
        f"{result['database_locked_in_log']}"
    )


if __name__ == "__main__":
    main()
