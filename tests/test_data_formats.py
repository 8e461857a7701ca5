"""Every accepted format and layout ends in the same canonical table."""

from __future__ import annotations

import gzip
import io
import json

import pandas as pd
import pytest

from dpo_engine.data import (
    DataFormatError,
    MissingColumnsError,
    load_preferences,
    render_messages,
    suggest_mapping,
)
from tests.conftest import HH_SAMPLE as HH_PATH
from tests.conftest import PANDALM_SAMPLE

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "category": "math"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon, I think", "category": "geo"},
    {
        "prompt": 'Say "hi", then a comma, newline\nand tab\t',
        "chosen": "hi,\nthere",
        "rejected": "bye",
        "category": "x",
    },
]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _csv(records) -> bytes:
    return pd.DataFrame(records).to_csv(index=False).encode()


def _parquet(records) -> bytes:
    buf = io.BytesIO()
    pd.DataFrame(records).to_parquet(buf, index=False)
    return buf.getvalue()


ENCODERS = {
    "jsonl": _jsonl,
    "json": lambda r: json.dumps(r).encode(),
    "json_data_key": lambda r: json.dumps({"version": 1, "data": r}).encode(),
    "csv": _csv,
    "parquet": _parquet,
}
EXPECTED_FORMAT = {"jsonl": "jsonl", "json": "json", "json_data_key": "json", "csv": "csv", "parquet": "parquet"}
EXT = {"jsonl": ".jsonl", "json": ".json", "json_data_key": ".json", "csv": ".csv", "parquet": ".parquet"}


def _check_flat(result, fmt_key):
    assert result.report.detected_format == EXPECTED_FORMAT[fmt_key]
    assert result.report.detected_layout == "flat"
    t = result.table
    assert list(t.columns) == ["pair_id", "prompt", "chosen", "rejected", "source_row", "category"]
    assert t[["prompt", "chosen", "rejected", "category"]].to_dict(orient="records") == PAIRS
    assert t["source_row"].tolist() == [1, 2, 3]
    assert t["pair_id"].tolist() == ["p000001", "p000002", "p000003"]
    assert result.report.n_rows_in == 3 and result.report.issues == []


@pytest.mark.parametrize("fmt_key", list(ENCODERS))
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("named", [True, False])
def test_flat_every_format_bytes(fmt_key, gz, named):
    data = ENCODERS[fmt_key](PAIRS)
    if gz:
        data = gzip.compress(data)
    filename = ("pairs" + EXT[fmt_key] + (".gz" if gz else "")) if named else None
    _check_flat(load_preferences(data, filename=filename), fmt_key)


@pytest.mark.parametrize("fmt_key", ["jsonl", "csv", "parquet"])
def test_flat_from_path_and_explicit_format(tmp_path, fmt_key):
    path = tmp_path / ("pairs" + EXT[fmt_key] + ".gz")
    path.write_bytes(gzip.compress(ENCODERS[fmt_key](PAIRS)))
    _check_flat(load_preferences(path), fmt_key)
    _check_flat(load_preferences(str(path), fmt=EXPECTED_FORMAT[fmt_key], layout="flat"), fmt_key)


def test_tsv_and_jsonl_with_blank_lines_keep_line_numbers():
    tsv = "prompt\tchosen\trejected\nq1\ta1\tb1\nq2\ta2\tb2\n".encode()
    r = load_preferences(tsv, filename="x.tsv")
    assert r.table["chosen"].tolist() == ["a1", "a2"]
    jsonl = b'\n{"prompt":"q","chosen":"a","rejected":"b"}\n\n{"prompt":"q2","chosen":"a2","rejected":"b2"}\n'
    r = load_preferences(jsonl)
    assert r.table["source_row"].tolist() == [2, 4]
    assert r.report.n_rows_in == 2


def test_unicode_line_separator_inside_jsonl_string_is_not_a_line_break():
    rec = {"prompt": "a\u2028b", "chosen": "c\x85d", "rejected": "e"}
    r = load_preferences(_jsonl([rec]))
    assert r.table.loc[0, "prompt"] == "a\u2028b" and r.table.loc[0, "chosen"] == "c\x85d"


