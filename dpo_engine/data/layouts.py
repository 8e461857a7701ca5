"""Interpreting records: column mapping, layout detection, and prompt/response extraction.

Three layouts end in the same canonical (prompt, chosen, rejected) strings:

* flat: three string columns.
* conversational: `chosen`/`rejected` are lists of {role, content} messages, with or without a
  separate `prompt` (string or messages). Without one, the prompt is the shared message prefix
  (at most all but the last message of either side, so each response keeps at least one message).
* hh: Anthropic HH-RLHF raw strings of "\\n\\nHuman: ... \\n\\nAssistant: ..." turns; the prompt
  runs up to and including the last "\\n\\nAssistant:" of the shared prefix, responses are the rest.

Rendering messages as text: a segment that is a single message of the expected role (user for a
prompt, assistant for a response) is its bare content, so single-turn conversational data gives
exactly the text of the equivalent flat data; any other segment is rendered turn by turn as
"Role: content" blocks (role capitalised) joined by blank lines, the same shape as HH dialogues.
`dialogue_turns` reads such a text back into turns, so a multi-turn prompt reaches the chat template
turn by turn (data.tokenize.render_prompt).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dpo_engine.data.errors import DataFormatError, MissingColumnsError
from dpo_engine.data.report import Issue

CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "category")
HH_ASSISTANT = "\n\nAssistant:"
_HH_START = re.compile(r"^\s*(Human|Assistant):")

# Common names of the canonical fields in public preference datasets, most specific first.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "instruction", "query", "input", "context", "history", "x"),
    "chosen": (
        "chosen",
        "response_j",
        "chosen_response",
        "response_chosen",
        "preferred",
        "preferred_response",
        "better",
        "better_response",
        "positive",
        "pos",
        "accepted",
        "winner",
        "good",
        "y_w",
        "yw",
    ),
    "rejected": (
        "rejected",
        "response_k",
        "rejected_response",
        "response_rejected",
        "dispreferred",
        "dispreferred_response",
        "worse",
        "worse_response",
        "negative",
        "neg",
        "loser",
        "bad",
        "y_l",
        "yl",
    ),
    "category": ("category", "source", "subset", "domain", "topic"),
}

MISSING = object()  # a key absent from a record (distinct from an explicit null)


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def suggest_mapping(columns: list[str]) -> dict[str, str]:
    """Canonical field -> source column, guessed from common aliases (only fields it can place)."""
    by_norm: dict[str, str] = {}
    for col in columns:
        by_norm.setdefault(_norm(col), col)
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            col = by_norm.get(alias)
            if col is not None and col not in used:
                mapping[canonical] = col
                used.add(col)
                break
    return mapping


@dataclass
class Resolved:
    """Which source column feeds each canonical field, and the layout to read them with."""

    mapping: dict[str, str]
    layout: str
    warnings: list[str]


def resolve(
    columns: list[str],
    records: list[dict[str, Any]],
    layout: str,
    mapping: dict[str, str] | None,
    sample_rows: int,
) -> Resolved:
    """Settle the column mapping and the layout, or raise a whole-file error."""
    if layout not in ("auto", "flat", "conversational", "hh"):
        raise DataFormatError(f"unknown layout {layout!r}; use auto, flat, conversational or hh")
    warnings: list[str] = []
    given = dict(mapping or {})
    unknown = sorted(set(given) - set(CANONICAL_FIELDS))
    if unknown:
        raise DataFormatError(
            f"mapping names unknown field(s) {', '.join(unknown)}; map only {', '.join(CANONICAL_FIELDS)}"
        )
    absent = sorted(f"{k}={v}" for k, v in given.items() if v not in columns)
    if absent:
        raise DataFormatError(f"mapped column(s) not in the data: {', '.join(absent)}; columns found: {_list(columns)}")
    suggested = suggest_mapping(columns)
    final: dict[str, str] = {}
    auto_used: list[str] = []
    for field_name in CANONICAL_FIELDS:
        if field_name in given:
            final[field_name] = given[field_name]
        elif field_name in columns:
            final[field_name] = field_name
        elif field_name in suggested and suggested[field_name] not in given.values():
            final[field_name] = suggested[field_name]
            auto_used.append(f"{suggested[field_name]}->{field_name}")
    if "chosen" in final and final.get("chosen") == final.get("rejected"):
        raise DataFormatError(f"chosen and rejected both map to column {final['chosen']!r}")

    missing = [f for f in ("chosen", "rejected") if f not in final]
    if layout == "auto" and not missing:
        layout = _detect_layout(records, final, sample_rows)
    if layout == "flat" and "prompt" not in final:
        missing.insert(0, "prompt")
    if missing:
        raise MissingColumnsError(
            f"missing required column(s) {', '.join(missing)}; columns found: {_list(columns)}"
            + (f"; suggested mapping: {_fmt_mapping(suggested)}" if suggested else ""),
            columns_found=list(columns),
            missing=missing,
            suggested_mapping=suggested,
        )
    if auto_used:
        warnings.append(f"columns mapped automatically: {', '.join(auto_used)}")
    if layout == "hh" and "prompt" in final:
        warnings.append(f"HH layout derives the prompt from the dialogues; column {final['prompt']!r} ignored")
        del final["prompt"]
    return Resolved(final, layout, warnings)


def _detect_layout(records: list[dict[str, Any]], mapping: dict[str, str], sample_rows: int) -> str:
    """Majority vote over the first rows' `chosen` values (lists: conversational; HH-looking text: hh)."""
    votes: Counter[str] = Counter()
    col = mapping["chosen"]
    for rec in records[: max(sample_rows, 1) * 5]:
        value = rec.get(col, MISSING)
        if isinstance(value, list):
            votes["conversational"] += 1
        elif isinstance(value, str):
            if "prompt" not in mapping and _HH_START.match(value) and HH_ASSISTANT in value:
                votes["hh"] += 1
            else:
                votes["flat"] += 1
        if sum(votes.values()) >= sample_rows:
            break
    if not votes:
        return "flat"
    return votes.most_common(1)[0][0]


