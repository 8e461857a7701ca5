"""Job-store fixtures on both databases: the workspace's SQLite file and a real PostgreSQL server.

The PostgreSQL server is started once per test session with `initdb` + `pg_ctl`, listening only
on a Unix socket in a private temporary directory (as the `postgres` user, or a system user made
for it, when the tests run as root: the server refuses to run as root). Each test gets a fresh
database on it. Test modules import these fixtures, which replace the SQLite-only `ws`/`store`
of conftest.py with versions parametrised over both backends.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

PG_USER_FALLBACK = "dpo-pg"
SKIP_ENV = "DPO_KERNELS_SKIP_POSTGRES"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _server_user() -> str | None:
    """None when not root (run the server as ourselves); else a non-root account to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_FALLBACK):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER_FALLBACK],
        check=True,
        capture_output=True,
    )
    return PG_USER_FALLBACK


class PostgresServer:
    """A throwaway PostgreSQL cluster on a Unix socket; `new_database()` hands out fresh databases."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) not found; `make test` installs "
                "Debian's postgresql package, or set DPO_KERNELS_SKIP_POSTGRES=1"
            )
        self.pg_ctl = pg_ctl
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="dpo-pg-"))  # short path: socket names are limited
        self.data = self.root / "data"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        options = (
            f"-k {self.root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start"])
        self._names = itertools.count()
        self._lock = threading.Lock()

    def _run(self, cmd: list[str]) -> None:
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.root), user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        with self._lock:
            name = f"t{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


_server: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole session, shared by every module that imports this."""
    global _server, _users
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    if _server is None:
        _server = PostgresServer()
    _users += 1
    yield _server
    _users -= 1
    if _users == 0:
        _server.stop()
        _server = None


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def fresh_db_url(request, backend, tmp_path):
    """A URL of an empty database on the chosen backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'jobs.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = server.new_database()
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def ws(workspace, backend, request, monkeypatch):
    """The test workspace, its job database on the chosen backend (exported for subprocesses)."""
    if backend == "postgresql":
        monkeypatch.setenv("DPO_KERNELS_DB_URL", request.getfixturevalue("fresh_db_url"))
    return workspace


@pytest.fixture
def store(ws):
    from dpo_engine.jobs import JobStore

    s = JobStore.for_workspace(ws)
    yield s
    s.close()