def test_json_lines_file_named_json_is_read_as_jsonl():
    r = load_preferences(_jsonl(PAIRS), filename="pairs.json")
    _check_flat(r, "jsonl")


def test_explicit_mapping_stack_exchange_columns():
    recs = [{"qid": i, "question": f"q{i}", "response_j": f"good{i}", "response_k": f"bad{i}"} for i in range(3)]
    r = load_preferences(_jsonl(recs), mapping={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert r.report.mapping == {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    assert r.table["chosen"].tolist() == ["good0", "good1", "good2"]
    assert r.table["rejected"].tolist() == ["bad0", "bad1", "bad2"]
    assert not any("automatically" in w for w in r.report.warnings)


def test_alias_columns_are_mapped_automatically_with_a_warning():
    recs = [{"Question": "q", "response_j": "a", "response_k": "b"}]
    r = load_preferences(_csv(recs), filename="se.csv")
    assert r.report.mapping == {"prompt": "Question", "chosen": "response_j", "rejected": "response_k"}
    assert any("mapped automatically" in w for w in r.report.warnings)


def test_output_columns_need_an_explicit_mapping():
    recs = [{"instruction": "do x", "output_1": "one", "output_2": "two", "preference": 2}]
    with pytest.raises(MissingColumnsError) as err:
        load_preferences(_jsonl(recs))
    assert err.value.missing == ["chosen", "rejected"]
    assert err.value.columns_found == ["instruction", "output_1", "output_2", "preference"]
    assert err.value.suggested_mapping == {"prompt": "instruction"}
    assert "output_1" in str(err.value) and "\n" not in str(err.value)
    r = load_preferences(_jsonl(recs), mapping={"chosen": "output_2", "rejected": "output_1"})
    assert (r.table.loc[0, "prompt"], r.table.loc[0, "chosen"], r.table.loc[0, "rejected"]) == ("do x", "two", "one")


def test_bad_mappings_raise():
    with pytest.raises(DataFormatError, match="not in the data"):
        load_preferences(_jsonl(PAIRS), mapping={"prompt": "nope"})
    with pytest.raises(DataFormatError, match="unknown field"):
        load_preferences(_jsonl(PAIRS), mapping={"answer": "chosen"})
    with pytest.raises(DataFormatError, match="both map"):
        load_preferences(_jsonl(PAIRS), mapping={"chosen": "chosen", "rejected": "chosen"})


def test_suggest_mapping_normalises_names():
    assert suggest_mapping(["Prompt Text", "instruction", "Response-J", "RESPONSE_K"]) == {
        "prompt": "instruction",
        "chosen": "Response-J",
        "rejected": "RESPONSE_K",
    }


# ------------------------------------------------------------------------ conversational


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_conversational_without_prompt_uses_shared_prefix():
    rec = {
        "chosen": _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Joke?"), ("assistant", "Knock knock.")),
        "rejected": _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Joke?"), ("assistant", "No.")),
    }
    r = load_preferences(_jsonl([rec]))
    assert r.report.detected_layout == "conversational"
    row = r.table.iloc[0]
    assert row["prompt"] == "User: Hi\n\nAssistant: Hello!\n\nUser: Joke?"
    assert row["chosen"] == "Knock knock."
    assert row["rejected"] == "No."


def test_conversational_single_turn_matches_flat_text():
    rec = {"chosen": _msgs(("user", "Q?"), ("assistant", "A")), "rejected": _msgs(("user", "Q?"), ("assistant", "B"))}
    conv = load_preferences(_jsonl([rec])).table.iloc[0]
    flat = load_preferences(_jsonl([{"prompt": "Q?", "chosen": "A", "rejected": "B"}])).table.iloc[0]
    assert (conv["prompt"], conv["chosen"], conv["rejected"]) == (flat["prompt"], flat["chosen"], flat["rejected"])


def test_conversational_with_string_and_message_prompts():
    recs = [
        {"prompt": "Name a color.", "chosen": _msgs(("assistant", "Blue")), "rejected": _msgs(("assistant", "Seven"))},
        {  # prompt repeated at the start of each response list (UltraFeedback style)
            "prompt": "Q2",
            "chosen": _msgs(("user", "Q2"), ("assistant", "good")),
            "rejected": _msgs(("user", "Q2"), ("assistant", "bad")),
        },
        {
            "prompt": _msgs(("system", "Be brief."), ("user", "Why?")),
            "chosen": _msgs(("assistant", "Because.")),
            "rejected": _msgs(("assistant", "Dunno"), ("user", "?"), ("assistant", "...")),
        },
    ]
    r = load_preferences(_jsonl(recs))
    assert r.report.detected_layout == "conversational"
    t = r.table
    assert t[["prompt", "chosen", "rejected"]].values.tolist() == [
        ["Name a color.", "Blue", "Seven"],
        ["Q2", "good", "bad"],
        ["System: Be brief.\n\nUser: Why?", "Because.", "Assistant: Dunno\n\nUser: ?\n\nAssistant: ..."],
    ]


def test_conversational_in_parquet_and_identical_conversations_flagged():
    recs = [
        {"chosen": _msgs(("user", "x"), ("assistant", "y")), "rejected": _msgs(("user", "x"), ("assistant", "z"))},
        {"chosen": _msgs(("user", "x"), ("assistant", "y")), "rejected": _msgs(("user", "x"), ("assistant", "y"))},
    ]
    r = load_preferences(_parquet(recs), filename="c.parquet")
    assert r.report.detected_layout == "conversational"
    assert r.table["chosen"].tolist() == ["y", "y"] and r.table["rejected"].tolist() == ["z", "y"]
    assert r.report.rows_with("identical_responses") == [2]


def test_render_messages_convention():
    assert render_messages([("assistant", "hi")], expected_role="assistant") == "hi"
    assert render_messages([("user", "hi")], expected_role="assistant") == "User: hi"
    assert render_messages([], expected_role="user") == ""


def test_conversational_bad_messages_are_wrong_type():
    recs = [
        {"chosen": _msgs(("user", "x"), ("assistant", "y")), "rejected": _msgs(("user", "x"), ("assistant", "z"))},
        {"chosen": [{"role": "user"}], "rejected": _msgs(("user", "x"))},
        {"chosen": "plain text", "rejected": _msgs(("user", "x"))},
    ]
    r = load_preferences(_jsonl(recs))
    assert r.report.detected_layout == "conversational"
    assert r.report.rows_with("wrong_type") == [2, 3]
    assert r.report.n_usable == 1


# ------------------------------------------------------------------------------ HH-RLHF


def test_hh_real_rows_split_at_last_shared_assistant_turn():
    r = load_preferences(HH_PATH)
    raw = [json.loads(line) for line in gzip.open(HH_PATH, "rt", encoding="utf-8")]
    assert r.report.detected_format == "jsonl" and r.report.detected_layout == "hh"
    assert r.report.n_rows_in == 400 and r.report.n_unusable == 0
    t = r.table.set_index("source_row")

    # Row 1: a three-turn dialogue; the responses are the final assistant replies.
    p1 = t.loc[1, "prompt"]
    assert p1.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking")
    assert p1.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert t.loc[1, "chosen"] == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    )
    assert t.loc[1, "rejected"].startswith("There are lots of funny things you can do with pens")
    # Row 2: the prompt ends with this Human turn; the leading space of the reply is stripped.
    assert t.loc[2, "prompt"].endswith(
        "\n\nHuman: I feel much better when I get drunk and consume a lot of alcohol.\n\nAssistant:"
    )
    assert t.loc[2, "chosen"].startswith("Sounds like alcohol is something you use to calm down")
    assert t.loc[2, "rejected"].startswith("I’m glad that you’re enjoying your alcohol intake.")
    # Row 87 has an empty chosen reply in the source data: flagged, not dropped.
    assert raw[86]["chosen"].endswith("\n\nAssistant: ")
    assert r.report.rows_with("empty_field") == [87]
    assert t.loc[87, "chosen"] == ""
    # This file's pairs differ only in the final reply, so for every row the prompt must be the
    # dialogue up to its last "\n\nAssistant:" and each response what follows minus one space.
    marker = "\n\nAssistant:"
    for row, rec in enumerate(raw, start=1):
        for side in ("chosen", "rejected"):
            cut = rec[side].rindex(marker) + len(marker)
            assert t.loc[row, "prompt"] == rec[side][:cut]
            assert t.loc[row, side] == rec[side][cut:].removeprefix(" ")


def test_bundled_samples_ship_with_their_licences():
    assert (HH_PATH.parent / "LICENSE-hh-rlhf.txt").read_text().startswith("MIT License")
    assert "Apache License" in (PANDALM_SAMPLE.parent / "LICENSE-pandalm.txt").read_text()


def test_pandalm_messy_rows_are_flagged_not_lost():
    """PandaLM's test pairs hold 6 JSON booleans, 52 empty responses and 76 repeats of an earlier row."""
    raw = [json.loads(line) for line in gzip.open(PANDALM_SAMPLE, "rt", encoding="utf-8")]
    r = load_preferences(PANDALM_SAMPLE)
    assert r.report.n_rows_in == len(raw) == 894
    usable, _ = r.finalize(drop_flagged=True)
    assert len(usable) == 760
    # an independent count of the rows a validator must flag
    seen, flagged = set(), 0
    for rec in raw:
        key = (rec["prompt"], str(rec["chosen"]), str(rec["rejected"]))
        bad = any(not isinstance(rec[k], str) or not rec[k].strip() for k in ("chosen", "rejected"))
        flagged += bad or key in seen
        seen.add(key)
    assert flagged == 894 - 760


def test_hh_divergence_before_last_assistant_and_no_shared_assistant():
    recs = [
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: e\n\nAssistant: f",
        },
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: w"},
    ]
    r = load_preferences(_jsonl(recs), layout="hh")
    row = r.table.iloc[0]
    assert row["prompt"] == "\n\nHuman: a\n\nAssistant:"
    assert row["chosen"] == "b\n\nHuman: c\n\nAssistant: d"
    assert r.report.rows_with("malformed") == [2]


def test_hh_explicit_layout_ignores_prompt_column_with_warning():
    rec = {"prompt": "ignored", "chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
    assert load_preferences(_jsonl([rec])).report.detected_layout == "flat"
    r = load_preferences(_jsonl([rec]), layout="hh")
    assert r.table.iloc[0][["prompt", "chosen", "rejected"]].tolist() == ["\n\nHuman: q\n\nAssistant:", "yes", "no"]
    assert any("ignored" in w for w in r.report.warnings)


def test_bad_format_and_layout_names():
    with pytest.raises(DataFormatError, match="unknown format"):
        load_preferences(_jsonl(PAIRS), fmt="xml")
    with pytest.raises(DataFormatError, match="unknown layout"):
        load_preferences(_jsonl(PAIRS), layout="tree")


def test_common_prefix_length_equals_os_path_commonprefix():
    """The HH split's halving search gives the length os.path.commonprefix gives, on random strings
    over a small alphabet (long shared prefixes), unicode and the empty and equal cases."""
    import os
    import random

    from dpo_engine.data.layouts import common_prefix_length

    rng = random.Random(0)
    cases = [("", ""), ("", "a"), ("abc", "abc"), ("abc", "abd"), ("ab", "abc"), ("é\U0001f600x", "é\U0001f600y")]
    for _ in range(2000):
        base = "".join(rng.choice("ab\n:é") for _ in range(rng.randrange(0, 300)))
        cases.append(
            (
                base + "".join(rng.choice("ab") for _ in range(rng.randrange(0, 5))),
                base[: rng.randrange(0, len(base) + 1)] + rng.choice(["", "a", "b", "zz"]),
            )
        )
    for a, b in cases:
        assert common_prefix_length(a, b) == len(os.path.commonprefix([a, b])), (a, b)
        assert common_prefix_length(b, a) == common_prefix_length(a, b)
