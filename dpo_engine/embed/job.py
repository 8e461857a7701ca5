"""The "embed" job: fill the embedding cache of a stored dataset (and copy it into the run directory)."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.embed.encoder import DEFAULT_BACKEND, DEFAULT_EMBEDDER, Backend, Precision, resolve_precision
from dpo_engine.embed.pairs import cache_path, canonical_embedder_name, embed_pairs, table_content_hash

EMBEDDINGS_NPZ = "embeddings.npz"


class EmbedParams(BaseModel):
    """Parameters of an embed job (every default written out)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(..., description="stored dataset id or name")
    embedder: str = DEFAULT_EMBEDDER
    max_seq_length: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1, description="texts per batch; None = the backend's default")
    precision: Precision = "auto"
    backend: Backend = DEFAULT_BACKEND


def run_embed_job(ctx) -> dict:
    """Executor of the "embed" job kind: embeds prompt, chosen and rejected of every pair."""
    from dpo_engine.data import DatasetStore

    params = EmbedParams(**ctx.params)
    started = time.perf_counter()
    store = DatasetStore(ctx.workspace)
    info = store.get(params.dataset_id)
    ctx.progress(0.0, f"loading {info.name}")
    table = store.load(info.id)

    def embedded(done: int, total: int) -> None:
        ctx.progress(min(0.99, done / max(total, 1)), f"embedded {done}/{total} texts")

    backend = params.backend if ctx.device == "cpu" else "torch"  # the ONNX backends are CPU runtimes
    try:
        embeddings = embed_pairs(
            table,
            embedder=params.embedder,
            device=ctx.device,
            batch_size=params.batch_size,
            max_seq_length=params.max_seq_length,
            progress=embedded,
            cache_dir=ctx.workspace.embeddings_dir,
            should_stop=ctx.should_stop,
            precision=params.precision,
            backend=backend,
        )
    except InterruptedError as exc:
        from dpo_engine.jobs.context import JobCancelled

        raise JobCancelled(str(exc)) from exc
    embeddings.save_npz(ctx.run_dir / EMBEDDINGS_NPZ)
    ctx.progress(1.0, f"embedded {embeddings.n_pairs} pairs")
    cached = cache_path(
        ctx.workspace.embeddings_dir,
        table_content_hash(table),
        params.embedder,
        params.max_seq_length,
        params.precision,
        ctx.device,
        backend=backend,
    )
    return {
        "dataset_id": info.id,
        "n_pairs": embeddings.n_pairs,
        "dim": embeddings.dim,
        "embedder": canonical_embedder_name(params.embedder),
        "precision": "float32/int8" if backend != "torch" else resolve_precision(params.precision, ctx.device),
        "backend": backend,
        "cache_file": str(cached),
        "wall_s": round(time.perf_counter() - started, 3),
    }
