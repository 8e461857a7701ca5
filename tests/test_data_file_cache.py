"""Parsed preference files kept in the workspace (dpo_engine/data/file_cache.py): a hit equals parsing
the file, a changed file is parsed again, the cache stays bounded and a damaged entry is no error."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from dpo_engine.data import load_preferences, open_dataset
from dpo_engine.data.file_cache import CACHE_DIR, MAX_ENTRIES, cached_file_table, file_key
from tests.conftest import HH_SAMPLE, PANDALM_SAMPLE


def _cached(root, path, parse):
    return cached_file_table(root, file_key(path), path, parse)  # the key taken before parsing, as open_dataset does


def _parse_counting(calls: list):
    def parse(path):
        calls.append(str(path))
        return load_preferences(path).finalize(drop_flagged=True)

    return parse


@pytest.mark.parametrize("sample", [HH_SAMPLE, PANDALM_SAMPLE], ids=["hh", "pandalm"])
def test_a_hit_equals_parsing_the_file(tmp_path, sample):
    calls: list = []
    parse = _parse_counting(calls)
    first = _cached(tmp_path, sample, parse)
    second = _cached(tmp_path, sample, parse)
    assert len(calls) == 1  # the second read came from the cache
    pd.testing.assert_frame_equal(second[0], first[0])
    assert second[1] == first[1] and sum(first[1].values()) > 0  # the drop counts too (each file has flagged rows)
    assert len(list((tmp_path / CACHE_DIR).glob("*.parquet"))) == 1


def test_missing_values_and_a_category_column_come_back_as_parsed(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}", "category": "chat" if i % 2 else None}
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parse = _parse_counting([])
    parsed = parse(data)
    _cached(tmp_path / "ws", data, parse)
    hit = _cached(tmp_path / "ws", data, lambda p: pytest.fail("parsed again"))
    pd.testing.assert_frame_equal(hit[0], parsed[0])
    assert hit[0]["category"].tolist() == [None, "chat"] * 3  # missing stays None, not NaN


def test_a_changed_file_is_parsed_again(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) + "\n" for p in "pq"))
    calls: list = []
    parse = _parse_counting(calls)
    assert len(_cached(tmp_path / "ws", data, parse)[0]) == 2
    stat = data.stat()
    data.write_text(data.read_text() + json.dumps({"prompt": "r", "chosen": "e", "rejected": "f"}) + "\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time, other size
    assert len(_cached(tmp_path / "ws", data, parse)[0]) == 3
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, touched
    assert len(_cached(tmp_path / "ws", data, parse)[0]) == 3
    assert len(calls) == 3


def test_the_cache_keeps_the_newest_entries_and_survives_a_damaged_one(tmp_path):
    calls: list = []
    parse = _parse_counting(calls)
    files = []
    for i in range(MAX_ENTRIES + 2):
        data = tmp_path / f"pairs{i}.jsonl"
        data.write_text(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n")
        files.append(data)
        _cached(tmp_path / "ws", data, parse)
    entries = list((tmp_path / "ws" / CACHE_DIR).glob("*.parquet"))
    assert len(entries) == MAX_ENTRIES
    for entry in entries:
        entry.write_bytes(b"not parquet")
    table, _ = _cached(tmp_path / "ws", files[-1], parse)  # damaged: parsed again, rewritten
    assert table["prompt"].tolist() == [f"p{MAX_ENTRIES + 1}"] and len(calls) == MAX_ENTRIES + 3
    assert _cached(tmp_path / "ws", files[-1], parse)[0].equals(table) and len(calls) == MAX_ENTRIES + 3
    _cached(None, files[0], parse)  # no workspace: no cache
    assert len(calls) == MAX_ENTRIES + 4


def test_open_dataset_reads_a_file_through_the_workspace_cache(workspace):
    first = open_dataset(workspace, str(HH_SAMPLE))
    assert len(list((workspace.root / CACHE_DIR).glob("*.parquet"))) == 1
    second = open_dataset(workspace, str(HH_SAMPLE))
    pd.testing.assert_frame_equal(second.table, first.table)
    assert second.dropped == first.dropped and second.source == first.source
