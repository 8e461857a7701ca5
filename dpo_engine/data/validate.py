"""Row checks that flag usable rows (the user decides to drop or keep them), vectorised with pandas."""

from __future__ import annotations

import hashlib

import pandas as pd

from dpo_engine.data.report import FLAG_REASONS, Issue

TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def pair_digest(prompt: str, chosen: str, rejected: str) -> bytes:
    """A short fingerprint of a pair's texts: duplicates across batches are found by it."""
    text = f"{len(prompt)},{len(chosen)},{prompt}{chosen}{rejected}"  # the lengths make the split unambiguous
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def flag_rows(
    table: pd.DataFrame, *, max_chars: int, had_decode_errors: bool, seen: dict[bytes, int] | None = None
) -> tuple[pd.DataFrame, list[Issue]]:
    """Boolean flags (one column per flag reason, aligned with `table`) and the matching issues.

    `seen` maps the fingerprint of every pair met in earlier batches to its first row, so that a
    file checked batch by batch flags the same duplicates as the whole file at once; it is updated.
    """
    flags = pd.DataFrame(False, index=table.index, columns=list(FLAG_REASONS))
    issues: list[Issue] = []
    rows = table["source_row"].to_numpy()

    def add(mask: pd.Series, reason: str, column: str | None, message) -> None:
        mask = mask.fillna(False).astype(bool)
        flags[reason] |= mask
        for pos in mask.to_numpy().nonzero()[0]:
            issues.append(
                Issue.model_construct(
                    row=int(rows[pos]), reason=reason, column=column, message=message(pos), unusable=False
                )
            )

    stripped = {c: table[c].str.strip() for c in TEXT_COLUMNS}
    lengths = {c: table[c].str.len() for c in TEXT_COLUMNS}
    for c in TEXT_COLUMNS:
        add(stripped[c].eq(""), "empty_field", c, lambda pos, c=c: f"{c} is empty or whitespace only")
    add(
        stripped["chosen"].eq(stripped["rejected"]),
        "identical_responses",
        None,
        lambda pos: "chosen and rejected are identical",
    )
    seen = {} if seen is None else seen
    first_row = []
    for digest, row in zip(map(pair_digest, table["prompt"], table["chosen"], table["rejected"]), rows):
        first_row.append(seen.setdefault(digest, int(row)))
    dup = pd.Series([f != int(r) for f, r in zip(first_row, rows)], index=table.index, dtype=bool)
    if dup.any():
        add(dup, "duplicate", None, lambda pos: f"same prompt, chosen and rejected as row {first_row[pos]}")
    for c in TEXT_COLUMNS:
        add(
            lengths[c].gt(max_chars),
            "too_long",
            c,
            lambda pos, c=c: f"{c} has {int(lengths[c].iloc[pos])} characters (limit {max_chars})",
        )
    for c in TEXT_COLUMNS:
        add(table[c].str.contains("\x00", regex=False), "bad_encoding", c, lambda pos, c=c: f"{c} contains a NUL byte")
        if had_decode_errors:
            add(
                table[c].str.contains("\ufffd", regex=False),
                "bad_encoding",
                c,
                lambda pos, c=c: f"{c} had invalid UTF-8 (replaced with U+FFFD)",
            )
    return flags, issues
