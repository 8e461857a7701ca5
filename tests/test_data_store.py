"""Dataset registry round trips and the `dpo-kernels data` commands."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from dpo_engine.cli import app
from dpo_engine.data import (
    SAMPLE_DATASET_NAME,
    DataFormatError,
    DatasetExists,
    DatasetNotFound,
    DatasetStore,
    content_hash,
    ensure_sample_dataset,
    load_preferences,
)
from dpo_engine.workspace import Workspace

LINES = [
    {"prompt": "q1", "chosen": "a1", "rejected": "b1", "category": "c"},
    {"prompt": "q2", "chosen": "same", "rejected": "same", "category": "c"},
    {"prompt": "q3", "chosen": "a3", "rejected": "b3", "category": "d"},
]


def _data() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in LINES).encode() + b"{broken\n"


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    return Workspace.resolve(tmp_path / "ws")


def test_add_list_get_load_delete_round_trip(ws):
    store = DatasetStore(ws)
    result = load_preferences(_data(), filename="pairs.jsonl")
    info = store.add(result, "My Pairs!", source="pairs.jsonl")
    assert info.id.startswith("my-pairs-") and len(info.id) == len("my-pairs-") + 6
    assert info.n_pairs == 2 and info.n_rows_in == 4
    assert info.dropped == {"malformed": 1, "identical_responses": 1}
    assert info.detected_format == "jsonl" and info.detected_layout == "flat" and info.has_category

    d = ws.datasets_dir / info.id
    meta = json.loads((d / "meta.json").read_text())
    assert {
        "id",
        "name",
        "n_pairs",
        "source",
        "created_at",
        "content_hash",
        "dropped",
        "warnings",
        "detected_format",
        "detected_layout",
    } <= set(meta)
    stored = pd.read_parquet(d / "data.parquet")
    assert stored["pair_id"].tolist() == ["p000001", "p000003"]
    assert stored["category"].tolist() == ["c", "d"]

    # The content hash is sha256 over the canonical rows, recomputed independently here.
    h = hashlib.sha256()
    h.update(json.dumps(["pair_id", "prompt", "chosen", "rejected", "category"]).encode())
    for rec in LINES[::2]:
        row = [f"p{LINES.index(rec) + 1:06d}", rec["prompt"], rec["chosen"], rec["rejected"], rec["category"]]
        h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    assert info.content_hash == h.hexdigest() == content_hash(stored)
    assert info.id.endswith(info.content_hash[:6])

    assert [i.id for i in store.list()] == [info.id]
    assert store.get(info.id) == store.get("My Pairs!") == info
    pd.testing.assert_frame_equal(store.load(info.id), stored)
    with pytest.raises(DatasetExists):
        store.add(result, "My Pairs!", source="again")
    with pytest.raises(DatasetNotFound, match="no dataset with id or name 'nope'"):
        store.get("nope")
    assert isinstance(DatasetNotFound("x"), KeyError)

    kept_all = store.add(result, "keep", source="pairs.jsonl", drop_flagged=False)
    assert kept_all.n_pairs == 3 and kept_all.n_flagged_kept == 1 and kept_all.dropped == {"malformed": 1}
    assert kept_all.content_hash != info.content_hash

    store.delete(info.id)
    assert [i.id for i in store.list()] == [kept_all.id]
    assert not d.exists()
    with pytest.raises(DatasetNotFound):
        store.delete(info.id)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_reingests_to_the_same_content(ws, fmt):
    store = DatasetStore(ws)
    info = store.add(load_preferences(_data()), "exp", source="x")
    payload = store.export(info.id, fmt)
    original = store.load(info.id)
    if fmt == "parquet":
        back = pd.read_parquet(io.BytesIO(payload))
    elif fmt == "csv":
        back = pd.read_csv(io.BytesIO(payload), dtype={"source_row": "int64"}, keep_default_na=False)
    else:
        back = pd.DataFrame([json.loads(line) for line in payload.decode().splitlines()])
    pd.testing.assert_frame_equal(back, original, check_dtype=False)
    again = load_preferences(payload, filename=f"exp.{fmt}")
    assert (
        again.table[["prompt", "chosen", "rejected"]].values.tolist()
        == original[["prompt", "chosen", "rejected"]].values.tolist()
    )
    with pytest.raises(ValueError, match="unknown export format"):
        store.export(info.id, "xml")  # type: ignore[arg-type]


def test_nothing_left_to_store_raises(ws):
    result = load_preferences(b'{"prompt": "q", "chosen": "s", "rejected": "s"}\n')
    with pytest.raises(DataFormatError, match="nothing left to store"):
        DatasetStore(ws).add(result, "empty", source="x")
    assert DatasetStore(ws).list() == []
    assert [p.name for p in ws.datasets_dir.iterdir()] == []


def test_ensure_sample_dataset_is_idempotent(ws):
    first = ensure_sample_dataset(ws)
    assert first.name == SAMPLE_DATASET_NAME and first.detected_layout == "hh"
    assert first.n_pairs == 399 and first.dropped == {"empty_field": 1}
    second = ensure_sample_dataset(ws)
    assert second == first and len(DatasetStore(ws).list()) == 1


def test_unreadable_meta_is_skipped(ws):
    store = DatasetStore(ws)
    info = store.add(load_preferences(_data()), "ok", source="x")
    (ws.datasets_dir / "junk").mkdir()
    (ws.datasets_dir / "junk" / "meta.json").write_text("{not json")
    assert [i.id for i in store.list()] == [info.id]


# ---------------------------------------------------------------------------------- CLI

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(args))


def test_cli_add_list_show_export_delete(tmp_path):
    w = str(tmp_path / "ws")
    src = tmp_path / "se.csv.gz"
    src.write_bytes(gzip.compress(b"question,response_j,response_k\nq1,good,bad\nq2,x,x\n"))
    res = _invoke(
        "data",
        "add",
        str(src),
        "--map",
        "prompt=question",
        "--map",
        "chosen=response_j",
        "--map",
        "rejected=response_k",
        "--workspace",
        w,
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"dataset_id", "n_pairs", "dropped", "warnings", "detected_format", "detected_layout"} <= set(out)
    assert out["n_pairs"] == 1 and out["dropped"] == {"identical_responses": 1}
    assert out["detected_format"] == "csv" and out["dataset_id"].startswith("se-")

    res = _invoke("data", "add", str(src), "--name", "kept", "--keep-flagged", "--workspace", w)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_pairs"] == 2  # aliases mapped automatically

    listed = json.loads(_invoke("data", "list", "--json", "--workspace", w).stdout)
    assert [d["name"] for d in listed] == ["se", "kept"]
    table = _invoke("data", "list", "--workspace", w).stdout
    assert table.splitlines()[0].split() == ["ID", "NAME", "PAIRS", "LAYOUT", "CREATED"]

    shown = json.loads(_invoke("data", "show", "kept", "--workspace", w).stdout)
    assert shown["n_pairs"] == 2

    dest = tmp_path / "out.csv"
    res = _invoke("data", "export", "kept", "--out", str(dest), "--workspace", w)
    assert res.exit_code == 0, res.output
    assert pd.read_csv(dest)["chosen"].tolist() == ["good", "x"]

    assert _invoke("data", "delete", out["dataset_id"], "--workspace", w).exit_code == 0
    assert [d["name"] for d in json.loads(_invoke("data", "list", "--json", "--workspace", w).stdout)] == ["kept"]


@pytest.mark.parametrize(
    "content, extra, expected",
    [
        (b"", [], "error: the file is empty"),
        (b"\x00\x01\x02\x03" * 100, [], "error: the file looks binary"),
        (b"a,b\n1,2\n", [], "error: missing required column(s)"),
        (b'{"prompt":"q","chosen":"a","rejected":"b"}\n', ["--map", "prompt"], "error: --map expects"),
        (b'{"prompt":"q","chosen":"a","rejected":"b"}\n', ["--format", "xml"], "error: unknown format"),
        (b'{"prompt":"q","chosen":"a","rejected":"b"}\n', ["--max-chars", "0"], "error: --max-chars"),
    ],
)
def test_cli_add_bad_input_exits_2_with_one_line(tmp_path, content, extra, expected):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    res = _invoke("data", "add", str(src), "--workspace", str(tmp_path / "ws"), *extra)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), res.stderr
    assert "Traceback" not in res.output


def test_cli_unknown_dataset_and_duplicate_name(tmp_path):
    w = str(tmp_path / "ws")
    for cmd in (["show", "nope"], ["delete", "nope"], ["export", "nope", "--out", str(tmp_path / "o.jsonl")]):
        res = _invoke("data", *cmd, "--workspace", w)
        assert res.exit_code == 2 and res.stderr.startswith("error: no dataset with id or name 'nope'")
    src = tmp_path / "p.jsonl"
    src.write_bytes(b'{"prompt":"q","chosen":"a","rejected":"b"}\n')
    assert _invoke("data", "add", str(src), "--workspace", w).exit_code == 0
    res = _invoke("data", "add", str(src), "--workspace", w)
    assert res.exit_code == 2 and "already exists" in res.stderr
