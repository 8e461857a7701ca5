"""Per-process handles the pages share: the workspace and its stores.

Cached with st.cache_resource keyed by the workspace path, so every page and rerun reuses one
database engine, and tests that point DPO_KERNELS_WORKSPACE elsewhere get their own.
"""

from __future__ import annotations

import os

import streamlit as st

from dpo_engine.workspace import ENV_WORKSPACE, Workspace


def workspace() -> Workspace:
    return _workspace(os.environ.get(ENV_WORKSPACE, "workspace"))


@st.cache_resource(show_spinner=False)
def _workspace(path: str) -> Workspace:
    return Workspace.resolve(path)


def job_store():
    return _job_store(str(workspace().root))


@st.cache_resource(show_spinner=False)
def _job_store(root: str):
    from dpo_engine.jobs import JobStore

    return JobStore.for_workspace(Workspace.resolve(root))


def dataset_store():
    from dpo_engine.data import DatasetStore

    return DatasetStore(workspace())
