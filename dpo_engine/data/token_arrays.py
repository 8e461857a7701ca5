"""A table's pairs tokenised into flat arrays, and the `TokenizedPair`s read from them on demand.

At 100k pairs a Python list of ints per prompt and response costs gigabytes and minutes to build
or unpickle; three flat int32 arrays with int64 offsets are a few hundred megabytes, save and load
as one file (data.token_cache), and a pair becomes a `TokenizedPair` only when a batch takes it.
The rule is `tokenize.tokenize_pair`'s (chat template, prompt keeps its prefix and end, responses and
their end of turn fill what max_length leaves), applied to whole arrays; the tests check it token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pandas as pd

from dpo_engine.data.tokenize import TokenizedPair, prompt_prefix, render_prompt, response_end

SIDES = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Ragged:
    """Sequences stored end to end: sequence i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than there are sequences, offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> "Ragged":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.ascontiguousarray(values, dtype=np.int32), offsets)

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> "Ragged":
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        values = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
        return cls.from_lengths(values, lengths)

    @classmethod
    def concat(cls, parts: list["Ragged"]) -> "Ragged":
        if not parts:
            return cls.from_lengths(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        return cls.from_lengths(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths() for p in parts]))

    def ends_with(self, tail: list[int]) -> np.ndarray:
        """Per sequence: whether its last tokens are `tail` (always, for an empty tail)."""
        k, lengths = len(tail), self.lengths()
        out = np.zeros(len(self), dtype=bool) if k else np.ones(len(self), dtype=bool)
        rows = np.flatnonzero(lengths >= k) if k else np.zeros(0, dtype=np.int64)
        if len(rows):
            window = self.values[(self.offsets[1:][rows] - k)[:, None] + np.arange(k)]
            out[rows] = (window == np.asarray(tail, dtype=self.values.dtype)).all(axis=1)
        return out

    def _positions(self) -> np.ndarray:
        """Each value's position inside its own sequence."""
        lengths = self.lengths()
        return np.arange(len(self.values), dtype=np.int64) - np.repeat(self.offsets[:-1], lengths)

    def take(self, index: np.ndarray) -> "Ragged":
        """The sequences at `index` (repeats allowed), in that order."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths()[index]
        out = Ragged.from_lengths(np.zeros(0, dtype=np.int32), lengths)
        gather = np.repeat(self.offsets[:-1][index] - out.offsets[:-1], lengths) + np.arange(out.offsets[-1])
        return Ragged(self.values[gather], out.offsets)

    def slice_each(self, start, stop) -> "Ragged":
        """seq[start:stop] for every sequence, with Python's slice rules (negative counts from the end;
        None is the start or the end); start and stop are scalars or one value per sequence."""
        n = self.lengths()
        lo = _slice_bound(0 if start is None else start, n)
        hi = _slice_bound(n if stop is None else stop, n)
        hi = np.maximum(hi, lo)
        pos = self._positions()
        keep = (pos >= np.repeat(lo, n)) & (pos < np.repeat(hi, n))
        return Ragged.from_lengths(self.values[keep], hi - lo)

    def prepend_each(self, tokens: list[int]) -> "Ragged":
        """Every sequence with `tokens` put before it."""
        return self._insert_each(tokens, self.offsets[:-1])

    def append_each(self, tokens: list[int]) -> "Ragged":
        """Every sequence with `tokens` added at its end."""
        return self._insert_each(tokens, self.offsets[1:])

    def _insert_each(self, tokens: list[int], where: np.ndarray) -> "Ragged":
        """`tokens` inserted at one offset per sequence (its start or its end)."""
        if not tokens:
            return self
        at = np.repeat(where, len(tokens))
        values = np.insert(self.values, at, np.tile(np.asarray(tokens, dtype=np.int32), len(self)))
        return Ragged.from_lengths(values, self.lengths() + len(tokens))


def _slice_bound(bound, n: np.ndarray) -> np.ndarray:
    bound = np.broadcast_to(np.asarray(bound, dtype=np.int64), n.shape)
    return np.clip(np.where(bound < 0, bound + n, bound), 0, n)


@dataclass(frozen=True)
class TokenArrays:
    """The token ids of a table's pairs, row for row: prompt, chosen and rejected as `Ragged`."""

    prompt: Ragged
    chosen: Ragged
    rejected: Ragged

    def __len__(self) -> int:
        return len(self.prompt)

    def pair_lengths(self) -> np.ndarray:
        """`tokenize.pair_length` of every pair."""
        return self.prompt.lengths() + self.chosen.lengths() + self.rejected.lengths()

    def cut_responses(self, end: list[int]) -> np.ndarray:
        """Per pair: whether `max_length` cut its chosen or rejected response. Every response is its text
        and `end` (`tokenize.response_end`) before the cut, so a cut one no longer ends with `end`."""
        return ~(self.chosen.ends_with(end) & self.rejected.ends_with(end))


