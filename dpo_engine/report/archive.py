"""Zip a run directory (or its model/) in memory for a download button."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

# Resumable checkpoints and cached projections are large and reproducible; a shared run leaves them out.
DEFAULT_EXCLUDES = ("checkpoints", "projections")


def zip_directory(path: str | Path, *, exclude: tuple[str, ...] = (), root_name: str | None = None) -> bytes:
    """Zip every file under `path`, skipping top-level entries named in `exclude`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    buffer = io.BytesIO()
    root = root_name or path.name
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path)
            if not file.is_file() or relative.parts[0] in exclude:
                continue
            archive.write(file, arcname=str(Path(root) / relative))
    return buffer.getvalue()