def _list(columns: list[str]) -> str:
    return ", ".join(map(repr, columns[:20])) + (" ..." if len(columns) > 20 else "") if columns else "none"


def _fmt_mapping(mapping: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in mapping.items())


# ----------------------------------------------------------------------------- extraction


@dataclass
class Extracted:
    """Canonical texts of the usable rows, and the issues of rows that could not be read."""

    rows: list[int]
    prompt: list[str]
    chosen: list[str]
    rejected: list[str]
    category: list[str | None] | None
    issues: list[Issue]


def extract(records: list[dict[str, Any]], rows: list[int], resolved: Resolved) -> Extracted:
    """Turn records into canonical strings; unreadable rows become unusable issues."""
    mapping = resolved.mapping
    splitter = {"flat": _split_flat, "conversational": _split_conversational, "hh": _split_hh}[resolved.layout]
    out = Extracted([], [], [], [], [] if "category" in mapping else None, [])
    optional_prompt = resolved.layout == "conversational"
    for rec, row in zip(records, rows):
        values = {f: rec.get(col, MISSING) for f, col in mapping.items() if f != "category"}
        if optional_prompt and _is_missing(values.get("prompt", MISSING)):
            values.pop("prompt", None)  # fall back to the shared message prefix
        problems: list[Issue] = []
        for f, v in values.items():
            if _is_missing(v):
                problems.append(_issue(row, "missing_field", mapping[f], f"no value for {f} (column {mapping[f]!r})"))
        if problems:
            out.issues.extend(problems)
            continue
        result = splitter(values, row, mapping)
        if isinstance(result, list):
            out.issues.extend(result)
            continue
        out.rows.append(row)
        out.prompt.append(result[0])
        out.chosen.append(result[1])
        out.rejected.append(result[2])
        if out.category is not None:
            out.category.append(_category(rec.get(mapping["category"], MISSING)))
    return out


def _is_missing(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, float) and math.isnan(value))


def _category(value: Any) -> str | None:
    if _is_missing(value):
        return None
    return value if isinstance(value, str) else str(value)


def _issue(row: int, reason: str, column: str | None, message: str) -> Issue:
    return Issue(row=row, reason=reason, column=column, message=message, unusable=True)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _non_strings(values: dict[str, Any], row: int, mapping: dict[str, str], expected: str) -> list[Issue]:
    return [
        _issue(row, "wrong_type", mapping[f], f"{f} is a {_type_name(v)}, expected {expected}")
        for f, v in values.items()
        if not isinstance(v, str)
    ]


def _split_flat(values: dict[str, Any], row: int, mapping: dict[str, str]) -> tuple[str, str, str] | list[Issue]:
    problems = _non_strings(values, row, mapping, "a string")
    if problems:
        return problems
    return values["prompt"], values["chosen"], values["rejected"]


def _split_hh(values: dict[str, Any], row: int, mapping: dict[str, str]) -> tuple[str, str, str] | list[Issue]:
    problems = _non_strings(values, row, mapping, "an HH dialogue string")
    if problems:
        return problems
    chosen, rejected = values["chosen"], values["rejected"]
    cut = chosen.rfind(HH_ASSISTANT, 0, common_prefix_length(chosen, rejected))
    if cut < 0:
        return [_issue(row, "malformed", mapping["chosen"], "chosen and rejected share no '\\n\\nAssistant:' turn")]
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], _strip_one_space(chosen[end:]), _strip_one_space(rejected[end:])


