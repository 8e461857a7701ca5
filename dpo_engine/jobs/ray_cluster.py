"""Ray clusters without open doors: a loopback head with a token, and how a driver finds and joins a cluster.

Ray's control plane has no authentication unless `RAY_AUTH_MODE=token`: whoever reaches its ports
can run code on every node (https://docs.ray.io/en/latest/ray-security/index.html, CVE-2023-48022).
So the one head this product starts (`dpo-kernels cluster start`, the test fixtures) listens on
127.0.0.1 only and asks every client for a token.

`ray start --node-ip-address=127.0.0.1` alone is not enough in Ray 2.60: Ray turns "127.0.0.1" into
the machine's network address (`ray._private.services.resolve_ip_for_localhost`), then registers
the node there and binds the GCS and raylet to all interfaces. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
is the switch that keeps loopback as loopback; every process that joins such a head needs it too
(else it looks for the head on the network address), and no other machine can join one.

A driver (the dispatcher, Ray Train's launcher) never leaves the address to `ray.init("auto")`:
that follows Ray's current-cluster file even when it names a cluster long gone, then retries for
minutes. `join` resolves the address itself and checks that something answers there first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Keeps "127.0.0.1" from being rewritten to the machine's network address (see the module docstring).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ENV_AUTH_MODE = "RAY_AUTH_MODE"
ENV_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
ENV_RAY_ADDRESS = "RAY_ADDRESS"
CURRENT_CLUSTER_FILE = "ray_current_cluster"  # written by `ray start` into its temp dir
STATE_DIR = "ray"  # in the workspace: the head this workspace started (head.json, auth_token, head.log)
NO_CLUSTER = (
    "no Ray cluster is running here: start one with `dpo-kernels cluster start`, "
    "or give --address HOST:PORT (or set RAY_ADDRESS)"
)


class RayUnavailable(RuntimeError):
    """Ray is not installed or the cluster cannot be reached."""


# ---- addresses ------------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayUnavailable(
            f"invalid Ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default)"
        )
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a wrong `host:port` (Ray itself would retry for minutes)."""
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def current_cluster_file() -> Path:
    """Where `ray start` without --temp-dir records its address (Ray's rule: $RAY_TMPDIR, else
    $TMPDIR, else /tmp, then ray/). Read here without importing Ray, which must not load before
    `join` has set up the environment."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / "ray" / CURRENT_CLUSTER_FILE


@dataclass(frozen=True)
class Located:
    address: str
    token_path: Path | None  # the token of a head this workspace started, when that is the cluster
    source: str  # where the address came from, for the error line


def locate(address: str | None, workspace=None) -> Located:
    """The cluster to join: the given address, else RAY_ADDRESS, else the head this workspace
    started, else the address `ray start` left in Ray's current-cluster file."""
    head = HeadRecord.load(workspace) if workspace is not None else None
    if address and address != "auto":
        source = "--address"
    elif os.environ.get(ENV_RAY_ADDRESS, "auto") not in ("", "auto"):
        address, source = os.environ[ENV_RAY_ADDRESS], ENV_RAY_ADDRESS
    elif head is not None:
        address, source = head.address, f"the cluster started for {Path(workspace.root)}"
    else:
        path = current_cluster_file()
        try:
            address = path.read_text(encoding="utf-8").strip()
        except OSError:
            address = ""
        if not address:
            raise RayUnavailable(NO_CLUSTER)
        source = f"Ray's current-cluster file {path} (stale if that cluster has stopped)"
    token = head.token_path if head is not None and head.address == address else None
    return Located(address=address, token_path=token, source=source)


def join(address: str | None, workspace=None) -> str:
    """Resolve the address, fail within seconds when nothing answers there, and set this process up
    to join: loopback kept as loopback, the token of a head this workspace started. Call before
    `ray.init`; returns the address to give it."""
    found = locate(address, workspace)
    if "://" in found.address:  # ray:// (Ray Client): Ray checks it
        return found.address
    try:
        check_reachable(found.address)
    except RayUnavailable as exc:
        if found.source.startswith("--address"):
            raise
        raise RayUnavailable(f"{exc} (address from {found.source})") from None
    env = dict(LOOPBACK_ENV) if is_loopback_host(split_address(found.address)[0]) else {}
    if found.token_path is not None:
        env.update(auth_env(found.token_path))
    apply_env(env)
    return found.address


def apply_env(env: dict[str, str]) -> None:
    """Set Ray settings in this process (and its children). Ray caches its config and token when it
    loads; if it already has (a process that joined another cluster before), they are reloaded."""
    os.environ.update(env)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        constants.ENABLE_RAY_CLUSTER = False  # the value Ray read from that variable at import
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


# ---- tokens ---------------------------------------------------------------------------------


def auth_env(token_path: str | os.PathLike) -> dict[str, str]:
    """Ray's own settings for token authentication: the mode, and the file that holds the token."""
    return {ENV_AUTH_MODE: "token", ENV_AUTH_TOKEN_PATH: str(token_path)}


