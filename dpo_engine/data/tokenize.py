"""Preference pairs -> token ids, the one rule that training and the token pre-flight share.

Prompts are rendered through the tokenizer's chat template when it has one (a dialogue turn by turn,
other text as one user turn, then the generation prompt) and responses are appended as assistant
text + the template's end of turn (`response_end`), so the policy sees pairs the way it was
instruction-tuned. A prompt starts with what the tokenizer would put before any text (a base Llama's
BOS) and keeps its end when cut; responses fill what ``max_length`` leaves. Training reads a whole
table through `token_arrays` (the same rule on flat arrays) and `token_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from jinja2 import TemplateError

from dpo_engine.data.layouts import dialogue_turns


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def pair_length(pair: TokenizedPair) -> int:
    """Tokens of the pair's packed row (prompt + chosen + rejected): what its batch pads to."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def prompt_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text of its own accord: a BOS for Llama, Mistral or Gemma,
    nothing for GPT-2-style tokenizers or Qwen. Texts are encoded without special tokens, so a prompt
    gets these by `keep_prompt_end` (a chat template that writes its own BOS is not given a second)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return list(full[:k])
    return []


def with_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    """The prompt's ids with the prefix before them, unless they start with it already."""
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def keep_prompt_end(ids: list[int], prefix: list[int], max_prompt_length: int) -> list[int]:
    """The prompt as training reads it: the prefix, then the end of the rest, max_prompt_length in all.
    The prefix stays when a long prompt is cut (cutting from the left would drop a base model's BOS)."""
    body = with_prefix(ids, prefix)[len(prefix) :]
    keep = max(0, max_prompt_length - len(prefix))
    return (prefix + body[max(0, len(body) - keep) :] if keep else prefix)[:max_prompt_length]


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the policy reads it: through the chat template when the tokenizer has one, a
    dialogue turn by turn (`layouts.dialogue_turns`) and any other text as one user turn; a template
    that refuses the turns (e.g. one without a system role) gets the text as one user turn. A
    dialogue that ends with an assistant's words is continued, not closed, as TRL does. Without a
    template the text is kept as it is (a base model reads HH's "Human:/Assistant:" text)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    turns = dialogue_turns(prompt)
    if turns:
        continued = turns[-1][0] == "assistant"
        try:
            return tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in turns],
                tokenize=False,
                add_generation_prompt=not continued,
                continue_final_message=continued,
            )
        except (TemplateError, ValueError):  # the template's own refusal, or transformers' for the continuation
            pass
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


_RESPONSE_MARK = "\u2063response\u2063"  # invisible separators: no template writes them of its own


def response_end(tokenizer) -> list[int]:
    """The ids that end a response: what the chat template writes after an assistant message's text,
    its trailing whitespace left out (Gemma's <end_of_turn>, Llama-3's <|eot_id|>, ChatML's
    <|im_end|>, Phi-3's <|end|>), so a trained model ends its turns as the template does; the EOS
    token without a template, or where the template writes nothing after the text."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return eos
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _RESPONSE_MARK}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except (TemplateError, ValueError):
        return eos
    at = text.rfind(_RESPONSE_MARK)
    suffix = text[at + len(_RESPONSE_MARK) :].rstrip() if at >= 0 else ""
    return list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else eos


def tokenize_pair(
    tokenizer, pair_id: str, prompt: str, chosen: str, rejected: str, *, max_length: int, max_prompt_length: int
) -> TokenizedPair:
    """Prompt keeps its prefix and its end (`keep_prompt_end`); each response is its text and
    `response_end`, cut so prompt + response <= max_length."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    prompt_ids = keep_prompt_end(prompt_ids, prompt_prefix(tokenizer), max_prompt_length)
    budget = max_length - len(prompt_ids)
    end = response_end(tokenizer)

    def response(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + end
        return ids[:budget]

    return TokenizedPair(str(pair_id), list(prompt_ids), response(chosen), response(rejected))


def tokenize_pairs(
    tokenizer, df: pd.DataFrame, *, max_length: int, max_prompt_length: int, chunk: int = 4096
) -> list[TokenizedPair]:
    """`tokenize_pair` for every row, the tokenizer called on a chunk of texts at a time.

    A fast tokenizer encodes a list of texts in one call (in Rust, on several threads), which at
    100k pairs is the difference between minutes and seconds; the result is the same as one call per
    text, which the tests check."""
    end = response_end(tokenizer)
    prefix = prompt_prefix(tokenizer)
    out: list[TokenizedPair] = []
    for start in range(0, len(df), chunk):
        part = df.iloc[start : start + chunk]
        prompts = [render_prompt(tokenizer, str(p)) for p in part["prompt"]]
        encode = [
            tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            for texts in (prompts, [str(t) for t in part["chosen"]], [str(t) for t in part["rejected"]])
        ]
        for pair_id, prompt_ids, chosen_ids, rejected_ids in zip(part["pair_id"], *encode):
            prompt_ids = keep_prompt_end(prompt_ids, prefix, max_prompt_length)
            budget = max_length - len(prompt_ids)
            chosen, rejected = (chosen_ids + end)[:budget], (rejected_ids + end)[:budget]
            out.append(TokenizedPair(str(pair_id), list(prompt_ids), chosen, rejected))
    return out
