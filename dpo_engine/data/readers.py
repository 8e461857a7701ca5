"""Reading raw bytes into records: gzip, format detection, text decoding, per-row parse errors.

The result is a list of records (dicts of raw values) plus the 1-based row number of each and
the rows that could not be parsed at all. Interpreting the values (layouts, types) happens later.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_engine.data.errors import DataFormatError
from dpo_engine.data.report import Issue

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Keys under which {"data": [...]}-style JSON documents keep their rows, in order of preference.
_JSON_ROW_KEYS = ("data", "rows", "records", "examples", "items", "train")
# A sample with more than this share of undecodable bytes or control characters is not text.
_BINARY_SHARE = 0.10


@dataclass
class RawRecords:
    """Parsed but uninterpreted rows."""

    format: str
    records: list[dict[str, Any]]
    rows: list[int]
    columns: list[str]
    malformed: list[Issue] = field(default_factory=list)
    had_decode_errors: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows_in(self) -> int:
        return len(self.records) + len(self.malformed)


def read_source(source: str | Path | bytes, filename: str | None) -> tuple[bytes, str | None]:
    """Bytes of the input and the name used for extension hints."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), filename
    if not isinstance(source, (str, Path)):
        raise DataFormatError(f"unsupported source type {type(source).__name__}; give a path or bytes")
    path = Path(source)
    try:
        if not path.exists():
            raise DataFormatError(f"file not found: {path}")
        if not path.is_file():
            raise DataFormatError(f"not a file: {path}")
        data = path.read_bytes()
    except ValueError as exc:  # e.g. a NUL character in the path
        raise DataFormatError(f"invalid path {str(path)!r}: {exc}") from exc
    except OSError as exc:
        raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return data, filename or path.name


def decompress(data: bytes, filename: str | None) -> tuple[bytes, str | None]:
    """Undo gzip (by magic bytes, whatever the name says); drop '.gz' from the name hint."""
    name = filename
    if name and name.lower().endswith(".gz"):
        name = name[:-3]
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"corrupt or truncated gzip data: {exc}") from exc
    return data, name


def format_from_name(name: str | None) -> str | None:
    if not name:
        return None
    return _EXTENSIONS.get(Path(name).suffix.lower())