def common_prefix_length(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share: os.path.commonprefix's length, found by halving
    with slice comparisons (C speed) instead of a Python loop over characters."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; the first difference is before hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _split_conversational(
    values: dict[str, Any], row: int, mapping: dict[str, str]
) -> tuple[str, str, str] | list[Issue]:
    problems: list[Issue] = []
    msgs: dict[str, list[tuple[str, str]]] = {}
    for f in ("chosen", "rejected"):
        parsed = _messages(values[f])
        if isinstance(parsed, str):
            problems.append(_issue(row, "wrong_type", mapping[f], f"{f}: {parsed}"))
        else:
            msgs[f] = parsed
    prompt_value = values.get("prompt", MISSING)
    prompt_msgs: list[tuple[str, str]] | None = None
    prompt_text: str | None = None
    if isinstance(prompt_value, str):
        prompt_text = prompt_value
        prompt_msgs = [("user", prompt_value)]
    elif prompt_value is not MISSING:
        parsed = _messages(prompt_value)
        if isinstance(parsed, str):
            problems.append(_issue(row, "wrong_type", mapping["prompt"], f"prompt: {parsed}"))
        else:
            prompt_msgs = parsed
    if problems:
        return problems
    chosen, rejected = msgs["chosen"], msgs["rejected"]
    if prompt_msgs is None:
        k = 0
        limit = min(len(chosen), len(rejected)) - 1
        while k < limit and chosen[k] == rejected[k]:
            k += 1
        prompt_msgs, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    else:
        # Some datasets repeat the prompt turns at the start of each response list.
        n = len(prompt_msgs)
        if n and chosen[:n] == prompt_msgs and len(chosen) > n:
            chosen = chosen[n:]
        if n and rejected[:n] == prompt_msgs and len(rejected) > n:
            rejected = rejected[n:]
    if prompt_text is None:
        prompt_text = render_messages(prompt_msgs, expected_role="user")
    return (
        prompt_text,
        render_messages(chosen, expected_role="assistant"),
        render_messages(rejected, expected_role="assistant"),
    )


def _messages(value: Any) -> list[tuple[str, str]] | str:
    """(role, content) pairs, or a description of why the value is not a message list."""
    if not isinstance(value, list):
        return f"a {_type_name(value)}, expected a list of {{role, content}} messages"
    out: list[tuple[str, str]] = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            return f"message {i} is a {_type_name(msg)}, expected an object with role and content"
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str):
            return f"message {i} has no string role"
        if isinstance(content, list):  # multimodal-style parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                return f"message {i} has non-text content parts"
            content = "\n".join(texts)
        if not isinstance(content, str):
            return f"message {i} has no string content"
        out.append((role, content))
    return out


# Role labels of a rendered dialogue (render_messages, HH) and the chat roles they stand for: HH's,
# and the common names in conversational files (ShareGPT's human/gpt, Gemma's model, OpenAI's developer).
DIALOGUE_ROLES = {
    "Human": "user",
    "User": "user",
    "Assistant": "assistant",
    "Gpt": "assistant",
    "Model": "assistant",
    "Bot": "assistant",
    "System": "system",
    "Developer": "system",
}
# Roles whose messages are not text a chat template takes as a turn: a prompt with one stays one user turn.
NON_TEXT_ROLES = ("Tool", "Function", "Ipython")
_TURN_LABEL = re.compile(r"\n\n(" + "|".join([*DIALOGUE_ROLES, *NON_TEXT_ROLES]) + r"):(?: |(?=\n)|$)")


def dialogue_turns(text: str) -> list[tuple[str, str]] | None:
    """The (role, content) turns of a prompt that is a rendered dialogue, else None.

    A dialogue starts with a role label (HH's leading blank lines allowed) and holds at least two
    (`DIALOGUE_ROLES`), each at the start of a blank-line-separated block; each turn's text is
    stripped; a final Assistant turn with nothing after it (HH's prompt ends so) is dropped, since
    the chat template's generation prompt stands for it. A text with one label or none, starting
    with anything else, or holding a tool or function turn, is not read as a dialogue: its words are
    the user's, labels and all. A turn's own text that starts a paragraph with "User: " (or another
    role label) reads as a new turn: the rendered text cannot tell the two apart."""
    framed = "\n\n" + text.lstrip("\n")
    labels = list(_TURN_LABEL.finditer(framed))
    if len(labels) < 2 or labels[0].start() != 0 or any(m.group(1) in NON_TEXT_ROLES for m in labels):
        return None
    ends = [m.start() for m in labels[1:]] + [len(framed)]
    turns = [(DIALOGUE_ROLES[m.group(1)], framed[m.end() : end].strip()) for m, end in zip(labels, ends)]
    if turns[-1] == ("assistant", ""):
        turns.pop()
    return turns


def render_messages(messages: list[tuple[str, str]], *, expected_role: str) -> str:
    """Text of a message segment (see the module docstring for the convention)."""
    if len(messages) == 1 and DIALOGUE_ROLES.get(messages[0][0].strip().capitalize()) == expected_role:
        return messages[0][1]
    return "\n\n".join(f"{role.strip().capitalize() or 'Unknown'}: {content}" for role, content in messages)
