"""Token pre-flight: how the training tokenizer will see a preference table, before any training.

Silent truncation is the commonest way preference data goes wrong: a response cut before the
part that makes it better or worse teaches the policy nothing. This module tokenizes every pair
exactly as training does (`dpo_engine.data.tokenize.render_prompt` applies the chat template,
`tokenize_pair` cuts prompts from the left and responses at ``max_length``), and reports per side
(prompt, chosen, rejected) the token-length distribution, how many pairs the current
``max_length`` / ``max_prompt_length`` would cut and by how much, a suggested setting, and a few
pairs as the model will see them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dpo_engine.data.tokenize import prompt_prefix, render_prompt, response_end, tokenize_pair, with_prefix

SIDES: tuple[str, ...] = ("prompt", "chosen", "rejected")
QUANTILES: tuple[int, ...] = (50, 90, 95, 99)
SUGGEST_QUANTILE = 95  # suggested limits keep this percentile of each side whole
ROUND_TO = 16
EXAMPLE_CHARS = 600


class LengthSummary(BaseModel):
    """Token-length distribution of one side (prompt with its chat template; responses with EOS)."""

    mean: float
    min: int
    max: int
    quantiles: dict[str, float]  # "p50", "p90", ...


class SideCut(BaseModel):
    """How the current limits cut one side."""

    pairs_cut: int
    share_cut: float
    mean_tokens_lost: float  # over the pairs that are cut (0 when none is)
    max_tokens_lost: int


class Suggestion(BaseModel):
    max_length: int
    max_prompt_length: int
    pairs_cut: int  # pairs that would still lose tokens under the suggestion
    reason: str


class TokenPreflight(BaseModel):
    """The pre-flight report (``diagnosis.json["token_preflight"]``)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    n_pairs: int
    max_length: int
    max_prompt_length: int
    chat_template: bool
    lengths: dict[str, LengthSummary]
    cut: dict[str, SideCut]
    pairs_cut: int  # pairs where any side loses tokens
    suggestion: Suggestion
    examples: list[dict[str, Any]] = Field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """Plain-text lines for the CLI."""
        lines = [
            f"tokens     model {self.model}, max_length {self.max_length}, max_prompt_length {self.max_prompt_length}"
            f"{' (chat template applied)' if self.chat_template else ''}"
        ]
        for side in SIDES:
            s, c = self.lengths[side], self.cut[side]
            q = "  ".join(f"{k} {v:.0f}" for k, v in s.quantiles.items())
            lines.append(
                f"  {side:<9} mean {s.mean:.0f}  {q}  max {s.max}   cut {c.pairs_cut}/{self.n_pairs} "
                f"({c.share_cut:.0%}, mean {c.mean_tokens_lost:.0f} tokens lost)"
            )
        sg = self.suggestion
        lines.append(
            f"  {self.pairs_cut}/{self.n_pairs} pairs cut now; suggested max_length {sg.max_length}, "
            f"max_prompt_length {sg.max_prompt_length} ({sg.pairs_cut} cut then): {sg.reason}"
        )
        return lines

    def examples_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.examples)


def load_tokenizer(model: str, workspace):
    """The tokenizer training would use for ``model`` (known name, local directory or cached id), offline.

    For the bundled SmolLM2 only the tokenizer is read (and cached), so a pre-flight never waits for
    a whole-model conversion.
    """
    from transformers import AutoTokenizer

    from dpo_engine.models.loading import DEFAULT_MODEL, model_directory, smollm2_tokenizer

    if model == DEFAULT_MODEL:
        tokenizer = smollm2_tokenizer(workspace)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_directory(model, workspace=workspace), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _summary(lengths: np.ndarray) -> LengthSummary:
    return LengthSummary(
        mean=float(lengths.mean()),
        min=int(lengths.min()),
        max=int(lengths.max()),
        quantiles={f"p{q}": float(np.percentile(lengths, q)) for q in QUANTILES},
    )


def _cuts(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, max_length: int, max_prompt_length: int):
    """Tokens each side loses under tokenize_pair's rule (prompt keeps its end; responses fill the rest)."""
    kept_prompt = np.minimum(prompt, max_prompt_length)
    budget = max_length - kept_prompt
    return {
        "prompt": prompt - kept_prompt,
        "chosen": np.clip(chosen - budget, 0, None),
        "rejected": np.clip(rejected - budget, 0, None),
    }


def _round_up(x: float) -> int:
    return int(math.ceil(x / ROUND_TO) * ROUND_TO)


