"""Bounded, streaming ingestion: decompression caps, batch-by-batch equality, staging, full disks.

The batch-by-batch path must give exactly what reading the file in one batch gives (rows, flags,
report), on every format the suite knows; pandas' own readers are the independent reference
for the flat formats.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc

import pandas as pd
import pytest

from dpo_engine.data import (
    DataFormatError,
    DatasetStore,
    IngestOptions,
    StagedIngest,
    load_preferences,
    stage_preferences,
)
from dpo_engine.data.readers import open_records
from dpo_engine.data.report import MAX_UPLOAD_MB
from dpo_engine.jobs import JobStore
from tests.conftest import HH_SAMPLE, PANDALM_SAMPLE
from tests.test_data_formats import ENCODERS, EXT, PAIRS

CLI = [sys.executable, "-m", "dpo_engine.cli"]


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt": f"question {i} " + "x" * (i % 50), "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
        for i in range(offset, offset + n)
    ]


# ---- decompression limits -------------------------------------------------------------------


def test_gzip_of_zeros_is_refused_from_its_first_bytes():
    bomb = _gzip(bytes(64 * 1024**2))
    start = time.perf_counter()
    with pytest.raises(DataFormatError, match="looks binary"):
        load_preferences(bomb, filename="pairs.jsonl.gz")
    # Refused after the sniffed head, not after inflating 64 MB (a functional bound, generous on purpose).
    assert time.perf_counter() - start < 5


def test_text_bomb_is_refused_by_the_compression_ratio():
    line = json.dumps({"prompt": "p", "chosen": "a" * 200, "rejected": "b" * 200}) + "\n"
    bomb = _gzip(line.encode() * 150_000)  # about 64 MB of the same row
    assert len(bomb) * 100 < 64 * 1024**2
    with pytest.raises(DataFormatError, match="inflates more than 100x"):
        load_preferences(bomb, filename="pairs.jsonl.gz")


def test_decompressed_size_cap():
    data = _gzip(b"".join(json.dumps(r).encode() + b"\n" for r in _rows(20_000)))
    with pytest.raises(DataFormatError, match="inflates to more than 1 MB"):
        load_preferences(data, options=IngestOptions(max_decompressed_mb=1, max_compression_ratio=1e9))
    assert load_preferences(data).report.n_usable == 20_000


def test_upload_limit_is_the_one_the_app_serves():
    config = (HH_SAMPLE.parents[1] / "streamlit_config.toml").read_text()
    assert f"maxUploadSize = {MAX_UPLOAD_MB} " in config
    assert IngestOptions().max_decompressed_mb == 4 * MAX_UPLOAD_MB


def test_over_long_line_is_one_unusable_row_and_the_rest_is_read():
    rows = _rows(3)
    huge = json.dumps({"prompt": "p", "chosen": "c" * (2 * 1024**2), "rejected": "r"})
    data = (json.dumps(rows[0]) + "\n" + huge + "\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n").encode()
    result = load_preferences(data, filename="x.jsonl", options=IngestOptions(max_row_mb=1))
    assert result.report.rows_with("malformed") == [2]
    assert "max_row_mb" in result.report.issues[0].message
    assert list(result.table["source_row"]) == [1, 3, 4]


# ---- batch by batch equals one batch ---------------------------------------------------------


def _formats() -> list[tuple[str, bytes, str]]:
    cases = []
    for key, encode in ENCODERS.items():
        data = encode(PAIRS * 7)  # repeats: duplicates span batch boundaries
        cases.append((key, data, "pairs" + EXT[key]))
        cases.append((key + "-gz", _gzip(data), "pairs" + EXT[key] + ".gz"))
    cases.append(("utf16-csv", pd.DataFrame(PAIRS * 3).to_csv(index=False).encode("utf-16"), "p.csv"))
    cases.append(("hh", HH_SAMPLE.read_bytes(), HH_SAMPLE.name))
    cases.append(("pandalm", PANDALM_SAMPLE.read_bytes(), PANDALM_SAMPLE.name))
    broken = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n[1, 2]\n\xff\xfe bad bytes\n'
    cases.append(("broken-jsonl", broken * 5, "b.jsonl"))
    return cases


def _same(a, b) -> None:
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.flags, b.flags)
    assert a.report == b.report


@pytest.mark.parametrize("name, data, filename", _formats(), ids=[c[0] for c in _formats()])
def test_batches_of_every_size_give_the_one_batch_result(name, data, filename):
    whole = load_preferences(data, filename=filename, options=IngestOptions(batch_rows=10**6))
    for batch_rows in (1, 4):
        _same(load_preferences(data, filename=filename, options=IngestOptions(batch_rows=batch_rows)), whole)


@pytest.mark.parametrize("key", ["jsonl", "json", "csv", "parquet"])
def test_flat_formats_agree_with_pandas(key):
    data = ENCODERS[key](PAIRS * 5)
    result = load_preferences(data, filename="x" + EXT[key], options=IngestOptions(batch_rows=2))
    reader = {
        "jsonl": lambda b: pd.read_json(io.BytesIO(b), lines=True),
        "json": lambda b: pd.read_json(io.BytesIO(b)),
        "csv": lambda b: pd.read_csv(io.BytesIO(b), keep_default_na=False),
        "parquet": lambda b: pd.read_parquet(io.BytesIO(b)),
    }[key]
    reference = reader(data)
    kept = result.table
    assert len(kept) == len(reference)
    for column in ("prompt", "chosen", "rejected", "category"):
        assert kept[column].tolist() == reference[column].astype(str).tolist()
    # Every repeat of the three pairs after the first is a duplicate of its first occurrence.
    assert result.flags["duplicate"].sum() == len(PAIRS) * 4


def test_staged_ingest_stores_what_the_in_memory_path_stores(workspace, tmp_path):
    data = HH_SAMPLE.read_bytes() + b""
    memory = load_preferences(data, filename="hh.jsonl.gz")
    staged = stage_preferences(data, tmp_path / "staged", filename="hh.jsonl.gz", options=IngestOptions(batch_rows=37))
    assert staged.report == memory.report
    reopened = StagedIngest.open(tmp_path / "staged")
    for drop in (True, False, ["duplicate"]):
        kept, dropped = memory.finalize(drop)
        assert reopened.kept_count(drop) == (len(kept), dropped)
    store = DatasetStore(workspace)
    a = store.add(memory, "in-memory", source="hh")
    b = store.add(reopened, "staged", source="hh")
    assert (a.content_hash, a.n_pairs, a.dropped, a.n_flagged_kept) == (
        b.content_hash,
        b.n_pairs,
        b.dropped,
        b.n_flagged_kept,
    )
    pd.testing.assert_frame_equal(store.load(a.id), store.load(b.id))


def _peak_reading(path, batch_rows: int) -> tuple[int, int]:
    reader = open_records(path, None, "auto")
    tracemalloc.start()
    try:
        n = sum(len(batch.records) for batch in reader.batches(batch_rows))
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_a_batch_not_the_file(tmp_path):
    peaks = {}
    for n_rows in (10_000, 40_000):
        path = tmp_path / f"{n_rows}.jsonl"
        with open(path, "w") as out:
            for start in range(0, n_rows, 5000):
                out.writelines(json.dumps(r) + "\n" for r in _rows(5000, start))
        n, peaks[n_rows] = _peak_reading(path, batch_rows=500)
        assert n == n_rows
    # Four times the file, about the same peak: what is held is a batch, not the file.
    assert peaks[40_000] < 1.5 * peaks[10_000], peaks


# ---- full disks and killed workers -------------------------------------------------------------


def _limit_file_size(limit_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


@pytest.mark.slow  # a CLI or worker process of its own
def test_full_disk_while_storing_gives_one_line_and_stores_nothing(workspace, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(30_000)))
    env = dict(os.environ, DPO_KERNELS_WORKSPACE=str(workspace.root))
    proc = subprocess.run(
        [*CLI, "data", "add", str(path), "--name", "big"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=_limit_file_size(512 * 1024),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk is full" in lines[0] and "nothing was stored" in lines[0], proc.stderr
    store = DatasetStore(workspace)
    assert store.list() == []
    assert [p.name for p in store.root.iterdir()] == []  # no staging or half-written folder left


@pytest.mark.slow  # a CLI or worker process of its own
def test_full_disk_inside_a_job_fails_it_with_one_clear_line(workspace, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": os.urandom(64).hex(), "chosen": os.urandom(64).hex(), "rejected": "r"} for _ in range(10_000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # staged copy well over the limit
    jobs = JobStore.for_workspace(workspace)
    job = jobs.submit("ingest", {"step": "validate", "upload": str(workspace.root / "uploads" / "t" / "p.jsonl")})
    (workspace.root / "uploads" / "t").mkdir(parents=True)
    (workspace.root / "uploads" / "t" / "p.jsonl").write_bytes(path.read_bytes())
    subprocess.run(
        [*CLI, "worker", "--once", "--device", "cpu", "--workspace", str(workspace.root)],
        capture_output=True,
        timeout=120,
        preexec_fn=_limit_file_size(1024 * 1024),
        check=True,
    )
    assert path.stat().st_size > 2 * 1024 * 1024
    done = jobs.get(job.id)
    assert done.status == "failed"
    # The error's first line says what happened; the worker adds the log's last lines below it.
    assert "disk is full" in done.error.splitlines()[0]


@pytest.mark.slow  # a CLI or worker process of its own
def test_worker_killed_during_ingestion_leaves_the_job_to_run_again(workspace, tmp_path):
    upload = workspace.root / "uploads" / "k" / "pairs.jsonl"
    upload.parent.mkdir(parents=True)
    with open(upload, "w") as out:
        for start in range(0, 200_000, 10_000):
            out.writelines(json.dumps(r) + "\n" for r in _rows(10_000, start))
    jobs = JobStore.for_workspace(workspace)
    job = jobs.submit("ingest", {"step": "validate", "upload": str(upload)})
    worker = subprocess.Popen(
        [*CLI, "worker", "--device", "cpu", "--workspace", str(workspace.root), "--poll-s", "0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            snapshot = jobs.get(job.id)
            if snapshot.status == "running" and snapshot.progress > 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the ingest job never got going")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and the job's process, mid-file
        worker.wait(timeout=30)
    assert jobs.get(job.id).status == "running"
    (requeued,) = jobs.reap_lost(timeout_s=0)
    assert requeued.status == "queued" and "start again" in requeued.message
    assert DatasetStore(workspace).list() == []
    subprocess.run(
        [*CLI, "worker", "--once", "--device", "cpu", "--workspace", str(workspace.root)],
        capture_output=True,
        timeout=300,
        check=True,
    )
    done = jobs.get(job.id)
    assert done.status == "succeeded" and done.result["n_usable"] == 200_000


# ---- shapes of input that streaming must not lose --------------------------------------------


def test_one_line_json_array_longer_than_a_row_is_read(tmp_path):
    rows = _rows(12_000)
    path = tmp_path / "pairs"  # no extension: the content decides
    path.write_text(json.dumps(rows))
    assert path.stat().st_size > 1024**2
    result = load_preferences(path, options=IngestOptions(max_row_mb=1))
    assert result.report.detected_format == "json" and result.report.n_usable == 12_000


def test_large_json_array_is_read_item_by_item(tmp_path, monkeypatch):
    import dpo_engine.data.readers as readers

    monkeypatch.setattr(readers, "WHOLE_JSON_BYTES", 4096)  # any array over this goes through ijson
    rows = _rows(500)
    data = json.dumps(rows, indent=1).encode()
    streamed = load_preferences(data, filename="x.json", options=IngestOptions(batch_rows=7))
    monkeypatch.setattr(readers, "WHOLE_JSON_BYTES", 64 * 1024**2)
    whole = load_preferences(data, filename="x.json")
    _same(streamed, whole)
    monkeypatch.setattr(readers, "WHOLE_JSON_BYTES", 4096)
    with pytest.raises(DataFormatError, match="invalid JSON after item 500"):
        load_preferences(data[:-1] + b", NaN]", filename="x.json")


def test_small_json_keeps_what_json_loads_accepts():
    data = json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b", "score": float("nan")}]).encode()
    assert b"NaN" in data
    assert load_preferences(data, filename="x.json").report.n_usable == 1


def test_csv_with_old_mac_line_endings():
    data = b"prompt,chosen,rejected\rq1,a,b\rq2,c,d\r"
    result = load_preferences(data, filename="x.csv")
    assert list(result.table["prompt"]) == ["q1", "q2"]


def test_line_numbers_count_leading_blank_lines():
    data = b"\n" * 70_000 + b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{broken\n'
    result = load_preferences(data, filename="x.jsonl")
    assert list(result.table["source_row"]) == [70_001]
    assert result.report.rows_with("malformed") == [70_002]


def test_garbage_lines_come_in_bounded_batches():
    reader = open_records(b"{broken\n" * 5000, "x.jsonl", "auto")
    sizes = [len(b.records) + len(b.malformed) for b in reader.batches(1000)]
    assert max(sizes) <= 1000 and sum(sizes) == 5000


def test_report_lists_a_bounded_number_of_issues_and_counts_all(monkeypatch):
    import dpo_engine.data.ingest as ingest

    monkeypatch.setattr(ingest, "MAX_LISTED_ISSUES", 10)
    lines = [json.dumps(r) for r in _rows(30)] + ["{broken"] * 40
    result = load_preferences("\n".join(lines).encode(), filename="x.jsonl", options=IngestOptions(batch_rows=8))
    report = result.report
    assert len(report.issues) == 10 and report.n_issues_unlisted == 30
    assert report.counts["malformed"] == 40 and report.n_unusable == 40
    kept, dropped = result.finalize()
    assert dropped == {"malformed": 40} and len(kept) == 30


# ---- the ingest job ----------------------------------------------------------------------------


class _Ctx:
    """What an executor needs of a job context, for calling it directly."""

    def __init__(self, workspace, run_dir, params):
        self.workspace, self.run_dir, self.params = workspace, run_dir, params

    def progress(self, fraction, message=""):
        pass


def test_ingest_job_only_touches_uploads_and_run_directories(workspace):
    from dpo_engine.data.job import run_ingest_job

    for params in (
        {"step": "validate", "upload": str(workspace.root / "jobs.db")},
        {"step": "validate", "upload": str(workspace.root / "uploads" / "x")},
        {"step": "store", "staged": str(workspace.root / "datasets"), "name": "n"},
        {"step": "store", "staged": str(workspace.runs_dir / "r" / "x"), "name": "n"},
    ):
        with pytest.raises(ValueError, match="must be a path"):
            run_ingest_job(_Ctx(workspace, workspace.runs_dir / "j", params))
    assert workspace.root.is_dir()


def test_store_step_run_again_finds_what_it_stored(workspace):
    from dpo_engine.data.job import run_ingest_job, upload_path

    upload = upload_path(workspace, "tok", "pairs.jsonl.gz")
    upload.parent.mkdir(parents=True)
    upload.write_bytes(HH_SAMPLE.read_bytes())
    run_dir = workspace.runs_dir / "validate-1"
    validated = run_ingest_job(_Ctx(workspace, run_dir, {"step": "validate", "upload": str(upload)}))
    assert validated["outcome"] == "validated"
    store = {"step": "store", "staged": str(run_dir), "upload": str(upload), "name": "hh", "drop": ["duplicate"]}
    # A worker that died after storing but before recording it: the second attempt recognises the dataset.
    staged = StagedIngest.open(run_dir / "staged")
    DatasetStore(workspace).add(staged, "hh", source="pairs.jsonl.gz", drop_flagged=["duplicate"])
    first = run_ingest_job(_Ctx(workspace, run_dir, store))
    again = run_ingest_job(_Ctx(workspace, run_dir, store))
    assert first == again and first["name"] == "hh"
    assert [i.name for i in DatasetStore(workspace).list()] == ["hh"]
    assert not upload.exists() and not (run_dir / "staged").exists()
