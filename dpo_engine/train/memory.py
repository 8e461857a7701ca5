"""Process memory: the peak a run reports, and handing freed heap memory back to the OS.

PyTorch's CPU tensors come from malloc. glibc serves allocations below its mmap threshold (which
grows to 32 MB as large blocks are freed) from its heap arenas and keeps freed chunks there, so a
training process's resident size ratchets up to the live peak plus every phase's leftovers
(setup, each step's forward and backward, each evaluation). `release_free_memory` asks glibc to
return those free pages after each phase; the live peak inside a step is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import torch

_libc = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim); False where the C library has none."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
