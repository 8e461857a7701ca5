"""How many rows of logits (rows × vocabulary) to form at a time: the LM head and the divergences share it."""

from __future__ import annotations

HEAD_CHUNK_ROWS = 256
"""Rows per chunk at most: 256 × 49k float32 logits = 50 MB at a time instead of N × V."""
HEAD_CHUNK_MIN_ROWS = 64


def head_chunk_rows(hidden_size: int) -> int:
    """Rows per chunk for a head of this hidden size: hidden_size / 4 within [64, 256].

    A logit costs H multiply-adds to form and is then read twice (logsumexp, gather). With a narrow
    hidden state the pass is bound by moving the chunk's logits, not by the matrix product, and a
    smaller chunk stays in the processor's cache; with a wide one the product dominates and wants
    many rows at once. docs/BENCHMARKS.md has the measurement behind the bounds."""
    return max(HEAD_CHUNK_MIN_ROWS, min(HEAD_CHUNK_ROWS, hidden_size // 4))
