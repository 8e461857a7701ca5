"""One job on one cluster node: `python -m dpo_engine.jobs.node_runner '<json>'`, started by a Ray task.

It takes the job over from the dispatcher (`JobStore.hand_over`) and runs it with the local
worker's own `Worker.run_job`: child process in its own group, heartbeats, log.txt, cancel.
It runs as a process of its own between the Ray worker and the job because Ray, when it ends a
task's worker (dispatcher gone, `ray.cancel(force=True)`), SIGKILLs that worker's direct
children. This process is that direct child; the job's process is one level further down, so
it is not killed outright but gets the kernel's parent-death SIGTERM and stops its whole
process group on the way out, exactly as under a local worker that died.

Exit codes: 0 the job was run to a final status (or requeued), 3 it was no longer waiting.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from dpo_engine.jobs.store import JobStore
from dpo_engine.jobs.worker import Worker
from dpo_engine.workspace import Workspace

EXIT_NOT_WAITING = 3


def run_on_node(spec: dict) -> int:
    ws = Workspace(Path(spec["workspace"]))
    store = JobStore(spec["db_url"], runs_dir=ws.runs_dir)
    host = socket.gethostname()
    worker_id = f"ray-{host}-{os.getpid()}-{os.urandom(2).hex()}"
    device = spec["device"]
    try:
        job = store.hand_over(spec["job_id"], from_worker=spec["dispatcher_id"], to_worker=worker_id, device=device)
        if job is None:
            return EXIT_NOT_WAITING
        worker = Worker(
            ws,
            device=device,
            store=store,
            worker_id=worker_id,
            heartbeat_s=spec["heartbeat_s"],
            lost_timeout_s=spec["lost_timeout_s"],
            cancel_grace_s=spec["cancel_grace_s"],
        )
        store.register_worker(worker_id, host, os.getpid(), device)
        try:
            worker.run_job(job)
        finally:
            store.unregister_worker(worker_id)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(run_on_node(json.loads(sys.argv[1])))
