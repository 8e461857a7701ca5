"""Tokenized pairs -> padded batches with chosen and rejected stacked (tokenisation: data.tokenize).

Two batch layouts: chosen and rejected as separate rows, or packed into
one row per pair with a block attention mask so the shared prompt is computed once. The packed mask's
rule is written once (`packed_sees`) and given to the model as a dense boolean mask (SDPA; eager takes
it additive, passes.py) or as flex_attention's block mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dpo_engine.data import LoadedDataset, open_dataset
from dpo_engine.data.split import split_train_eval  # noqa: F401 - the split lives with the data; imported here too
from dpo_engine.data.tokenize import TokenizedPair, pair_length

REQUIRED_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")


def load_dataset(dataset: str, workspace, log=print) -> LoadedDataset:
    """A stored dataset or a preference file, its canonical table with flagged rows dropped (and logged)."""
    loaded = open_dataset(workspace, dataset)
    if loaded.dropped:
        log(
            f"{loaded.label}: dropped {sum(loaded.dropped.values())} row(s) the validator flagged: "
            + ", ".join(f"{k} {v}" for k, v in loaded.dropped.items())
        )
    return loaded


def load_pairs(dataset: str, workspace, log=print) -> pd.DataFrame:
    """The canonical table of a stored dataset or a preference file (flagged rows dropped and logged)."""
    return load_dataset(dataset, workspace, log=log).table


def check_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Refuse tables the trainer cannot use, saying what is wrong (no silent drops)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"dataset lacks column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}")
    if len(df) < 2:
        raise ValueError(f"dataset has {len(df)} pair(s); training needs at least 2")
    for col in ("prompt", "chosen", "rejected"):
        bad = df.index[df[col].isna() | (df[col].astype(str).str.len() == 0)].tolist()
        if col != "prompt" and bad:
            raise ValueError(
                f"{len(bad)} pair(s) have an empty {col!r} field (first rows: {bad[:5]}); fix or drop them first"
            )
    return df.reset_index(drop=True).assign(pair_id=lambda d: d["pair_id"].astype(str))


def eval_subset(eval_idx: np.ndarray, max_pairs: int | None, seed: int) -> np.ndarray:
    """At most max_pairs of the held-out indices, a seeded subset (sorted) that every eval reuses.

    The pairs left out stay out of training: only the split decides what is held out."""
    if max_pairs is None or len(eval_idx) <= max_pairs:
        return eval_idx
    return np.sort(np.random.default_rng(seed).permutation(eval_idx)[:max_pairs])


@dataclass
class Batch:
    """The model inputs for B pairs plus where each scored response token sits in them.

    Two layouts share this shape (see `collate` and `collate_packed`): every consumer reads the
    model inputs, the response-token index (`token_rows`, `token_cols`: the position whose output
    predicts the token; `token_labels`; `token_seq`: 0..B-1 for chosen, B..2B-1 for rejected) and the
    pooling masks, never the layout itself.
    """

    input_ids: torch.Tensor  # (R × L)
    attention_mask: torch.Tensor | None  # (R × L) padding mask; None when packed (see `segment`)
    position_ids: torch.Tensor | None
    token_rows: torch.Tensor  # (N,)
    token_cols: torch.Tensor  # (N,)
    token_labels: torch.Tensor  # (N,)
    token_seq: torch.Tensor  # (N,)
    pool_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rows holding prompt, chosen, rejected (B each)
    pool_masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B × L) token masks for the same
    pairs: list[TokenizedPair]
    n_tokens: int  # tokens of the pairs as the plain layout reads them (prompt once per response)
    n_positions: int = 0  # real (non-padding) positions of input_ids; the rest of its R × L is padding
    segment: torch.Tensor | None = None  # packed: (R × L) 0 prompt, 1 chosen, 2 rejected, 3 padding
    owner: torch.Tensor | None = None  # packed: (R × L) the pair each position belongs to, -1 for padding

    @property
    def pair_ids(self) -> list[str]:
        return [p.pair_id for p in self.pairs]

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def to(self, device) -> "Batch":
        """The batch on `device`; to a GPU through pinned host memory without waiting for the copy."""
        cuda = torch.device(device).type == "cuda"

        def mv(t):
            if t is None:
                return None
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        return Batch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.position_ids),
            mv(self.token_rows),
            mv(self.token_cols),
            mv(self.token_labels),
            mv(self.token_seq),
            tuple(mv(t) for t in self.pool_rows),
            tuple(mv(t) for t in self.pool_masks),
            self.pairs,
            self.n_tokens,
            self.n_positions,
            mv(self.segment),
            mv(self.owner),
        )


class _TokenIndex:
    """The scored response tokens of a batch, added a response at a time as numpy runs (no per-token
    Python): where each is predicted (row, column), its label and its sequence (0..2B-1)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []

    def add(self, row: int, cols: np.ndarray, labels: np.ndarray, seq: int) -> None:
        self.parts.append((np.full(len(cols), row), cols, labels, seq))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        if not self.parts:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty, empty
        rows = np.concatenate([r for r, _, _, _ in self.parts])
        cols = np.concatenate([c for _, c, _, _ in self.parts])
        labels = np.concatenate([lab for _, _, lab, _ in self.parts])
        seq = np.concatenate([np.full(len(c), q) for _, c, _, q in self.parts])
        return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (rows, cols, labels, seq))


