"""Entry point of `dpo-kernels app`: identify the visitor (app/auth.py), then run the app (main.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

from app.auth import require_user

require_user()
runpy.run_path(str(Path(__file__).resolve().parent / "main.py"), run_name="__main__")
