"""Reference log-probabilities cached in the workspace, computed once per model and tokenised pair.

The reference model never changes during training, so log π_ref(y | x) of a pair is a constant of
(reference weights, the exact token ids of prompt and responses, numeric precision). The cache keys
on exactly that:
- the model key: a hash of every reference parameter and buffer plus the compute dtype and device
  type (and the model's logit cap or scale, logit_transform.py), so another model, a fine-tuned copy
  or bf16 instead of fp32 never reads stale values;
- the pair key: a hash of the pair's token ids, which already encode the dataset text, the
  tokenizer, the chat template, max_length / max_prompt_length and how truncation cut them.
The batch layout (packed or separate rows) and the attention kernel (model.attn_implementation) are
not in the key: they compute the same values up to float rounding (tests/test_train_speed_paths.py,
tests/test_attention_paths.py).
Values are filled as pairs are first seen (the first epoch pays the reference pass, exactly as
without a cache) and saved to `<workspace>/reference_cache/<model key>.npz`, so every later run or
epoch on the same data skips the reference forward pass. Writes merge with what other runs saved
meanwhile, under a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.logit_transform import IDENTITY, LogitTransform

CACHE_DIR = "reference_cache"


def model_key(
    model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device, transform: LogitTransform = IDENTITY
) -> str:
    """Hash of the reference weights (every parameter and buffer, in order) and how they are computed,
    its logits' soft cap or scale included (logit_transform.py; values cached before the trainer
    applied it are not reused).

    Host tensors are hashed byte for byte; a GPU's tensors by their `device_fingerprint`, so an 8B
    model's 16 GB never cross to the host (the key differs between the two, as the device type does)."""
    digest = hashlib.sha256()
    digest.update(f"{compute_dtype}|{torch.device(device).type}".encode())
    if not transform.identity:  # the identity adds nothing, so other models keep their keys
        digest.update(f"|{transform}".encode())
    pending: list[torch.Tensor] = []  # device fingerprints, read in one transfer at the end
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        data = tensor.detach()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        if data.device.type == "cpu":
            data = data.contiguous().reshape(-1)  # a 0-d buffer (Gemma's embedding scale) cannot view as bytes
            digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
        else:
            pending.append(device_fingerprint(data))
    if pending:
        digest.update(np.asarray(torch.stack(pending).cpu().numpy(), dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


_FINGERPRINT_WORDS = 1 << 22  # 32-bit words summed per chunk (about 100 MB of int64 temporaries)
_FINGERPRINT_MULTIPLIER = 0x9E3779B97F4A7C15 - (1 << 64)  # an odd 64-bit constant, as a signed int64


def device_fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two wrapping 64-bit sums of the tensor's bytes read as 32-bit words, formed where it lives:
    the plain sum and the sum weighted by an odd multiple of each word's position (so moved words
    count). A checksum, not a cryptographic hash: weights that differ give the same pair only by a
    coincidence of both sums modulo 2^64, which no training or conversion arranges; returns (2,) int64."""
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    sums = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    for start in range(0, words.numel(), _FINGERPRINT_WORDS):
        chunk = words[start : start + _FINGERPRINT_WORDS].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=tensor.device)
        sums[0] += chunk.sum()
        sums[1] += (chunk * (position * _FINGERPRINT_MULTIPLIER + 1)).sum()
    return sums


def pair_key(pair: TokenizedPair) -> bytes:
    """20-byte hash of the pair's token ids (prompt, chosen, rejected, with their boundaries)."""
    digest = hashlib.sha1()
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.digest()


class ReferenceCache:
    """Per-pair reference quantities for one reference model, loaded and saved as one file.

    Two kinds are kept: "logps", the (chosen, rejected) sequence log-probs, and "reps", the mean-pooled
    last hidden states (prompt, chosen, rejected) that calibrate the kernels.
    """

    KINDS = ("logps", "reps")

    def __init__(self, root: Path | None, key: str) -> None:
        """`root` None keeps the values in memory only (the run's own calibration and steps still share them)."""
        self.path = None if root is None else Path(root) / CACHE_DIR / f"{key}.npz"
        self._values: dict[str, dict[bytes, np.ndarray]] = self._read()
        self._dirty: dict[str, dict[bytes, np.ndarray]] = {kind: {} for kind in self.KINDS}

    def count(self, kind: str = "logps") -> int:
        return len(self._values[kind])

    def _read(self) -> dict[str, dict[bytes, np.ndarray]]:
        out: dict[str, dict[bytes, np.ndarray]] = {kind: {} for kind in self.KINDS}
        if self.path is None or not self.path.is_file():
            return out
        try:
            with np.load(self.path) as data:
                for kind in self.KINDS:
                    if f"{kind}_keys" in data:
                        keys, values = data[f"{kind}_keys"], data[f"{kind}_values"]
                        out[kind] = {k.tobytes(): v for k, v in zip(keys, values)}
        except (OSError, ValueError, KeyError):
            return {kind: {} for kind in self.KINDS}  # a damaged cache file is rebuilt, never trusted
        return out

    def get(self, kind: str, pairs: list[TokenizedPair]) -> np.ndarray | None:
        """The stacked values of `pairs` (B × ...), or None when any pair is missing."""
        table = self._values[kind]
        found = [table.get(pair_key(p)) for p in pairs]
        if any(v is None for v in found):
            return None
        return np.stack(found)

    def missing(self, kind: str, pairs: list[TokenizedPair]) -> list[TokenizedPair]:
        table = self._values[kind]
        return [p for p in pairs if pair_key(p) not in table]

    def put(self, kind: str, pairs: list[TokenizedPair], values: np.ndarray) -> None:
        """Record one value (a row of `values`) per pair; values already cached are kept."""
        table, dirty = self._values[kind], self._dirty[kind]
        for p, v in zip(pairs, np.asarray(values)):
            key = pair_key(p)
            if key not in table:
                table[key] = dirty[key] = np.array(v)

    def lookup_logps(self, pairs: list[TokenizedPair]) -> torch.Tensor | None:
        """(2B,) float64 reference log-probs, chosen then rejected, or None when any pair is missing."""
        found = self.get("logps", pairs)
        return None if found is None else torch.from_numpy(np.concatenate([found[:, 0], found[:, 1]]))

    def store_logps(self, pairs: list[TokenizedPair], logps: torch.Tensor) -> None:
        """Record (2B,) reference log-probs (chosen then rejected) for `pairs`; when every pair is cached
        already nothing is read back from the device."""
        if not self.missing("logps", pairs):
            return
        b = len(pairs)
        values = logps.detach().double().cpu().numpy()
        self.put("logps", pairs, np.stack([values[:b], values[b:]], axis=1))

    def save(self) -> None:
        """Merge new values into the file (atomic replace under a lock); a no-op when nothing is new."""
        if self.path is None or not any(self._dirty.values()):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                merged = self._read()
                arrays = {}
                for kind in self.KINDS:
                    merged[kind].update(self._dirty[kind])
                    if merged[kind]:
                        arrays[f"{kind}_keys"] = np.frombuffer(b"".join(merged[kind]), dtype=np.uint8).reshape(-1, 20)
                        arrays[f"{kind}_values"] = np.stack(list(merged[kind].values()))
                tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        for kind in self.KINDS:
            self._values[kind].update(merged[kind])
            self._dirty[kind].clear()