def _ids(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def collate(pairs: list[TokenizedPair], pad_token_id: int) -> Batch:
    """2B rows, chosen over rejected, right-padded to the batch's longest: the plain layout.

    The response token at position t is predicted by position t - 1 of the same row; a response
    with an empty prompt has no prediction for its first token.
    """
    seqs, prompt_lens = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seqs.append(p.prompt_ids + getattr(p, half))
            prompt_lens.append(len(p.prompt_ids))
    width = max(len(s) for s in seqs)
    n, b = len(seqs), len(pairs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    prompt_mask = torch.zeros((n, width), dtype=torch.bool)
    index = _TokenIndex()
    for i, (s, lp) in enumerate(zip(seqs, prompt_lens)):
        ids = _ids(s)
        input_ids[i, : len(s)] = torch.from_numpy(ids)
        attention[i, : len(s)] = True
        prompt_mask[i, :lp] = True
        t = np.arange(max(lp, 1), len(s))
        index.add(i, t - 1, ids[t], i)
    response_mask = attention & ~prompt_mask
    rows, cols, labels, seq = index.tensors()
    first, second = torch.arange(b), torch.arange(b, 2 * b)
    return Batch(
        input_ids,
        attention,
        None,
        rows,
        cols,
        labels,
        seq,
        (first, first, second),
        (prompt_mask[:b], response_mask[:b], response_mask[b:]),
        list(pairs),
        int(attention.sum()),
        int(attention.sum()),
    )


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Pair indices per row, first-fit decreasing: each row's pairs together take at most `width` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int) -> Batch:
    """Each pair as prompt + chosen + rejected, so the shared prompt is computed once; short pairs
    share a row (first-fit decreasing into rows as wide as the longest pair), so a batch pads little.

    A block attention mask lets a pair's prompt see itself (causally), its chosen response the prompt
    and itself, and its rejected response the prompt and itself but not the chosen one, and no token
    see another pair; position ids restart after the prompt for the rejected response and at 0 for
    each pair. Each response token thus sees exactly the context it has in the plain layout, and its
    log-probability is the same up to float rounding.
    """
    b = len(pairs)
    lengths = [pair_length(p) for p in pairs]
    width = max(lengths)
    layout = pack_rows(lengths, width)
    n_rows = len(layout)
    row_of, start_of = [0] * b, [0] * b
    for r, members in enumerate(layout):
        offset = 0
        for i in members:
            row_of[i], start_of[i] = r, offset
            offset += lengths[i]
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(n_rows, 1)  # padding keeps increasing positions
    segment = torch.full((n_rows, width), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    owner = torch.full((n_rows, width), -1, dtype=torch.long)  # the pair a position belongs to
    index = _TokenIndex()
    for i, p in enumerate(pairs):
        r, o = row_of[i], start_of[i]
        lp, lc, lr = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        chosen, rejected = _ids(p.chosen_ids), _ids(p.rejected_ids)
        input_ids[r, o : o + lengths[i]] = torch.from_numpy(np.concatenate([_ids(p.prompt_ids), chosen, rejected]))
        position_ids[r, o : o + lp + lc] = torch.arange(lp + lc)
        position_ids[r, o + lp + lc : o + lengths[i]] = torch.arange(lp, lp + lr)
        segment[r, o : o + lp], segment[r, o + lp : o + lp + lc], segment[r, o + lp + lc : o + lengths[i]] = 0, 1, 2
        owner[r, o : o + lengths[i]] = i
        k = np.arange(lc)
        keep = lp + k >= 1  # chosen token k is predicted by the position before it
        index.add(r, (o + lp + k - 1)[keep], chosen[keep], i)
        k = np.arange(lr)
        source = np.where(k == 0, lp - 1, lp + lc + k - 1)  # the first rejected token is predicted by the prompt
        keep = source >= 0
        index.add(r, (o + source)[keep], rejected[keep], b + i)
    rows, cols, labels, seq = index.tensors()
    pair_rows = torch.tensor(row_of, dtype=torch.long)
    mine = owner[pair_rows] == torch.arange(b).unsqueeze(1)  # (B × width): pair i's positions in its row
    seg = segment[pair_rows]
    return Batch(
        input_ids,
        None,  # the block mask is built where the model runs, from segment and owner (packed_attention_mask)
        position_ids,
        rows,
        cols,
        labels,
        seq,
        (pair_rows, pair_rows, pair_rows),
        (mine & (seg == 0), mine & (seg == 1), mine & (seg == 2)),
        list(pairs),
        sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        sum(lengths),
        segment,
        owner,
    )


def packed_sees(q, kv, segment_q, segment_kv, owner_q, owner_kv):
    """The packed rows' attention rule, written once for both masks below: a position sees earlier
    positions of its own pair that are the prompt or its own response (the rejected response never
    sees the chosen one), and every position sees itself so no row of padding is empty. Works on
    broadcast tensors (the dense mask) and on the index tensors flex_attention's mask_mod receives."""
    own_pair = owner_q == owner_kv
    shared_or_own = (segment_kv == 0) | (segment_kv == segment_q)
    return ((q >= kv) & own_pair & shared_or_own) | (q == kv)


def packed_attention_mask(segment: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The (R × 1 × L × L) boolean block mask of packed rows, on the device `segment` is on.

    Built from the two (R × L) index tensors where the model runs, so only those cross to a GPU."""
    positions = torch.arange(segment.shape[1], device=segment.device)
    allowed = packed_sees(
        positions.view(1, -1, 1),
        positions.view(1, 1, -1),
        segment.unsqueeze(2),
        segment.unsqueeze(1),
        owner.unsqueeze(2),
        owner.unsqueeze(1),
    )
    return allowed.unsqueeze(1)


def packed_mask_mod(segment: torch.Tensor, owner: torch.Tensor):
    """`packed_sees` as flex_attention's mask_mod over the (R × L) index tensors."""

    def mask_mod(b, _h, q, kv):
        return packed_sees(q, kv, segment[b, q], segment[b, kv], owner[b, q], owner[b, kv])

    return mask_mod


def packed_block_mask(segment: torch.Tensor, owner: torch.Tensor):
    """The same rule as flex_attention's BlockMask (model.attn_implementation flex_attention): built on
    the device from the index tensors, it records which 128 × 128 tiles hold any allowed position, so the
    fused kernel skips the rest and evaluates the rule only inside partly masked tiles. On a GPU it is
    built by a compiled kernel: built eagerly, it would pass through several full (R × L × L) temporaries."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = segment.shape
    mod = packed_mask_mod(segment, owner)
    return create_block_mask(mod, rows, None, width, width, device=segment.device, _compile=segment.is_cuda)
