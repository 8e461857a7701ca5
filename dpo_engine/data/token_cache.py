"""Tokenised datasets kept in the workspace, so a second run on the same data never tokenises again.

`<workspace>/token_cache/<key>.npz` holds a table's `TokenArrays`. The key is a hash of everything
the token ids depend on: the data (a stored dataset's content hash and row count; a file's path,
size and modification time, `file_cache.file_key`, and row count; else a hash of the table itself),
the tokenizer (its name, its full definition: vocabulary, merges, normaliser, added tokens; its chat
template and EOS; the tokenizers version) and max_length / max_prompt_length. A file is written whole
(temporary file, then an atomic rename); one that does not read back as the arrays of its key is
rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dpo_engine.data.token_arrays import SIDES, Ragged, TokenArrays, tokenize_arrays
from dpo_engine.data.tokenize import prompt_prefix, response_end

CACHE_DIR = "token_cache"
FORMAT = 4  # bump when the file layout or the tokenisation rule changes


def table_hash(df: pd.DataFrame) -> str:
    """sha256 of the texts tokenisation reads (pair ids, prompt, chosen, rejected), each entry's length
    included so no two tables collide by where one text ends and the next begins."""
    digest = hashlib.sha256()
    for column in ("pair_id", "prompt", "chosen", "rejected"):
        texts = [str(t) for t in df[column]]
        digest.update(column.encode())
        digest.update(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)).tobytes())
        digest.update("\x00".join(texts).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its definition, chat template, EOS and class."""
    import tokenizers

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens
        definition = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    fields = {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", ""),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
        "special_tokens": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "tokenizers": tokenizers.__version__,
        "prompt_prefix": prompt_prefix(tokenizer),  # a slow tokenizer's add_bos_token is not in its vocabulary
        "response_end": response_end(tokenizer),
    }
    digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    digest.update(definition.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def cache_key(data_key: str, tokenizer, *, max_length: int, max_prompt_length: int) -> str:
    parts = [f"format={FORMAT}", data_key, tokenizer_hash(tokenizer), f"{max_length}|{max_prompt_length}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_path(root: Path, key: str) -> Path:
    return Path(root) / CACHE_DIR / f"{key}.npz"


def save_arrays(path: Path, key: str, arrays: TokenArrays) -> None:
    """Write the arrays under `key`, whole or not at all (temporary file + atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {"key": np.frombuffer(key.encode(), dtype=np.uint8)}
    for side in SIDES:
        ragged = getattr(arrays, side)
        fields[f"{side}_values"], fields[f"{side}_offsets"] = ragged.values, ragged.offsets
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **fields)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_arrays(path: Path, key: str, n_pairs: int) -> TokenArrays | None:
    """The arrays saved under `key` for `n_pairs` pairs, or None when the file is missing, damaged or
    holds something else."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["key"].tobytes() != key.encode():
                return None
            sides = {side: Ragged(data[f"{side}_values"], data[f"{side}_offsets"]) for side in SIDES}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for ragged in sides.values():
        offsets = ragged.offsets
        if (
            ragged.values.dtype != np.int32
            or offsets.dtype != np.int64
            or len(offsets) != n_pairs + 1
            or offsets[0] != 0
            or offsets[-1] != len(ragged.values)
            or np.any(np.diff(offsets) < 0)
        ):
            return None
    return TokenArrays(**sides)


def cached_token_arrays(
    tokenizer,
    df: pd.DataFrame,
    root: Path | None,
    *,
    max_length: int,
    max_prompt_length: int,
    data_key: str | None = None,
    log: Callable[[str], None] = print,
) -> TokenArrays:
    """The table's `TokenArrays`, read from the workspace's token cache when it holds them, else
    tokenised and saved there.

    `data_key` names the table's content when the caller knows it (a stored dataset's content hash
    and row count); otherwise the table is hashed. `root` None tokenises without a cache."""
    lengths = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    if root is None:
        return tokenize_arrays(tokenizer, df, **lengths)
    key = cache_key(data_key or f"table:{table_hash(df)}", tokenizer, **lengths)
    path = cache_path(root, key)
    arrays = load_arrays(path, key, len(df))
    if arrays is not None:
        log(f"token cache: read {len(df)} tokenised pair(s) from {CACHE_DIR}/{path.name}")
        return arrays
    if path.exists():
        log(f"token cache: {CACHE_DIR}/{path.name} is unreadable or stale; tokenising again")
    t0 = time.perf_counter()
    arrays = tokenize_arrays(tokenizer, df, **lengths)
    try:
        save_arrays(path, key, arrays)
    except OSError as exc:  # a full or read-only workspace: the run goes on with the arrays in memory
        log(f"token cache: could not save {CACHE_DIR}/{path.name} ({exc})")
    else:
        log(f"token cache: tokenised {len(df)} pair(s) in {time.perf_counter() - t0:.1f}s, saved to {CACHE_DIR}/")
    return arrays
