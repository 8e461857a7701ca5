"""Job processes allocate through jemalloc when the machine has it.

Why: a training step allocates and frees hundreds of MB of activations and gradients, and glibc's
malloc keeps much of that freed memory in its arenas, so a process's peak RSS sits about 1 GB above
what its tensors need. Page purging stays on (without it jemalloc's footprint grows without bound
on a long run) and a background thread does it (`background_thread:true`), off the training thread.
The measurements are in docs/BENCHMARKS.md ("Memory allocator of job processes").

`DPO_KERNELS_ALLOCATOR=system` turns this off; without libjemalloc (Debian: `libjemalloc2`, which
`make install` installs) jobs run on the system allocator and nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ALLOCATOR = "DPO_KERNELS_ALLOCATOR"
CUDA_ALLOC_CONF = "expandable_segments:True"  # PyTorch's caching allocator in a job process (worker.py)
JEMALLOC_CONF = "background_thread:true"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/opt/homebrew/lib/libjemalloc.2.dylib",
)


def jemalloc_library() -> str | None:
    """Path of the shared jemalloc library, or None when the machine has none."""
    return next((p for p in _CANDIDATES if Path(p).is_file()), None)


def with_allocator(env: dict[str, str], allocator: str | None = None) -> dict[str, str]:
    """`env` for a job process: jemalloc preloaded (and configured) unless `allocator` (default: the
    DPO_KERNELS_ALLOCATOR variable, else "jemalloc") is "system" or the library is missing."""
    choice = (allocator or env.get(ENV_ALLOCATOR) or "jemalloc").strip().lower()
    if choice not in ("jemalloc", "system"):
        raise ValueError(f"{ENV_ALLOCATOR} must be 'jemalloc' or 'system', got {choice!r}")
    library = jemalloc_library()
    if choice == "system" or library is None:
        return dict(env)
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").split(os.pathsep) if p and "jemalloc" not in p]
    out["LD_PRELOAD"] = os.pathsep.join([library, *preload])
    out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return out
