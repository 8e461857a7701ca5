"""Run queued jobs on a Ray cluster, with the job table still the record of every job.

`RayDispatcher` (what `dpo-kernels worker --backend ray` runs) claims queued jobs from the job
table and submits each as a Ray task that asks for what the job needs (`job_resources`): one
GPU for a training job when the cluster has GPUs, CPUs for diagnosis. Ray places the tasks, so
several jobs run at once across the cluster's nodes. A training job with several processes
trains through Ray Train (`dpo_engine/train/ray_train.py`): its task asks for nothing and its
N workers ask for their own CPU or GPU each.

Each task starts a one-job worker on the node Ray chose (`node_runner`, a process of its own so
that Ray ending the task does not SIGKILL the job's process outright): it takes the job over
(`hand_over`), then runs it exactly as a local worker does, through `Worker.run_job`: the job's own child process
in its own process group, stdout/stderr appended to the run's log.txt on the shared workspace,
heartbeats and progress in the job row, and cancel requests read from the row and answered by
SIGTERM (then SIGKILL) to the child's process group. So status, progress, logs and cancel work
the same from the UI and the CLI whichever backend ran the job.

The dispatcher keeps jobs that wait for cluster resources alive (heartbeats), cancels them in
Ray when a cancel is requested before they start, and turns a task that Ray lost (node died,
worker crashed) into a requeue (checkpoint) or a failure, just like a lost local worker. Ray
tasks share their driver's fate: when the dispatcher stops, Ray ends its tasks, the kernel's
parent-death signal stops their job processes, and the jobs are requeued or failed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from dpo_engine.jobs.devices import CLUSTER_DEVICE
from dpo_engine.jobs.models import CANCELLED, RUNNING, Job
from dpo_engine.jobs.node_runner import EXIT_NOT_WAITING
from dpo_engine.jobs.ray_cluster import RayUnavailable, join
from dpo_engine.jobs.stopping import StopOnSignal
from dpo_engine.jobs.store import JobStore
from dpo_engine.jobs.worker import CANCEL_GRACE_S
from dpo_engine.workspace import Workspace

log = logging.getLogger(__name__)

# CPUs each kind asks Ray for; training also asks for one GPU when the cluster has any.
KIND_CPUS: dict[str, float] = {"train": 1.0, "diagnose": 2.0, "embed": 2.0, "htsr": 1.0, "selftest": 1.0}
DEFAULT_CPUS = 1.0
# Environment a job process needs from the machine that queued it (Ray workers inherit the
# environment of `ray start`, not the dispatcher's).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DPO_KERNELS_MODEL_CACHE")
# Set for the job's process: the cluster it runs on (a multi-process train job trains there with Ray Train).
ENV_RAY_ADDRESS = "DPO_KERNELS_RAY_ADDRESS"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the Ray backend needs the 'ray' package: pip install 'ray==2.60.0'") from None
    return ray


def train_processes(job: Job) -> int:
    """optimisation.processes of a train job (1 for any other job)."""
    optimisation = (job.params or {}).get("optimisation") if job.kind == "train" else None
    return int((optimisation or {}).get("processes") or 1)


def job_resources(job: Job, cluster_gpus: float, cpus_per_kind: dict[str, float] | None = None) -> dict[str, float]:
    """Ray resources for one job: its kind's CPUs, and one GPU when it asked for CUDA, or when it
    is a training job that asked for no particular device on a cluster that has GPUs. A train job
    with several processes asks for nothing: its task only waits for the Ray Train workers, which
    ask for their own CPUs or GPUs (holding them here as well could leave the workers unplaced)."""
    if train_processes(job) > 1:
        return {"num_cpus": 0.0, "num_gpus": 0.0}
    table = KIND_CPUS if cpus_per_kind is None else cpus_per_kind
    requested = job.requested_device or ""
    wants_gpu = requested.startswith("cuda") or (not requested and job.kind == "train" and cluster_gpus >= 1)
    return {"num_cpus": float(table.get(job.kind, DEFAULT_CPUS)), "num_gpus": 1.0 if wants_gpu else 0.0}


def run_job_on_node(ws_root: str, db_url: str, job_id: int, dispatcher_id: str, settings: dict[str, Any]) -> dict:
    """Body of the Ray task: run the job through `node_runner` in a process of its own, and wait."""
    import ray

    from dpo_engine.jobs.worker import _die_with_parent

    spec = {
        "workspace": ws_root,
        "db_url": db_url,
        "job_id": job_id,
        "dispatcher_id": dispatcher_id,
        "device": "cuda:0" if ray.get_gpu_ids() else "cpu",  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
        **{k: settings[k] for k in ("heartbeat_s", "lost_timeout_s", "cancel_grace_s")},
    }
    env = dict(os.environ, **settings.get("env", {}), **{ENV_RAY_ADDRESS: ray.get_runtime_context().gcs_address})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpo_engine.jobs.node_runner", json.dumps(spec)],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    rc = proc.wait()
    if rc not in (0, EXIT_NOT_WAITING):
        raise RuntimeError(f"the node runner for job {job_id} exited with code {rc}")
    return {"ran": rc == 0}


@dataclass
class _InFlight:
    job: Job
    ref: Any
    cancelled_in_ray: bool = False


class RayDispatcher(StopOnSignal):
    """Feed queued jobs from a workspace's job table to a Ray cluster until stopped."""

    def __init__(
        self,
        workspace: Workspace,
        address: str | None = None,
        poll_s: float = 1.0,
        heartbeat_s: float = 2.0,
        lost_timeout_s: float = 30.0,
        cancel_grace_s: float = CANCEL_GRACE_S,
        max_jobs: int | None = None,
        store: JobStore | None = None,
    ) -> None:
        for name, value in (("poll_s", poll_s), ("heartbeat_s", heartbeat_s), ("cancel_grace_s", cancel_grace_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not lost_timeout_s > heartbeat_s:
            raise ValueError(f"lost_timeout_s ({lost_timeout_s}) must exceed heartbeat_s ({heartbeat_s})")
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs!r}")
        self.workspace = workspace
        self.address = address
        self.poll_s, self.heartbeat_s = float(poll_s), float(heartbeat_s)
        self.lost_timeout_s, self.cancel_grace_s = float(lost_timeout_s), float(cancel_grace_s)
        self.max_jobs = max_jobs
        self.store = store or JobStore.for_workspace(workspace)
        self.hostname = socket.gethostname()
        self.dispatcher_id = f"ray-dispatch-{self.hostname}-{os.getpid()}-{os.urandom(2).hex()}"
        self._stop_signal = None
        self._inflight: dict[int, _InFlight] = {}
        self._ray = None
        self._remote = None

    # ---- cluster ---------------------------------------------------------------------------

    def connect(self) -> None:
        address = join(self.address, self.workspace)  # before Ray loads: it reads its settings then
        ray = _import_ray()
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {first}") from None
        self._ray = ray
        # max_retries=0: a lost task is the job table's business (requeue from checkpoint or fail).
        self._remote = ray.remote(max_retries=0)(run_job_on_node)

    def cluster_resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def loop_name(self) -> str:
        return f"dispatcher {self.dispatcher_id}"

    def run(self, once: bool = False) -> int:
        """Dispatch jobs until stopped (with `once`: one job, waiting for it). Returns how many were sent."""
        if self._ray is None:
            self.connect()
        with self.stop_signals_handled():
            return self._run(once)

    def _run(self, once: bool) -> int:
        self.store.register_worker(self.dispatcher_id, self.hostname, os.getpid(), CLUSTER_DEVICE)
        resources = self.cluster_resources()
        limit = self.max_jobs or max(1, int(resources.get("CPU", 1)))
        log.info(
            "dispatcher %s: Ray cluster with %s; up to %d jobs at once",
            self.dispatcher_id,
            {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")},
            limit,
        )
        sent = 0
        next_beat = 0.0
        try:
            while not self.stopping:
                try:
                    now = time.monotonic()
                    if now >= next_beat:
                        self._beat()
                        for lost in self.store.reap_lost(self.lost_timeout_s):
                            log.warning("job %s lost -> %s: %s", lost.id, lost.status, lost.message)
                        next_beat = now + self.heartbeat_s
                    self._collect()
                    job = None
                    if len(self._inflight) < limit and not (once and sent):
                        job = self.store.claim_for_cluster(self.dispatcher_id, gpus=resources.get("GPU", 0) >= 1)
                except SQLAlchemyError as exc:  # database briefly unavailable: retry after a pause
                    log.error("job database error: %s", exc)
                    job = None
                if job is not None:
                    self._submit(job, resources)
                    sent += 1
                    continue
                if once and not self._inflight:
                    break
                self._wait(self.poll_s)
        finally:
            try:
                self._shutdown()
            finally:
                self.store.unregister_worker(self.dispatcher_id)
        return sent

    # ---- jobs ----------------------------------------------------------------------------------

    def _submit(self, job: Job, cluster: dict[str, float]) -> None:
        needs = job_resources(job, cluster.get("GPU", 0.0))
        settings = {
            "heartbeat_s": self.heartbeat_s,
            "lost_timeout_s": self.lost_timeout_s,
            "cancel_grace_s": self.cancel_grace_s,
            "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
        }
        ref = self._remote.options(name=f"dpo-job-{job.id}-{job.kind}", **needs).remote(
            str(self.workspace.root), self.store.url, job.id, self.dispatcher_id, settings
        )
        self._inflight[job.id] = _InFlight(job=job, ref=ref)
        log.info("job %s (%s) sent to Ray asking for %s", job.id, job.kind, needs)

    def _beat(self) -> None:
        """Heartbeat jobs still waiting for resources; cancel in Ray the ones cancelled meanwhile."""
        self.store.worker_heartbeat(self.dispatcher_id)
        for job_id, item in self._inflight.items():
            current = self.store.get(job_id)
            if current.status != RUNNING or current.worker_id != self.dispatcher_id:
                continue  # started on a node: its task keeps it alive
            if current.cancel_requested and not item.cancelled_in_ray:
                self._ray.cancel(item.ref, force=True)
                item.cancelled_in_ray = True
            else:
                self.store.heartbeat(job_id)

    def _wait(self, seconds: float) -> None:
        refs = [item.ref for item in self._inflight.values()]
        if refs:
            self._ray.wait(refs, num_returns=1, timeout=seconds)
        else:
            end = time.monotonic() + seconds
            while not self.stopping and time.monotonic() < end:
                time.sleep(0.1)

    def _collect(self) -> None:
        """Settle every task that has ended; the task itself set the final status when it could."""
        if not self._inflight:
            return
        refs = {item.ref: job_id for job_id, item in self._inflight.items()}
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            job_id = refs[ref]
            item = self._inflight.pop(job_id)
            try:
                outcome = self._ray.get(ref)
                problem = None if outcome.get("ran") else "it was no longer waiting when its task started"
            except Exception as exc:  # task cancelled, worker crashed, node died
                outcome, problem = {}, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            self._settle(item, outcome, problem)

    def _settle(self, item: _InFlight, outcome: dict, problem: str | None) -> None:
        if outcome.get("ran"):
            return  # the task ran the job to its end and recorded the outcome itself
        current = self.store.get(item.job.id)
        if current.status != RUNNING or current.attempts != item.job.attempts:
            return  # finished, cancelled, or reaped and claimed again meanwhile
        if item.cancelled_in_ray or current.cancel_requested:
            self.store.finish(item.job.id, CANCELLED, message="cancelled by request before it started on the cluster")
        else:
            self.store.requeue_or_fail(item.job.id, f"lost on the Ray cluster: {problem or 'the task ended early'}")
        log.info("job %s settled by the dispatcher: %s", item.job.id, self.store.get(item.job.id).status)

    def _shutdown(self) -> None:
        """Stop every task of ours; their jobs are requeued (checkpoint) or failed, as on a local worker."""
        if not self._inflight:
            return
        name = self.stop_reason
        for item in self._inflight.values():
            self._ray.cancel(item.ref, force=True)
        deadline = time.monotonic() + 30
        for job_id, item in list(self._inflight.items()):
            try:
                self._ray.get(item.ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # cancelled, as asked
                pass
            current = self.store.get(job_id)
            if current.status == RUNNING:
                self.store.requeue_or_fail(job_id, f"interrupted: dispatcher {self.dispatcher_id} was stopped ({name})")
        self._inflight.clear()
