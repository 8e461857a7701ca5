"""Preference pairs -> token ids -> padded batches with chosen and rejected stacked.

Prompts are rendered through the tokenizer's chat template when it has one (a user turn plus the
generation prompt) and responses are appended as assistant text + EOS, so the policy sees pairs the
way it was instruction-tuned. Stacking chosen over rejected lets one forward pass serve both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

REQUIRED_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def load_pairs(dataset: str, workspace, log=print) -> pd.DataFrame:
    """The canonical table of a stored dataset or a preference file (flagged rows dropped and logged)."""
    from dpo_engine.data import open_dataset

    loaded = open_dataset(workspace, dataset)
    if loaded.dropped:
        log(f"{loaded.label}: dropped {sum(loaded.dropped.values())} row(s) the validator flagged: "
            + ", ".join(f"{k} {v}" for k, v in loaded.dropped.items()))
    return loaded.table


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
            raise ValueError(f"{len(bad)} pair(s) have an empty {col!r} field (first rows: {bad[:5]}); fix or drop them first")
    return df.reset_index(drop=True).assign(pair_id=lambda d: d["pair_id"].astype(str))


def render_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def tokenize_pair(tokenizer, pair_id: str, prompt: str, chosen: str, rejected: str, *, max_length: int,
                  max_prompt_length: int) -> TokenizedPair:
    """Prompt keeps its last max_prompt_length tokens; responses are cut so prompt + response <= max_length."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def response(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        return ids[:budget]

    return TokenizedPair(str(pair_id), list(prompt_ids), response(chosen), response(rejected))


def tokenize_pairs(tokenizer, df: pd.DataFrame, *, max_length: int, max_prompt_length: int) -> list[TokenizedPair]:
    return [
        tokenize_pair(tokenizer, r.pair_id, str(r.prompt), str(r.chosen), str(r.rejected),
                      max_length=max_length, max_prompt_length=max_prompt_length)
        for r in df.itertuples(index=False)
    ]


def split_train_eval(n: int, *, eval_fraction: float, min_eval_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split; at least min_eval_pairs (but never all) pairs go to evaluation."""
    if n < 2:
        raise ValueError(f"need at least 2 pairs to split into train and eval, got {n}")
    n_eval = min(max(int(round(eval_fraction * n)), min_eval_pairs), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


@dataclass
class Batch:
    """2B sequences: rows [0, B) are chosen, rows [B, 2B) rejected, right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    pair_ids: list[str]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_mask.to(device),
                     self.response_mask.to(device), self.pair_ids)


def collate(pairs: list[TokenizedPair], pad_token_id: int) -> Batch:
    seqs, prompt_lens = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seqs.append(p.prompt_ids + getattr(p, half))
            prompt_lens.append(len(p.prompt_ids))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    prompt_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (s, lp) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = True
        prompt_mask[i, :lp] = True
    response_mask = attention & ~prompt_mask
    return Batch(input_ids, attention, prompt_mask, response_mask, [p.pair_id for p in pairs])
