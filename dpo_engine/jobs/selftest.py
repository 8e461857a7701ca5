"""The built-in `selftest` job: exercises the whole job path without any heavy dependency.

It sleeps through a number of steps reporting progress, and on request fails with an
exception, crashes hard (os._exit), writes checkpoints (and resumes from them when
requeued), or starts a grandchild process, so the worker's failure, crash, cancel and
lost-job handling can be checked end to end (`dpo-kernels jobs selftest`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dpo_engine import rundir
from dpo_engine.jobs.context import JobContext


class SelftestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=2.0, ge=0.0, le=3600.0, description="total run time")
    steps: int = Field(default=10, ge=1, le=100_000, description="number of progress steps")
    fail: bool = Field(default=False, description="raise an exception half way")
    crash_hard: bool = Field(default=False, description="os._exit(3) half way, no cleanup")
    write_checkpoint: bool = Field(default=False, description="write a checkpoint (rundir's layout) each step")
    spawn_grandchild: bool = Field(default=False, description="start a long `sleep` child process")


def write_selftest_checkpoint(run_dir, step: int) -> None:
    folder = rundir.checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rundir.CHECKPOINT_STATE).write_text(json.dumps({"step": step}))


def run_selftest_job(ctx: JobContext) -> dict[str, Any]:
    p = SelftestParams.model_validate(ctx.params)
    latest = rundir.latest_checkpoint(ctx.run_dir)
    start = rundir.checkpoint_step(latest) if latest is not None else 0
    pids: dict[str, int] = {"child": os.getpid()}
    if p.spawn_grandchild:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pids["grandchild"] = grandchild.pid
    partial = ctx.run_dir / "selftest_pids.json.part"  # whole or absent: a reader never sees it half-written
    partial.write_text(json.dumps(pids))
    partial.replace(ctx.run_dir / "selftest_pids.json")
    print(f"selftest on {ctx.device}: {p.steps} steps over {p.seconds}s, starting at step {start}", flush=True)
    half = max(1, p.steps // 2)
    for step in range(start + 1, p.steps + 1):
        if ctx.should_stop():
            print(f"selftest stopping early at step {step - 1}", flush=True)
            return {"steps_done": step - 1, "stopped_early": True, "resumed_from": start}
        time.sleep(p.seconds / p.steps)
        if step == half and p.fail:
            raise RuntimeError(f"selftest failure requested at step {step}")
        if step == half and p.crash_hard:
            print(f"selftest crashing hard at step {step}", flush=True)
            os._exit(3)
        if p.write_checkpoint:
            write_selftest_checkpoint(ctx.run_dir, step)
        print(f"selftest step {step}/{p.steps}", flush=True)
        ctx.progress(step / p.steps, f"step {step}/{p.steps}")
    return {"steps_done": p.steps, "stopped_early": False, "resumed_from": start}
