"""Start the web app (and, by default, a local worker) as one supervised pair of processes.

Lives in the engine so the CLI stays a thin shell; it launches the Streamlit app as a
subprocess by path and never imports it. Ctrl-C (SIGINT) or SIGTERM stops both processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from dpo_engine.workspace import ENV_WORKSPACE, Workspace

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_ENTRY = REPO_ROOT / "app" / "main.py"
CONFIG_FILE = REPO_ROOT / "streamlit_config.toml"


def streamlit_flags(config_file: Path = CONFIG_FILE, **overrides: object) -> list[str]:
    """Turn streamlit_config.toml into `--section.key=value` flags; overrides win (e.g. server_port)."""
    config: dict[str, dict[str, object]] = {}
    if config_file.exists():
        config = tomllib.loads(config_file.read_text())
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition("_")
        config.setdefault(section, {})[name] = value
    flags = []
    for section, values in config.items():
        for name, value in values.items():
            if isinstance(value, bool):
                value = str(value).lower()
            flags.append(f"--{section}.{name}={value}")
    return flags


def launch(
    workspace: Workspace,
    host: str | None = None,
    port: int | None = None,
    with_worker: bool = True,
    device: str = "auto",
) -> int:
    """Run Streamlit (and a worker) until one exits or the user interrupts; return an exit code."""
    env = dict(os.environ, **{ENV_WORKSPACE: str(workspace.root)})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_ENTRY), *streamlit_flags(
        server_address=host, server_port=port, browser_serverAddress=host)]
    procs: list[subprocess.Popen] = []
    if with_worker:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dpo_engine.cli", "worker", "--device", device,
             "--workspace", str(workspace.root)], env=env))
    procs.append(subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT)))

    stopping = False

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        while not stopping:
            for p in procs:
                rc = p.poll()
                if rc is not None:
                    code = rc
                    stopping = True
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    return code