def write_token(path: Path) -> Path:
    """A fresh random token, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_hex(32))
    return path


# ---- the loopback head ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def head_command(
    temp_dir: str | os.PathLike,
    *,
    token_path: str | os.PathLike | None,
    port: int = 0,
    client_server_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """`ray start` for a head that only this machine can reach, and the environment it needs on top
    of the caller's. port 0: Ray picks a free one and writes it to temp_dir/ray_current_cluster."""
    ray = str(Path(sys.executable).parent / "ray")
    argv = [
        ray,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        # Ray Client's server starts whenever its packages are installed (port 10001 unless told):
        # a port of its own keeps two heads on one machine apart
        f"--ray-client-server-port={client_server_port or free_port()}",
        "--include-dashboard=false",
        f"--dashboard-host={LOOPBACK}",
        f"--temp-dir={Path(temp_dir)}",  # also where the address is recorded, not the shared /tmp/ray
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    if object_store_memory is not None:
        argv.append(f"--object-store-memory={object_store_memory}")
    env = dict(LOOPBACK_ENV)
    if token_path is not None:
        env.update(auth_env(token_path))
    return argv, env


@dataclass
class HeadRecord:
    """A running loopback head: what a driver needs to join it and `stop_head` needs to end it."""

    address: str
    pid: int  # `ray start --block`, leader of the head's process group
    temp_dir: str
    token_path: Path | None
    log_path: str

    @property
    def env(self) -> dict[str, str]:
        """What a process that joins this head needs in its environment."""
        return {**LOOPBACK_ENV, **(auth_env(self.token_path) if self.token_path else {})}

    @staticmethod
    def state_dir(workspace) -> Path:
        return Path(workspace.root) / STATE_DIR

    def save(self, workspace) -> None:
        data = {**asdict(self), "token_path": str(self.token_path) if self.token_path else None}
        (self.state_dir(workspace) / "head.json").write_text(json.dumps(data, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, workspace) -> HeadRecord | None:
        """The head this workspace started, if it is still running."""
        try:
            data = json.loads((cls.state_dir(workspace) / "head.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        record = cls(**{**data, "token_path": Path(data["token_path"]) if data.get("token_path") else None})
        return record if _is_head(record.pid, record.temp_dir) else None


def _is_head(pid: int, temp_dir: str) -> bool:
    """pid is still our `ray start` (not a process that reused its number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return f"--temp-dir={temp_dir}" in cmdline


def start_head(
    temp_dir: str | os.PathLike | None = None,
    *,
    token_path: str | os.PathLike | None,
    log_path: str | os.PathLike | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    timeout_s: float = 120.0,
) -> HeadRecord:
    """Start a loopback head in a process group of its own and wait until its GCS answers.

    temp_dir: Ray's session files and sockets; a short new one under the system temp dir when None
    (Unix socket paths must stay short)."""
    temp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="dpo-ray-"))
    temp.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else temp / "head.log"
    argv, env = head_command(
        temp, token_path=token_path, num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **env},
        )
    record = HeadRecord(
        address="",
        pid=proc.pid,
        temp_dir=str(temp),
        token_path=Path(token_path) if token_path else None,
        log_path=str(log),
    )
    address_file = temp / CURRENT_CLUSTER_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        address = address_file.read_text(encoding="utf-8").strip() if address_file.exists() else ""
        if address:
            try:
                check_reachable(address, timeout_s=2.0)
            except RayUnavailable:
                pass
            else:
                record.address = address
                return record
        time.sleep(0.2)
    stop_head(record)
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise RayUnavailable(
        f"the Ray head did not start within {timeout_s:.0f} s{': ' + tail[0] if tail else ''} (log: {log})"
    )


STOP_GRACE_S = 16.0  # what `ray stop` allows before it force-kills


def stop_head(record: HeadRecord, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left after `grace_s`: an idle head's
    GCS server and `ray start --block` take about 30 s to leave on SIGTERM alone, with nothing to save."""
    try:
        os.killpg(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(record.pid, os.WNOHANG)[0] == record.pid:
                break
        except ChildProcessError:  # not our child (`cluster stop` from another process)
            if not _is_head(record.pid, record.temp_dir):
                break
        time.sleep(0.2)
    try:
        os.killpg(record.pid, signal.SIGKILL)  # stragglers of the group, if any
    except ProcessLookupError:
        pass
    try:
        os.waitpid(record.pid, 0)
    except ChildProcessError:
        pass


def remove_temp_dir(record: HeadRecord) -> None:
    shutil.rmtree(record.temp_dir, ignore_errors=True)


# ---- the head a workspace starts (`dpo-kernels cluster start|stop`) -----------------------------


def start_for_workspace(workspace, *, num_cpus: int | None = None, num_gpus: int | None = None) -> HeadRecord:
    """Start this workspace's loopback head with a new token; refused while one is running."""
    running = HeadRecord.load(workspace)
    if running is not None:
        raise RayUnavailable(f"a Ray cluster started for this workspace is already running at {running.address}")
    state = HeadRecord.state_dir(workspace)
    token = write_token(state / "auth_token")
    record = start_head(token_path=token, log_path=state / "head.log", num_cpus=num_cpus, num_gpus=num_gpus)
    record.save(workspace)
    return record


def stop_for_workspace(workspace) -> HeadRecord | None:
    """Stop this workspace's head (None when none is running) and remove its token and temp dir."""
    record = HeadRecord.load(workspace)
    state = HeadRecord.state_dir(workspace)
    if record is not None:
        stop_head(record)
        remove_temp_dir(record)
    for name in ("head.json", "auth_token"):
        (state / name).unlink(missing_ok=True)
    return record
