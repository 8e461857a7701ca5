"""The reference model's own preference: its length-normalised log-probability gap per pair.

A pair whose rejected response the model (the one chosen for training, before training) finds more
likely per token than the chosen one is a label-noise candidate: gap = -(log π(y+|x)/|y+| -
log π(y-|x)/|y-|), higher = more suspicious. Pairs are tokenised exactly as training does
(`data.tokenize.tokenize_pairs`) and scored with the engine's chunked LM head (`lm_head.head_token_logps`)
on the response tokens only, so the numbers are the reference log-probs training would start from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from dpo_engine.data.tokenize import TokenizedPair, tokenize_pairs
from dpo_engine.lm_head import head_token_logps
from dpo_engine.logit_transform import logit_transform
from dpo_engine.losses import sum_by_sequence

BATCH_PAIRS = 8


def _batch_inputs(pairs: list[TokenizedPair], pad_token_id: int):
    """Rows prompt+chosen then prompt+rejected, right-padded; the (row, position, label, sequence) of
    every response token, where position t - 1 predicts the token at t."""
    seqs = [p.prompt_ids + getattr(p, side) for side in ("chosen_ids", "rejected_ids") for p in pairs]
    starts = [max(len(p.prompt_ids), 1) for _ in range(2) for p in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    items = []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        items.extend((i, t - 1, s[t]) for t in range(start, len(s)))
    rows, cols, labels = torch.tensor(items, dtype=torch.long).reshape(-1, 3).unbind(-1)
    return ids, attention, rows, cols, labels


@torch.no_grad()
def sequence_logps(model, pairs: list[TokenizedPair], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (2B,) chosen then rejected, and the scored tokens per response (2B,)."""
    device = next(model.parameters()).device
    ids, attention, rows, cols, labels = (t.to(device) for t in _batch_inputs(pairs, pad_token_id))
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    head = model.get_output_embeddings().weight
    token_logps = head_token_logps(hidden[rows, cols], head, labels, transform=logit_transform(model.config))
    logps = sum_by_sequence(token_logps, rows, ids.shape[0])
    counts = torch.bincount(rows, minlength=ids.shape[0])
    return logps.float().cpu(), counts.cpu()


def logprob_gap(
    table: pd.DataFrame,
    model,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_pairs: int = BATCH_PAIRS,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The gap -(mean token log-prob of chosen - of rejected) for every row of ``table`` (NaN when a
    response has no scored token). Pairs are batched by length so little of a batch is padding."""
    frame = table[["prompt", "chosen", "rejected"]].copy()
    frame["pair_id"] = np.arange(len(frame)).astype(str)
    pairs = tokenize_pairs(tokenizer, frame, max_length=max_length, max_prompt_length=max_prompt_length)
    order = np.argsort([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], kind="stable")
    gap = np.full(len(pairs), np.nan)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    for done in range(0, len(order), batch_pairs):
        idx = order[done : done + batch_pairs]
        logps, counts = sequence_logps(model, [pairs[i] for i in idx], pad)
        b = len(idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_token = (logps / counts.clamp(min=1)).numpy()
            valid = (counts[:b] > 0) & (counts[b:] > 0)
            gap[idx] = np.where(valid.numpy(), -(per_token[:b] - per_token[b:]), np.nan)
        if progress is not None:
            progress(min(done + batch_pairs, len(order)), len(order))
    return gap
