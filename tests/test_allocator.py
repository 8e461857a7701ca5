"""Job processes run on jemalloc when the machine has it (dpo_engine/jobs/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dpo_engine.jobs import SUCCEEDED
from dpo_engine.jobs.allocator import ENV_ALLOCATOR, JEMALLOC_CONF, jemalloc_library, with_allocator
from tests.jobs_db import backend, fresh_db_url, postgres_server, store, ws  # noqa: F401 - fixtures
from tests.test_jobs_worker import fast_worker, read_pids

MAPS = [sys.executable, "-c", "print(open('/proc/self/maps').read())"]


def _maps(env: dict[str, str]) -> str:
    return subprocess.run(MAPS, env=env, capture_output=True, text=True, check=True).stdout


def test_a_process_started_with_the_allocator_env_maps_jemalloc():
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", ENV_ALLOCATOR)}
    env = with_allocator(base)
    library = jemalloc_library()
    if library is None:  # the machine has none: nothing changes
        assert env == base and "jemalloc" not in _maps(env)
        return
    assert env["LD_PRELOAD"] == library and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert "libjemalloc" in _maps(env)
    assert "libjemalloc" not in _maps(with_allocator(base, "system"))
    assert "libjemalloc" not in _maps(with_allocator({**base, ENV_ALLOCATOR: "system"}))


def test_other_preloads_are_kept_and_bad_choices_refused():
    library = jemalloc_library()
    env = with_allocator({"LD_PRELOAD": "/opt/x/libtrace.so", "MALLOC_CONF": "narenas:1"})
    if library is not None:
        assert env["LD_PRELOAD"] == f"{library}:/opt/x/libtrace.so"
        assert env["MALLOC_CONF"] == "narenas:1"  # a user's own jemalloc settings win
    with pytest.raises(ValueError, match=ENV_ALLOCATOR):
        with_allocator({ENV_ALLOCATOR: "tcmalloc"})


def test_the_worker_starts_jobs_on_jemalloc(ws, store):  # noqa: F811 - fixtures
    job = store.submit("selftest", {"seconds": 15.0, "steps": 30})  # alive while a loaded test reads its maps
    worker = fast_worker(ws, store)
    thread = threading.Thread(target=lambda: worker.run(once=True))
    thread.start()
    try:
        maps = Path(f"/proc/{read_pids(store, job.id)['child']}/maps").read_text()
    finally:
        thread.join()
    assert store.get(job.id).status == SUCCEEDED
    assert ("libjemalloc" in maps) == (jemalloc_library() is not None)