def decode_text(data: bytes) -> tuple[str, bool]:
    """Text of the input and whether invalid UTF-8 had to be replaced.

    UTF-16 with a byte-order mark is honoured; everything else is read as UTF-8 (BOM stripped).
    Binary garbage raises rather than turning into thousands of nonsense rows.
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16"), False
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"invalid UTF-16 text: {exc.reason}") from exc
    try:
        text, bad = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, bad = data.decode("utf-8-sig", errors="replace"), True
    sample = text[:65536]
    if sample:
        suspicious = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f"))
        if suspicious / len(sample) > _BINARY_SHARE:
            raise DataFormatError("the file looks binary, not JSON/JSONL/CSV text or Parquet")
    return text, bad


def sniff_text_format(text: str, hint: str | None) -> str:
    """Choose json / jsonl / csv for text content, trusting the extension when it fits."""
    stripped = text.lstrip()
    first = stripped[:1]
    if hint == "csv":
        return "csv"
    if first == "[":
        return "json"
    if first == "{":
        first_line = stripped.split("\n", 1)[0].strip()
        try:
            is_object_line = isinstance(json.loads(first_line), dict)
        except ValueError:
            is_object_line = False
        if is_object_line and hint != "jsonl" and _is_row_container(stripped):
            return "json"  # one object holding the rows, e.g. {"data": [...]} on a single line
        if hint == "jsonl" or (is_object_line and hint != "json"):
            return "jsonl"
        if hint == "json" and is_object_line and "\n" in stripped.rstrip():
            # A .json file whose first line is a whole object and that goes on: JSON Lines.
            try:
                json.loads(stripped)
            except ValueError:
                return "jsonl"
        return "json"
    if hint in ("json", "jsonl"):
        return hint
    return "csv"


def _is_row_container(text: str) -> bool:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    try:
        rows, where = _json_rows(doc)
    except DataFormatError:
        return False
    return where is not None


def read_records(data: bytes, filename: str | None, fmt: str) -> RawRecords:
    """Parse bytes (maybe gzipped) as `fmt` ('auto' detects from content and extension)."""
    data, name = decompress(data, filename)
    if not data.strip():
        raise DataFormatError("the file is empty")
    hint = format_from_name(name)
    if fmt == "auto":
        if data[:4] == PARQUET_MAGIC:
            fmt = "parquet"
        elif hint == "parquet":
            raise DataFormatError(f"{name} does not start like a Parquet file")
    if fmt == "parquet":
        return _read_parquet(data)
    if fmt not in ("auto", "json", "jsonl", "csv"):
        raise DataFormatError(f"unknown format {fmt!r}; use auto, jsonl, json, csv or parquet")
    text, bad = decode_text(data)
    if not text.strip():
        raise DataFormatError("the file is empty")
    if fmt == "auto":
        fmt = sniff_text_format(text, hint)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[fmt]
    raw = reader(text)
    raw.had_decode_errors = bad
    if bad:
        raw.warnings.append("the file is not valid UTF-8; undecodable bytes were replaced and their rows flagged")
    return raw


def _columns_of(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        for key in rec:
            seen.setdefault(key, None)
    return list(seen)


def _read_jsonl(text: str) -> RawRecords:
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    malformed: list[Issue] = []
    # Split on '\n' only: str.splitlines would also break at U+2028 etc., legal inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            malformed.append(_malformed(lineno, f"not valid JSON: {exc}"))
            continue
        if not isinstance(value, dict):
            malformed.append(_malformed(lineno, f"a JSON {type(value).__name__} where an object was expected"))
            continue
        records.append(value)
        rows.append(lineno)
    return RawRecords("jsonl", records, rows, _columns_of(records), malformed)


def _read_json(text: str) -> RawRecords:
    try:
        doc = json.loads(text)
    except RecursionError as exc:
        raise DataFormatError("invalid JSON: nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    items, where = _json_rows(doc)
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    malformed: list[Issue] = []
    for index, item in enumerate(items, start=1):
        if isinstance(item, dict):
            records.append(item)
            rows.append(index)
        else:
            malformed.append(_malformed(index, f"a JSON {type(item).__name__} where an object was expected"))
    raw = RawRecords("json", records, rows, _columns_of(records), malformed)
    if where:
        raw.warnings.append(f"rows read from the {where!r} key of the JSON document")
    return raw


def _json_rows(doc: Any) -> tuple[list[Any], str | None]:
    """The list of row objects inside a JSON document, and the key it came from."""
    if isinstance(doc, list):
        return doc, None
    if not isinstance(doc, dict):
        raise DataFormatError(f"a JSON {type(doc).__name__} at the top level; expected an array of objects")
    if "chosen" in doc and "rejected" in doc and not isinstance(doc.get("chosen"), list):
        return [doc], None
    for key in _JSON_ROW_KEYS:
        if isinstance(doc.get(key), list):
            return doc[key], key
    lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(lists) == 1:
        return doc[lists[0]], lists[0]
    keys = ", ".join(map(str, list(doc)[:10])) or "none"
    raise DataFormatError(
        f"a JSON object without a list of rows (top-level keys: {keys}); "
        f'expected an array of objects or {{"data": [...]}}'
    )


def _read_csv(text: str) -> RawRecords:
    # Long texts are the point of this data; lift the csv module's 128 KiB field cap.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    sample = text[:65536]
    try:
        dialect: Any = csv.Sniffer().sniff(sample.split("\n", 1)[0] or sample, delimiters=",\t;|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', doublequote=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataFormatError(f"unreadable CSV header: {exc}") from exc
    if not header or not any(h.strip() for h in header):
        raise DataFormatError("the CSV file has no header row")
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataFormatError(f"the CSV header repeats column names: {', '.join(dupes)}")
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    malformed: list[Issue] = []
    row_no = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            row_no += 1
            malformed.append(_malformed(row_no, f"unreadable CSV record: {exc}"))
            break  # the reader cannot resynchronise after a broken record
        if not fields or (len(fields) == 1 and not fields[0].strip() and len(header) > 1):
            continue  # blank line
        row_no += 1
        if len(fields) != len(header):
            malformed.append(_malformed(row_no, f"{len(fields)} fields where the header has {len(header)}"))
            continue
        records.append(dict(zip(header, fields)))
        rows.append(row_no)
    raw = RawRecords("csv", records, rows, header, malformed)
    if delimiter != ",":
        raw.warnings.append(f"CSV delimiter detected as {delimiter!r}")
    return raw


def _read_parquet(data: bytes) -> RawRecords:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
        records = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataFormatError(f"unreadable Parquet file: {exc}") from exc
    return RawRecords("parquet", records, list(range(1, len(records) + 1)), list(table.column_names))


def _malformed(row: int, message: str) -> Issue:
    return Issue(row=row, reason="malformed", column=None, message=message, unusable=True)
