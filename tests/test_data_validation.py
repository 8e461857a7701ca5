"""Bad input: whole-file errors, per-row reasons with row numbers, and the accounting invariant."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_engine.data import (
    FLAG_REASONS,
    DataFormatError,
    IngestOptions,
    MissingColumnsError,
    NoUsableRowsError,
    load_preferences,
)


def _line(**kw) -> str:
    return json.dumps(kw)


GOOD = _line(prompt="q", chosen="a", rejected="b")


def _assert_accounting(result, drop_flagged=True):
    kept, dropped = result.finalize(drop_flagged)
    assert len(kept) + sum(dropped.values()) == result.report.n_rows_in
    return kept, dropped


# --------------------------------------------------------------------- whole-file errors


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
        (gzip.compress(b"", mtime=0), "empty"),  # no time stamp: test ids must match across processes
        (bytes(range(256)) * 40, "binary"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (b"PAR1 definitely not parquet", "Parquet"),
        (b'[{"prompt": "q", "chosen": "a"', "invalid JSON at line 1"),
        (b'{"rows": 3}\n', "columns found: 'rows'"),  # one JSON Lines record
        (b"42", "missing required column"),
        (b"[]", "no rows"),
        (b"a,b,a\n1,2,3\n", "repeats column names"),
    ],
)
def test_whole_file_problems_raise_data_format_error(data, match):
    with pytest.raises(DataFormatError, match=match) as err:
        load_preferences(data)
    assert "\n" not in str(err.value)


def test_json_object_without_rows():
    with pytest.raises(DataFormatError, match="without a list of rows.*top-level keys: rows"):
        load_preferences(b'{"rows": 3}', filename="x.json")


def test_missing_file_and_wrong_parquet_extension(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="not a file"):
        load_preferences(tmp_path)
    with pytest.raises(DataFormatError, match="does not start like a Parquet"):
        load_preferences(GOOD.encode(), filename="x.parquet")


def test_missing_columns_lists_found_and_suggestion():
    with pytest.raises(MissingColumnsError) as err:
        load_preferences(b"question,answer\nq,a\n", filename="x.csv")
    e = err.value
    assert e.missing == ["chosen", "rejected"] and e.columns_found == ["question", "answer"]
    assert e.suggested_mapping == {"prompt": "question"}
    assert "'question', 'answer'" in str(e) and "prompt=question" in str(e)


def test_flat_strings_without_prompt_column_need_prompt():
    with pytest.raises(MissingColumnsError) as err:
        load_preferences(_line(chosen="a", rejected="b").encode())
    assert err.value.missing == ["prompt"]


def test_all_rows_unusable_raises_with_report():
    data = "\n".join(["{broken", _line(prompt="q", chosen=1, rejected="b")]).encode() + b"\n"
    with pytest.raises(NoUsableRowsError) as err:
        load_preferences(data, fmt="jsonl")
    rep = err.value.report
    assert rep.n_rows_in == 2 and rep.n_unusable == 2
    assert rep.rows_with("malformed") == [1] and rep.rows_with("wrong_type") == [2]


# --------------------------------------------------------------------------- row reasons


def test_each_row_reason_with_row_numbers():
    lines = [
        GOOD,  # 1 ok
        '{"prompt": "q", "chosen": "trunc',  # 2 malformed (truncated line)
        _line(prompt="q", chosen=["a"], rejected="b"),  # 3 wrong_type (list)
        _line(prompt="q", chosen=7, rejected="b"),  # 4 wrong_type (number)
        _line(prompt="q", rejected="b"),  # 5 missing_field
        _line(prompt="q", chosen=None, rejected="b"),  # 6 missing_field (null)
        _line(prompt="   ", chosen="a", rejected="b"),  # 7 empty_field
        _line(prompt="q", chosen="same", rejected="same"),  # 8 identical_responses
        GOOD,  # 9 duplicate of 1
        _line(prompt="q", chosen="x" * 101, rejected="b"),  # 10 too_long
        _line(prompt="q\x00", chosen="a2", rejected="b2"),  # 11 bad_encoding (NUL)
        "[1, 2]",  # 12 malformed (not an object)
    ]
    r = load_preferences(("\n".join(lines) + "\n").encode(), options=IngestOptions(max_chars=100))
    rep = r.report
    assert rep.n_rows_in == 12
    assert rep.rows_with("malformed") == [2, 12]
    assert rep.rows_with("wrong_type") == [3, 4]
    assert rep.rows_with("missing_field") == [5, 6]
    assert rep.rows_with("empty_field") == [7]
    assert rep.rows_with("identical_responses") == [8]
    assert rep.rows_with("duplicate") == [9]
    assert rep.rows_with("too_long") == [10]
    assert rep.rows_with("bad_encoding") == [11]
    assert rep.n_unusable == 6 and rep.n_usable == 6 and rep.n_flagged == 5
    assert {i.reason: i.unusable for i in rep.issues} == {
        "malformed": True,
        "wrong_type": True,
        "missing_field": True,
        "empty_field": False,
        "identical_responses": False,
        "duplicate": False,
        "too_long": False,
        "bad_encoding": False,
    }
    dup = next(i for i in rep.issues if i.reason == "duplicate")
    assert "row 1" in dup.message
    too_long = next(i for i in rep.issues if i.reason == "too_long")
    assert too_long.column == "chosen" and "101" in too_long.message
    assert rep.counts["malformed"] == 2 and rep.counts["duplicate"] == 1

    kept, dropped = _assert_accounting(r, True)
    assert kept["source_row"].tolist() == [1]
    assert dropped == {
        "malformed": 2,
        "missing_field": 2,
        "wrong_type": 2,
        "empty_field": 1,
        "identical_responses": 1,
        "duplicate": 1,
        "too_long": 1,
        "bad_encoding": 1,
    }
    kept, dropped = _assert_accounting(r, False)
    assert kept["source_row"].tolist() == [1, 7, 8, 9, 10, 11]
    kept, dropped = _assert_accounting(r, ["duplicate", "too_long"])
    assert kept["source_row"].tolist() == [1, 7, 8, 11]
    with pytest.raises(ValueError, match="unknown flag reason"):
        r.finalize(["nonsense"])
    prev = r.preview(10)
    assert prev.set_index("source_row").loc[8, "flags"] == "identical_responses"


def test_row_with_several_flags_counts_once_when_dropped():
    lines = [GOOD, _line(prompt="", chosen="", rejected=""), _line(prompt="", chosen="", rejected="")]
    r = load_preferences(("\n".join(lines)).encode())
    assert r.report.counts["empty_field"] == 2 and r.report.counts["identical_responses"] == 2
    assert r.report.counts["duplicate"] == 1
    assert sum(1 for i in r.report.issues if i.row == 2) == 4  # three empty fields + identical
    kept, dropped = _assert_accounting(r)
    assert dropped == {"empty_field": 2}


def test_invalid_utf8_is_replaced_and_flagged():
    data = GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    r = load_preferences(data)
    assert r.report.rows_with("bad_encoding") == [2]
    assert r.table.iloc[1]["prompt"] == "caf\ufffd"
    assert any("UTF-8" in w for w in r.report.warnings)


def test_csv_rows_with_wrong_field_counts_are_malformed():
    data = b"prompt,chosen,rejected\nq,a,b\nq2,a2\nq3,a3,b3,extra\n\nq4,a4,b4\n"
    r = load_preferences(data, filename="x.csv")
    assert r.report.rows_with("malformed") == [2, 3]
    assert r.table["source_row"].tolist() == [1, 4]
    _assert_accounting(r)


def test_json_array_non_object_elements_and_huge_fields():
    big = "y" * 300_000
    data = json.dumps([{"prompt": "q", "chosen": big, "rejected": "b"}, "oops", None]).encode()
    r = load_preferences(data)
    assert r.report.rows_with("malformed") == [2, 3]
    assert r.report.rows_with("too_long") == [1]
    assert r.table.iloc[0]["chosen"] == big  # kept intact, only flagged
    csv_data = ("prompt,chosen,rejected\nq," + big + ",b\n").encode()
    assert load_preferences(csv_data, filename="big.csv").table.iloc[0]["chosen"] == big


def test_category_kept_and_stringified():
    data = "\n".join(
        [_line(prompt="q", chosen="a", rejected="b", category=3), _line(prompt="q2", chosen="a", rejected="b")]
    ).encode()
    t = load_preferences(data).table
    assert t["category"].tolist() == ["3", None]


def test_hundred_thousand_rows_ingest_whole():
    lines = [
        json.dumps({"prompt": f"question {i % 5000}", "chosen": f"answer {i} " * 5, "rejected": f"other {i} " * 5})
        for i in range(100_000)
    ]
    r = load_preferences(("\n".join(lines)).encode(), filename="big.jsonl")
    assert r.report.n_usable == 100_000
    assert r.table["chosen"].iloc[99_999] == "answer 99999 " * 5


# ------------------------------------------------------------------------ property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
field_value = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "  ", "same", "\x00", "a" * 60]),
    json_values,
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=10)}),
        max_size=3,
    ),
)
record = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "category", "question", "other"]), field_value, max_size=5
)
maybe_record = st.one_of(record, record, json_values)


def _check_outcome(load):
    try:
        r = load()
    except DataFormatError:
        return
    rep = r.report
    assert rep.n_rows_in == rep.n_usable + rep.n_unusable
    assert len(r.table) == rep.n_usable
    for drop in (True, False, ["duplicate"]):
        kept, dropped = r.finalize(drop)
        assert len(kept) + sum(dropped.values()) == rep.n_rows_in
    assert set(r.flags.columns) == set(FLAG_REASONS)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([None, "x.jsonl", "x.json", "x.csv", "x.parquet", "x.jsonl.gz"]))
def test_any_bytes_load_or_raise_data_format_error(data, filename):
    _check_outcome(lambda: load_preferences(data, filename=filename))


@SETTINGS
@given(
    st.lists(maybe_record, max_size=8),
    st.sampled_from(["jsonl", "json", "csv"]),
    st.sampled_from(["auto", "flat", "conversational", "hh"]),
    st.booleans(),
)
def test_any_records_load_or_raise_and_account_for_every_row(records, fmt, layout, gz):
    if fmt == "jsonl":
        data = "\n".join(json.dumps(r) for r in records).encode()
    elif fmt == "json":
        data = json.dumps(records).encode()
    else:
        dicts = [r for r in records if isinstance(r, dict)]
        cols = sorted({k for r in dicts for k in r})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in dicts:
            w.writerow([r.get(c, "") if isinstance(r.get(c, ""), str) else json.dumps(r.get(c)) for c in cols])
        data = buf.getvalue().encode()
    if gz:
        data = gzip.compress(data)
    _check_outcome(lambda: load_preferences(data, layout=layout, options=IngestOptions(max_chars=50)))
    if fmt == "jsonl" and records:
        try:
            r = load_preferences(data, layout=layout)
        except DataFormatError:
            return
        # every input line is a row; none vanish
        non_blank = sum(1 for line in (gzip.decompress(data) if gz else data).decode().split("\n") if line.strip())
        assert r.report.n_rows_in == non_blank


@SETTINGS
@given(st.text(max_size=200))
def test_any_text_loads_or_raises(text):
    _check_outcome(lambda: load_preferences(text.encode("utf-8", "surrogatepass")))