def encode(tokenizer, texts: list[str], chunk: int) -> Ragged:
    """Token ids of `texts` (no special tokens added), the tokenizer called on `chunk` texts at a time.

    A fast tokenizer's Rust backend is called directly without character offsets (which nothing here
    reads), when it is set to neither truncate nor pad and agrees with the tokenizer's own call on
    the first texts; otherwise the tokenizer itself is called."""
    batch = _backend_encoder(tokenizer, texts[:16])
    if batch is None:

        def batch(part: list[str]) -> list[list[int]]:
            return tokenizer(part, add_special_tokens=False)["input_ids"]

    return Ragged.concat([Ragged.from_lists(batch(texts[i : i + chunk])) for i in range(0, len(texts), chunk)])


def _backend_encoder(tokenizer, probe: list[str]):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def batch(part: list[str]) -> list[list[int]]:
        return [e.ids for e in fast(part, add_special_tokens=False)]

    if probe and batch(probe) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return None
    return batch


def tokenize_arrays(
    tokenizer, df: pd.DataFrame, *, max_length: int, max_prompt_length: int, chunk: int = 4096
) -> TokenArrays:
    """`tokenize.tokenize_pairs` of the table as arrays, equal token for token.

    A prompt repeated across pairs (several responses to one prompt) is rendered and encoded once."""
    codes, prompts = pd.factorize(pd.Series([str(p) for p in df["prompt"]], dtype=object), sort=False)
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    prompt = keep_prompt_end(encode(tokenizer, rendered, chunk), prompt_prefix(tokenizer), max_prompt_length)
    prompt = prompt.take(codes)
    budget = max_length - prompt.lengths()
    end = response_end(tokenizer)

    def response(column: str) -> Ragged:
        ids = encode(tokenizer, [str(t) for t in df[column]], chunk)
        return ids.append_each(end).slice_each(None, budget)

    return TokenArrays(prompt, response("chosen"), response("rejected"))


def keep_prompt_end(prompts: Ragged, prefix: list[int], max_prompt_length: int) -> Ragged:
    """`tokenize.keep_prompt_end` on every prompt: the prefix (added where a prompt lacks it), then the
    end of the rest, max_prompt_length tokens in all."""
    k = len(prefix)
    n = prompts.lengths()
    if k:
        rows = np.flatnonzero(n >= k)  # the prompts that start with the prefix already, narrowed token by token
        for j, token in enumerate(prefix):
            rows = rows[prompts.values[prompts.offsets[rows] + j] == token]
        start = np.zeros(len(n), dtype=np.int64)
        start[rows] = k
        prompts = prompts.slice_each(start, None)
        n = prompts.lengths()
    keep = max(0, max_prompt_length - k)
    prompts = prompts.slice_each(np.maximum(n - keep, 0), None)
    return prompts.prepend_each(prefix[:max_prompt_length]) if k else prompts


class ArrayPairs(Sequence[TokenizedPair]):
    """Pairs of a `TokenArrays` (all of them, or the rows `index` names) as a sequence of
    `TokenizedPair`, each made when it is read: a split of 100k pairs costs nothing per pair until a
    batch takes some. Indexing, slicing and `take` answer as a list of the same pairs would."""

    def __init__(self, arrays: TokenArrays, pair_ids: Sequence, index: np.ndarray | None = None) -> None:
        self.arrays, self._ids = arrays, np.asarray(pair_ids, dtype=object)
        if len(self._ids) != len(arrays):
            raise ValueError(f"{len(self._ids)} pair ids for {len(arrays)} tokenised pairs")
        self._index = np.arange(len(arrays), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def _pair(self, row: int) -> TokenizedPair:
        a = self.arrays
        return TokenizedPair(str(self._ids[row]), a.prompt.row(row), a.chosen.row(row), a.rejected.row(row))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        return self._pair(int(self._index[range(len(self))[index]]))  # negative indices and bounds as a list

    def take(self, indices) -> list[TokenizedPair]:
        """The pairs at `indices` (positions in this sequence)."""
        return [self._pair(int(row)) for row in self._index[np.asarray(list(indices), dtype=np.int64)]]

    def subset(self, indices) -> "ArrayPairs":
        """The pairs at `indices` as another `ArrayPairs` over the same arrays (nothing is copied per pair)."""
        return ArrayPairs(self.arrays, self._ids, self._index[np.asarray(indices, dtype=np.int64)])

    def lengths(self) -> np.ndarray:
        """`tokenize.pair_length` of every pair here."""
        return self.arrays.pair_lengths()[self._index]
