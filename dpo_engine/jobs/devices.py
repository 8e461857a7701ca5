"""Device names for workers and jobs, and `auto` resolution without importing torch.

The worker stays light (no torch import): `auto` looks for an NVIDIA driver first and only
then asks a short-lived Python subprocess whether torch can actually use CUDA.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda:\d+)$")
# What a cluster dispatcher (the Ray backend) shows as its device: its jobs run on the cluster's nodes.
CLUSTER_DEVICE = "ray"


def normalize_device(device: str) -> str:
    """Canonical device name: `cpu`, `mps` or `cuda:N` (`cuda` alone means `cuda:0`)."""
    name = str(device).strip().lower()
    if name == "cuda":
        name = "cuda:0"
    if not _DEVICE_RE.match(name):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'mps', 'cuda' or 'cuda:N'")
    return name


def _nvidia_driver_present() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


@functools.cache
def cuda_device_count(timeout_s: float = 120.0) -> int:
    """How many CUDA devices torch in this interpreter can use (asked once per process, in a
    subprocess, so the worker never imports torch); 0 when none."""
    if not _nvidia_driver_present():
        return 0
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    last = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    return int(last[0]) if last and last[0].isdigit() else 0


def cuda_usable(timeout_s: float = 120.0) -> bool:
    """True when torch in this interpreter sees a CUDA device (checked in a subprocess)."""
    return cuda_device_count(timeout_s) > 0


def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda:0` when CUDA is usable, else `cpu`; anything else is validated."""
    if str(device).strip().lower() == "auto":
        return "cuda:0" if cuda_usable() else "cpu"
    return normalize_device(device)


def pinned_visible_devices(device: str, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the processes of a worker pinned to `device` (`cuda:N`): only that GPU,
    so a job, and every process it launches (torch.distributed.run, DataLoader workers), uses it
    and no other. `cuda:N` counts within the worker's own CUDA_VISIBLE_DEVICES when that is set."""
    index = int(normalize_device(device).split(":")[1])
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids):
        raise ValueError(f"device {device} is not among the {len(ids)} GPU(s) CUDA_VISIBLE_DEVICES={visible!r} shows")
    return ids[index]