def token_counts(table: pd.DataFrame, tokenizer) -> dict[str, np.ndarray]:
    """Tokens per side before any cut: the prompt with its chat template, each response with its end
    (`tokenize.response_end`: the template's end of turn, or EOS).

    The pre-flight and the data audit's length bias both read these, so the texts are tokenised once."""
    end = len(response_end(tokenizer))
    prefix = prompt_prefix(tokenizer)
    rendered = [render_prompt(tokenizer, str(p)) for p in table["prompt"]]
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    n_tokens = {  # the prompt with the prefix training puts before it
        "prompt": np.array([len(with_prefix(ids, prefix)) for ids in encoded]),
    }
    for side in ("chosen", "rejected"):
        ids = tokenizer([str(t) for t in table[side]], add_special_tokens=False)["input_ids"]
        n_tokens[side] = np.array([len(x) + end for x in ids])
    return n_tokens


def token_preflight(
    table: pd.DataFrame,
    tokenizer,
    *,
    model: str,
    max_length: int,
    max_prompt_length: int | None = None,
    n_examples: int = 3,
    n_tokens: dict[str, np.ndarray] | None = None,
) -> TokenPreflight:
    """Token lengths, truncation under the given limits, a suggested setting and example pairs.

    ``max_prompt_length`` None means training's default, half of ``max_length``; ``n_tokens`` are
    `token_counts` of the table when the caller has them already.
    """

    missing = [c for c in SIDES if c not in table.columns]
    if missing:
        raise ValueError(f"preference table lacks column(s) {', '.join(missing)}")
    if len(table) == 0:
        raise ValueError("token pre-flight needs at least one pair")
    if max_prompt_length is None:
        max_prompt_length = max(4, max_length // 2)
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    if n_tokens is None:
        n_tokens = token_counts(table, tokenizer)
    lost = _cuts(n_tokens["prompt"], n_tokens["chosen"], n_tokens["rejected"], max_length, max_prompt_length)
    cut = {}
    for side in SIDES:
        hit = lost[side] > 0
        cut[side] = SideCut(
            pairs_cut=int(hit.sum()),
            share_cut=float(hit.mean()),
            mean_tokens_lost=float(lost[side][hit].mean()) if hit.any() else 0.0,
            max_tokens_lost=int(lost[side].max()),
        )
    any_cut = (lost["prompt"] > 0) | (lost["chosen"] > 0) | (lost["rejected"] > 0)

    longest_response = np.maximum(n_tokens["chosen"], n_tokens["rejected"])
    suggested_prompt = _round_up(np.percentile(n_tokens["prompt"], SUGGEST_QUANTILE))
    suggested_length = suggested_prompt + _round_up(np.percentile(longest_response, SUGGEST_QUANTILE))
    limit = getattr(tokenizer, "model_max_length", None)
    reason = f"keeps the {SUGGEST_QUANTILE}th percentile of prompts and of the longer response whole"
    if isinstance(limit, int) and 0 < limit < 10**6 and suggested_length > limit:
        suggested_length = limit
        suggested_prompt = min(suggested_prompt, limit // 2)
        reason += f", capped at the model's context of {limit} tokens"
    suggested_prompt = min(suggested_prompt, suggested_length - ROUND_TO)
    lost_then = _cuts(n_tokens["prompt"], n_tokens["chosen"], n_tokens["rejected"], suggested_length, suggested_prompt)
    still_cut = int(((lost_then["prompt"] > 0) | (lost_then["chosen"] > 0) | (lost_then["rejected"] > 0)).sum())

    examples = []
    for i in range(min(n_examples, len(table))):
        row = table.iloc[i]
        pair = tokenize_pair(
            tokenizer,
            str(row.get("pair_id", i)),
            str(row["prompt"]),
            str(row["chosen"]),
            str(row["rejected"]),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for side, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            examples.append(
                {
                    "pair": i,
                    "side": side,
                    "tokens": int(n_tokens[side][i]),
                    "kept": len(ids),
                    "lost": int(lost[side][i]),
                    "as the model sees it": text
                    if len(text) <= EXAMPLE_CHARS
                    else text[: EXAMPLE_CHARS // 2] + " … " + text[-EXAMPLE_CHARS // 2 :],
                }
            )
    return TokenPreflight(
        model=model,
        n_pairs=len(table),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        lengths={side: _summary(n_tokens[side]) for side in SIDES},
        cut=cut,
        pairs_cut=int(any_cut.sum()),
        suggestion=Suggestion(
            max_length=int(suggested_length),
            max_prompt_length=int(suggested_prompt),
            pairs_cut=still_cut,
            reason=reason,
        ),
        examples=examples,
    )
