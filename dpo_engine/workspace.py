"""The workspace: one directory holding datasets, embeddings, runs, the model cache and the job DB.

Every component finds its files through a `Workspace`, so the app, the CLI, the worker and the
tests agree on where things live. Location: `--workspace`, else `$DPO_KERNELS_WORKSPACE`, else
`./workspace`. The job database is SQLite (WAL) inside the workspace unless
`$DPO_KERNELS_DB_URL` names another SQLAlchemy URL (e.g. PostgreSQL shared by several machines).
"""

from __future__ import annotations

import errno
import getpass
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

ENV_WORKSPACE = "DPO_KERNELS_WORKSPACE"
ENV_DB_URL = "DPO_KERNELS_DB_URL"
ENV_MODEL_CACHE = "DPO_KERNELS_MODEL_CACHE"

# Who is acting: the signed-in user of the web session that is running (set per script run by the
# app's login gate; each Streamlit run has its own thread, hence its own context), else nobody.
acting_user: ContextVar[str | None] = ContextVar("acting_user", default=None)


def current_user() -> str:
    """The signed-in web user when there is one, else the operating-system user (CLI, local app)."""
    user = acting_user.get()
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid-{os.getuid()}"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        """Pick the workspace from an explicit path, the environment, or ./workspace; create it."""
        chosen = path or os.environ.get(ENV_WORKSPACE) or "workspace"
        ws = cls(Path(chosen).expanduser().resolve())
        ws.ensure()
        return ws

    def ensure(self) -> None:
        for d in (self.root, self.datasets_dir, self.embeddings_dir, self.runs_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def models_dir(self) -> Path:
        """Converted model cache (e.g. the SmolLM2 GGUF dequantised to safetensors).

        `$DPO_KERNELS_MODEL_CACHE` points several workspaces (tests, other users) at one cache so
        the one-time conversion is not repeated.
        """
        override = os.environ.get(ENV_MODEL_CACHE)
        return Path(override).expanduser().resolve() if override else self.root / "models"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    @property
    def db_url(self) -> str:
        return os.environ.get(ENV_DB_URL) or f"sqlite:///{self.root / 'jobs.db'}"


# A name that is safe as one path component of the workspace: no separators, no "..", no leading dot.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# What a write raises when the disk, a quota or a file-size limit is reached.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_message(exc: BaseException) -> str | None:
    """A one-line message when `exc` says the workspace's disk (or quota) is full, else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        where = f" while writing {Path(exc.filename).name}" if getattr(exc, "filename", None) else ""
        return f"the workspace disk is full ({exc.strerror}){where}; free space and try again"
    return None
