"""Sentence embeddings of preference pairs (METHOD.md 1.1), offline, deduplicated and cached."""

from dpo_engine.embed.encoder import (
    DEFAULT_EMBEDDER,
    PRECISIONS,
    EmbedderNotAvailable,
    bundled_model_dir,
    embed_texts,
    load_embedder,
    resolve_embedder,
    resolve_precision,
)
from dpo_engine.embed.pairs import PairEmbeddings, cache_path, embed_pairs, table_content_hash

__all__ = [
    "DEFAULT_EMBEDDER",
    "PRECISIONS",
    "EmbedderNotAvailable",
    "PairEmbeddings",
    "bundled_model_dir",
    "cache_path",
    "embed_pairs",
    "embed_texts",
    "load_embedder",
    "resolve_embedder",
    "resolve_precision",
    "table_content_hash",
]
