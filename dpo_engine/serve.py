"""Start the web app (and, by default, a worker) as one supervised pair of processes.

Lives in the engine so the CLI stays a thin shell; it launches the Streamlit app as a
subprocess by path and never imports it. Ctrl-C (SIGINT) or SIGTERM stops both processes.

Served beyond loopback the app is a team deployment and must know who is visiting:
`check_deployment` refuses to start it without authentication, either Streamlit's own OIDC
login (`st.login`, configured in `.streamlit/secrets.toml` under `[auth]`) or a reverse proxy
that authenticates and passes the user in a header checked against an allow-list. There the
browser is shown no tracebacks or server paths (`client.showErrorDetails = "none"`). The app's
login gate (app/auth.py) reads the chosen mode from the environment variables set here.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dpo_engine.workspace import ENV_WORKSPACE, Workspace

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_ENTRY = REPO_ROOT / "app" / "gate.py"
CONFIG_FILE = REPO_ROOT / "streamlit_config.toml"
# Where Streamlit looks for secrets when started from REPO_ROOT (its default `secrets.files`).
SECRETS_FILES = (Path.home() / ".streamlit" / "secrets.toml", REPO_ROOT / ".streamlit" / "secrets.toml")

AUTH_MODES = ("none", "oidc", "proxy")
BACKENDS = ("local", "ray")
ENV_AUTH = "DPO_KERNELS_AUTH"
ENV_AUTH_HEADER = "DPO_KERNELS_AUTH_HEADER"
ENV_ALLOWED_USERS = "DPO_KERNELS_ALLOWED_USERS"
OIDC_PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")
_HEADER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")


class DeploymentError(ValueError):
    """The app would be served unsafely or its authentication is misconfigured."""


@dataclass(frozen=True)
class AuthSettings:
    """How visitors are identified: none (loopback only), Streamlit OIDC login, or a trusted proxy header."""

    mode: str = "none"
    header: str = "X-Forwarded-User"
    allowed_users: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        return {ENV_AUTH: self.mode, ENV_AUTH_HEADER: self.header, ENV_ALLOWED_USERS: ",".join(self.allowed_users)}


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (None means the configured default, 127.0.0.1)."""
    if host is None or host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _oidc_problem(secrets_files: tuple[Path, ...]) -> str | None:
    section: dict = {}
    for path in secrets_files:
        if path.exists():
            try:
                section = tomllib.loads(path.read_text()).get("auth", {}) or section
            except tomllib.TOMLDecodeError as exc:
                return f"{path} is not valid TOML: {exc}"
    if not section:
        return f"no [auth] section in {' or '.join(str(p) for p in secrets_files)}"
    missing = [k for k in ("redirect_uri", "cookie_secret") if not section.get(k)]
    providers = [section] + [v for v in section.values() if isinstance(v, dict)]
    if not any(all(p.get(k) for k in OIDC_PROVIDER_KEYS) for p in providers):
        missing.append("a provider with " + ", ".join(OIDC_PROVIDER_KEYS))
    if missing:
        return "[auth] in .streamlit/secrets.toml lacks " + "; ".join(missing)
    if importlib.util.find_spec("authlib") is None:
        return "Streamlit's login needs the Authlib package: pip install 'Authlib==1.9.6'"
    return None


def check_deployment(host: str | None, auth: AuthSettings, secrets_files: tuple[Path, ...] = SECRETS_FILES) -> None:
    """Raise `DeploymentError` (one line) when the app must not start with these settings."""
    if auth.mode not in AUTH_MODES:
        raise DeploymentError(f"unknown --auth {auth.mode!r}; choose from {', '.join(AUTH_MODES)}")
    if auth.mode == "none":
        if not is_loopback(host):
            raise DeploymentError(
                f"refusing to serve on {host} without authentication: use --auth oidc (Streamlit login, "
                "[auth] in .streamlit/secrets.toml) or --auth proxy --allow-header HEADER --allow-user NAME "
                "behind an authenticating reverse proxy (README: Team deployment)"
            )
        return
    if auth.mode == "oidc":
        problem = _oidc_problem(secrets_files)
        if problem:
            raise DeploymentError(f"--auth oidc: {problem}")
        return
    if not _HEADER_RE.match(auth.header or ""):
        raise DeploymentError(f"--auth proxy: invalid --allow-header {auth.header!r}")
    if not auth.allowed_users:
        raise DeploymentError("--auth proxy needs an allow-list: one --allow-user NAME per person")


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


def streamlit_command(host: str | None = None, port: int | None = None) -> list[str]:
    """`streamlit run` for the app; beyond loopback, visitors see no tracebacks or server paths."""
    overrides: dict[str, object] = {"server_address": host, "server_port": port, "browser_serverAddress": host}
    if not is_loopback(host):
        overrides["client_showErrorDetails"] = "none"
    return [sys.executable, "-m", "streamlit", "run", str(APP_ENTRY), *streamlit_flags(**overrides)]


def worker_command(
    workspace: Workspace, backend: str = "local", device: str = "auto", address: str | None = None
) -> list[str]:
    """The `dpo-kernels worker` command line the app starts beside itself."""
    if backend not in BACKENDS:
        raise DeploymentError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    cmd = [sys.executable, "-m", "dpo_engine.cli", "worker", "--backend", backend, "--workspace", str(workspace.root)]
    if backend == "ray":
        return cmd + (["--address", address] if address else [])
    return cmd + ["--device", device]


def launch(
    workspace: Workspace,
    host: str | None = None,
    port: int | None = None,
    with_worker: bool = True,
    device: str = "auto",
    auth: AuthSettings = AuthSettings(),
    backend: str = "local",
    address: str | None = None,
) -> int:
    """Run Streamlit (and a worker) until one exits or the user interrupts; return an exit code.

    Raises `DeploymentError` before starting anything when the settings are unsafe or invalid."""
    check_deployment(host, auth)
    worker_cmd = worker_command(workspace, backend, device, address)
    env = dict(os.environ, **{ENV_WORKSPACE: str(workspace.root)}, **auth.env())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    cmd = streamlit_command(host, port)
    procs: list[subprocess.Popen] = []
    if with_worker:
        procs.append(subprocess.Popen(worker_cmd, env=env))
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
