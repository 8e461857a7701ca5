"""Policy models: a small registry of named models plus any local Hugging Face directory or cached id."""

from dpo_engine.models.loading import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    UnknownModelError,
    is_known_model,
    load_policy,
    resolve_dtype,
    smollm2_gguf_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "UnknownModelError",
    "is_known_model",
    "load_policy",
    "resolve_dtype",
    "smollm2_gguf_path",
]
