"""Shared test fixtures: offline hub, a fresh workspace per test, one model cache per machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests read only data the repository ships (assets/, with their licences).
HH_SAMPLE = REPO_ROOT / "assets" / "sample_hh.jsonl.gz"
PANDALM_SAMPLE = REPO_ROOT / "assets" / "pandalm_test_pairs.jsonl.gz"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Several test processes share the cores: one compute thread each, or their thread pools spin
# against each other (set before torch is imported; job subprocesses inherit it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Converting the bundled GGUF policy takes ~25 s: do it once per machine, not once per test.
os.environ.setdefault("DPO_KERNELS_MODEL_CACHE", str(REPO_ROOT / ".cache" / "models"))


# The slow tier: modules that start servers (PostgreSQL, Ray, the app), worker or training
# processes, or a browser. `make test-fast` leaves them out; `make test` runs everything.
SLOW_MODULES = frozenset(
    {
        "test_allocator",
        "test_browser_e2e",
        "test_figure_export",
        "test_jobs_cli",
        "test_jobs_ray",
        "test_jobs_worker",
        "test_ray_security",
        "test_selection_hh",
        "test_team_deployment",
        "test_train_job_resume",
        "test_train_multiprocess",
        "test_train_ray",
    }
)
# Tests that share something expensive run in one xdist process: a module's module-scoped fixtures,
# one Ray cluster, one PostgreSQL server. Every other test is handed to whichever process is free.
SHARED_GROUPS = {
    "test_htsr": "test_htsr",
    "test_selection_estimators": "test_selection_estimators",
    "test_selection_hh": "test_selection_hh",
    "test_token_preflight": "test_token_preflight",
    "test_jobs_ray": "ray",
    "test_train_ray": "ray",
    "test_ray_security": "ray",
    "test_allocator": "postgres",
    "test_jobs_store": "postgres",
    "test_jobs_worker": "postgres",
}


def _is_slow(item: pytest.Item) -> bool:
    if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
        return True
    if item.get_closest_marker("real_model") or item.get_closest_marker("browser"):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "postgresql" in params.values()  # the PostgreSQL half of the job-store suite


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tier markers, the xdist groups of SHARED_GROUPS, and the slow tier first: handed out in this
    order, the longest tests start while every process is free instead of ending the run alone."""
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        group = SHARED_GROUPS.get(item.module.__name__.rsplit(".", 1)[-1])
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept within a tier


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; a job runs
    in a process of its own, but tests run many trainings in one, so each test starts from a clean one."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def torch_single_thread():
    """For modules of tiny tensors: thread hand-offs would cost more than the arithmetic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hh_sample_path() -> Path:
    """The real HH-RLHF sample the repository ships."""
    return HH_SAMPLE


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace in tmp_path, also exported for subprocesses."""
    from dpo_engine.workspace import Workspace

    root = tmp_path / "ws"
    monkeypatch.setenv("DPO_KERNELS_WORKSPACE", str(root))
    monkeypatch.delenv("DPO_KERNELS_DB_URL", raising=False)
    return Workspace.resolve(root)


@pytest.fixture
def ws(workspace):
    """Short alias used by the job tests."""
    return workspace


@pytest.fixture
def store(workspace):
    """A job store on the test workspace's SQLite database."""
    from dpo_engine.jobs import JobStore

    s = JobStore.for_workspace(workspace)
    yield s
    s.close()
