"""Small helpers shared by test modules."""

from __future__ import annotations


def deep_merge(a: dict, b: dict) -> dict:
    """`a` updated by `b`, recursing into nested dicts (for partial config overrides)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
