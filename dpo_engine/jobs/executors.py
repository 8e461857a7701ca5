"""Which function runs each job kind, named as "module:function" and imported only in the child.

Keeping targets as strings means the worker (and the web app that submits jobs) never imports
torch or any other heavy dependency; only the job's own child process does.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

# An executor takes a `dpo_engine.jobs.context.JobContext`; it is not imported here so that the
# store (which checks kinds against this registry) and the context (which holds a store) do not
# import each other.
Executor = Callable[..., "dict[str, Any] | None"]

_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

_REGISTRY: dict[str, str] = {
    "ingest": "dpo_engine.data.job:run_ingest_job",
    "embed": "dpo_engine.embed.job:run_embed_job",
    "diagnose": "dpo_engine.selection.job:run_diagnose_job",
    "train": "dpo_engine.train.job:run_train_job",
    "htsr": "dpo_engine.analysis.htsr_job:run_htsr_job",
    "selftest": "dpo_engine.jobs.selftest:run_selftest_job",
}

# Kinds whose job can simply run again from the start when its worker died (no checkpoint needed).
RESTARTABLE_KINDS: frozenset[str] = frozenset({"ingest"})


class ExecutorError(RuntimeError):
    """A job kind has no executor, or its target cannot be imported."""


def register_executor(kind: str, target: str) -> None:
    """Add or replace the executor for `kind`; `target` is "package.module:function"."""
    if not kind or not re.match(r"^[a-z][a-z0-9_-]{0,63}$", kind):
        raise ValueError(f"invalid job kind {kind!r}: use lowercase letters, digits, '_' or '-'")
    if not _TARGET_RE.match(target):
        raise ValueError(f"invalid executor target {target!r}: expected 'package.module:function'")
    _REGISTRY[kind] = target


def known_kinds() -> dict[str, str]:
    return dict(_REGISTRY)


def resolve_executor(kind: str, target: str | None = None) -> Executor:
    """Import and return the executor for `kind` (call this in the job's child).

    `target` is the "module:function" recorded in the job row at submit time, so a kind
    registered by the submitting process runs even in a worker that never registered it.
    """
    target = target or _REGISTRY.get(kind)
    if target is None:
        raise ExecutorError(f"no executor registered for job kind {kind!r}")
    if not _TARGET_RE.match(target):
        raise ExecutorError(f"invalid executor target {target!r} for job kind {kind!r}")
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExecutorError(f"cannot import {module_name} for job kind {kind!r}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ExecutorError(f"{target} (job kind {kind!r}) is not a callable")
    return fn
