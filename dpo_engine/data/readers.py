"""Reading an upload into batches of records, with memory bounded by a row and a batch, not the file.

Gzip is undone incrementally under a cap on the decompressed size and on the compression ratio,
so a small file that inflates to gigabytes is refused after a few megabytes of work. The format
is sniffed from the first bytes before anything large is decoded. JSON Lines and CSV are read
line by line, a JSON array item by item, Parquet row group by row group; only a JSON document
that keeps its rows under a key (``{"data": [...]}``) is parsed whole, within the cap.

Records are dicts of raw values with the 1-based row number of each; rows that cannot be
parsed at all come back as issues. Interpreting the values (layouts, types) happens later.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dpo_engine.data.errors import DataFormatError
from dpo_engine.data.report import IngestOptions, Issue

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
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
# Bytes looked at to sniff the format and reject binary input before parsing.
SNIFF_BYTES = 65536
# A JSON document up to this size is parsed whole, exactly as `json.loads` does; a larger array
# is parsed item by item.
WHOLE_JSON_BYTES = 64 * 1024**2
# The compression ratio is judged only once this much was inflated: tiny files compress wildly.
_RATIO_GRACE_BYTES = 16 * 1024**2
_READ_CHUNK = 1 << 20


@dataclass
class RecordBatch:
    """Consecutive records of the input and the rows among them that could not be parsed."""

    records: list[dict[str, Any]]
    rows: list[int]
    malformed: list[Issue] = field(default_factory=list)


# ---- bytes in ------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts the compressed bytes gzip consumes (for the ratio check and progress)."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n


class _BoundedGzip(io.RawIOBase):
    """Inflates gzip incrementally and refuses output beyond the size or ratio limits."""

    def __init__(self, raw: IO[bytes], options: IngestOptions):
        self._compressed = _CountingReader(raw)
        self._gzip = gzip.GzipFile(fileobj=self._compressed, mode="rb")
        self._max_bytes = options.max_decompressed_mb * 1024**2
        self._max_ratio = options.max_compression_ratio
        self.inflated = 0

    def readable(self) -> bool:
        return True

    @property
    def compressed_read(self) -> int:
        return self._compressed.count

    def readinto(self, buffer) -> int:
        try:
            n = self._gzip.readinto(buffer)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"corrupt or truncated gzip data: {exc}") from exc
        self.inflated += n
        if self.inflated > self._max_bytes:
            raise DataFormatError(
                f"the file inflates to more than {self._max_bytes // 1024**2} MB "
                "(limit: max_decompressed_mb; JSONL without gzip has no such limit)"
            )
        if self.inflated > _RATIO_GRACE_BYTES and self.inflated > self._max_ratio * max(self.compressed_read, 1):
            raise DataFormatError(
                f"the file inflates more than {self._max_ratio:g}x (limit: max_compression_ratio); "
                "it looks like a decompression bomb"
            )
        return n


class _Prefixed(io.RawIOBase):
    """A stream that first gives back bytes already read from it (the sniffed head)."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass
class _Opened:
    stream: IO[bytes]  # the (decompressed) content, from its first byte
    head: bytes  # its first bytes, leading whitespace included
    name: str | None  # name hint without ".gz"
    path: Path | None  # the file on disk when it is read uncompressed from there
    total_bytes: int  # size of the input as given (compressed size for gzip)
    position: Any  # callable: input bytes consumed so far
    closers: list[Any]
    skipped_lines: int = 0  # line breaks in leading whitespace skipped before `head`


def _open_input(source: str | Path | bytes, filename: str | None, options: IngestOptions) -> _Opened:
    """Open the input, undo gzip under the limits and read its head for sniffing."""
    closers: list[Any] = []
    path: Path | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw: IO[bytes] = io.BytesIO(bytes(source))
        total = len(raw.getbuffer())
        name = filename
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if not path.exists():
                raise DataFormatError(f"file not found: {path}")
            if not path.is_file():
                raise DataFormatError(f"not a file: {path}")
            raw = open(path, "rb")  # noqa: SIM115 - closed by the reader when it is done
            total = path.stat().st_size
        except ValueError as exc:  # e.g. a NUL character in the path
            raise DataFormatError(f"invalid path {str(path)!r}: {exc}") from exc
        except OSError as exc:
            raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
        name = filename or path.name
    else:
        raise DataFormatError(f"unsupported source type {type(source).__name__}; give a path or bytes")
    closers.append(raw)
    if name and name.lower().endswith(".gz"):
        name = name[:-3]
    magic = raw.read(2)
    raw.seek(0)
    stream: IO[bytes] = raw
    position = raw.tell
    if magic == GZIP_MAGIC:
        inflater = _BoundedGzip(raw, options)
        stream = io.BufferedReader(inflater, buffer_size=_READ_CHUNK)
        position = lambda: inflater.compressed_read  # noqa: E731
        path = None
    # Skip leading whitespace chunk by chunk, so a file of blanks is "empty" without holding it.
    head = stream.read(SNIFF_BYTES)
    skipped = 0
    while head and not head.strip() and len(head) >= SNIFF_BYTES:
        more = stream.read(SNIFF_BYTES)
        if not more:
            break
        skipped += head.count(b"\n")
        head = more
    return _Opened(stream, head, name, path, total, position, closers, skipped)


def format_from_name(name: str | None) -> str | None:
    if not name:
        return None
    return _EXTENSIONS.get(Path(name).suffix.lower())


def _check_text(head: bytes) -> None:
    """Binary garbage raises here rather than turning into thousands of nonsense rows."""
    if head[:2] in UTF16_BOMS:
        sample = head.decode("utf-16", errors="replace")
    else:
        sample = head.decode("utf-8-sig", errors="replace")
    if sample:
        suspicious = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f"))
        if suspicious / len(sample) > _BINARY_SHARE:
            raise DataFormatError("the file looks binary, not JSON/JSONL/CSV text or Parquet")


# ---- lines ---------------------------------------------------------------------------------

# What `_Lines` gives back for a line over the row limit (a NUL cannot start a decoded text line
# that the parsers would accept, so it cannot be mistaken for data).
TOO_LONG = "\x00TOO_LONG"
# Splits after a carriage return that is not followed by a line feed (old spreadsheet line ends).
_LONE_CR = re.compile(r"(?<=\r)(?!\n)(?=.)", re.DOTALL)


class _Lines:
    """Decoded lines (line endings kept) of a text stream, one at a time, each bounded in size.

    UTF-16 with a byte-order mark is honoured; everything else is read as UTF-8 (BOM stripped),
    invalid bytes replaced and remembered in `had_decode_errors`. JSON Lines end at "\\n" only
    (U+2028 and a lone "\\r" may sit inside a JSON string); CSV (`any_newline`) also ends lines at
    a lone "\\r", as old spreadsheet exports do.
    """

    def __init__(self, stream: IO[bytes], max_row_bytes: int, *, first_lineno: int = 0, any_newline: bool = False):
        self.max_row_bytes = max_row_bytes
        self.had_decode_errors = False
        self.lineno = first_lineno
        self._first = True
        self._any_newline = any_newline
        first = stream.read(2)
        stream = io.BufferedReader(_Prefixed(first, stream), buffer_size=_READ_CHUNK)
        self.utf16 = first in UTF16_BOMS
        # UTF-16 is decoded by the io layer (strict; newline="" also ends lines at a lone "\r")
        self._text = io.TextIOWrapper(stream, encoding="utf-16", newline="") if self.utf16 else None
        self._bytes = stream
        self._carry: list[str] = []  # the rest of a UTF-8 line split at lone "\r"s (CSV)
        self._pending: list[tuple[int, str]] = []

    def _read_line(self) -> str | None:
        limit = self.max_row_bytes + 1
        if self._carry:
            return self._carry.pop(0)
        if self._text is not None:
            try:
                line = self._text.readline(limit)
                if not self._any_newline:  # JSON Lines end at "\n" only
                    while (
                        line.endswith("\r") and len(line) < limit and (more := self._text.readline(limit - len(line)))
                    ):
                        line += more
                if len(line) >= limit and not line.endswith(("\n", "\r")):
                    while (rest := self._text.readline(_READ_CHUNK)) and not rest.endswith(("\n", "\r")):
                        pass
                    return TOO_LONG
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"invalid UTF-16 text: {exc.reason}") from None
            return line or None
        raw = self._bytes.readline(limit)
        if not raw:
            return None
        if len(raw) >= limit and not raw.endswith(b"\n"):
            while (rest := self._bytes.readline(_READ_CHUNK)) and not rest.endswith(b"\n"):
                pass
            return TOO_LONG
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            self.had_decode_errors = True
        if self._first and line.startswith("\ufeff"):
            line = line[1:]
        self._first = False
        if self._any_newline and "\r" in line.rstrip("\r\n"):
            first, *self._carry = _LONE_CR.split(line)
            return first
        return line

    def next(self) -> tuple[int, str] | None:
        """(line number, text) of the next line, or None at the end; over-long lines come back as
        TOO_LONG so that the caller can report them with their number."""
        if self._pending:
            return self._pending.pop(0)
        line = self._read_line()
        if line is None:
            return None
        self.lineno += 1
        return self.lineno, line

    def push_back(self, item: tuple[int, str]) -> None:
        """Make `item` the next line again (the last pushed comes first)."""
        self._pending.insert(0, item)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while (item := self.next()) is not None:
            yield item

    def too_long(self, lineno: int) -> Issue:
        return _malformed(lineno, f"longer than {self.max_row_bytes // 1024**2} MB (limit: max_row_mb)")


def sniff_text_format(first_line: str, rest_nonblank: bool, hint: str | None) -> str:
    """Choose json / jsonl / csv from the first non-blank line, trusting the extension when it fits.

    For a first line too long to look at, its first character stands for it: then that and the
    name decide (a "{" line too long for a row is taken as one JSON document)."""
    stripped = first_line.strip()
    first = stripped[:1]
    if hint == "csv":
        return "csv"
    if first == "[":
        return "json"
    if first == "{":
        try:
            doc = json.loads(stripped)
            is_object_line = isinstance(doc, dict)
        except (ValueError, RecursionError):
            doc, is_object_line = None, False
        if is_object_line and hint != "jsonl" and not rest_nonblank and _is_row_container(doc):
            return "json"  # one object holding the rows, e.g. {"data": [...]} on a single line
        if hint == "jsonl" or (is_object_line and hint != "json"):
            return "jsonl"
        if hint == "json" and is_object_line and rest_nonblank:
            return "jsonl"  # a .json file whose first line is a whole object and that goes on
        return "json"
    if hint in ("json", "jsonl"):
        return hint
    return "csv"


def _is_row_container(doc: Any) -> bool:
    if not isinstance(doc, dict):
        return False
    try:
        _, where = _json_rows(doc)
    except DataFormatError:
        return False
    return where is not None


# ---- the reader ----------------------------------------------------------------------------


class RecordReader:
    """Batches of records from one input; open with `open_records`, iterate with `batches`.

    `columns` are known from the first batch on (the union of the keys seen so far for JSON;
    the header for CSV; the schema for Parquet); `had_decode_errors` grows as lines are read.
    """

    def __init__(self, opened: _Opened, fmt: str, options: IngestOptions):
        self._opened = opened
        self.format = fmt
        self.options = options
        self.warnings: list[str] = []
        self._columns: dict[str, None] = {}
        self._content: IO[bytes] = opened.stream  # the text from its first byte (sniffed head included)
        self._lines: _Lines | None = None
        self._decode_errors = False
        self._closed = False
        self._batch_rows = 1000

    # -- what the caller reads
    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def had_decode_errors(self) -> bool:
        return self._decode_errors or (self._lines is not None and self._lines.had_decode_errors)

    def _open_lines(self, any_newline: bool) -> _Lines:
        max_row = self.options.max_row_mb * 1024**2
        first = self._opened.skipped_lines
        self._lines = _Lines(self._content, max_row, first_lineno=first, any_newline=any_newline)
        return self._lines

    @property
    def progress(self) -> float:
        """Share of the input consumed, in [0, 1]."""
        total = self._opened.total_bytes
        if self._closed or not total:
            return 1.0
        return min(1.0, self._opened.position() / total)

    def batches(self, size: int) -> Iterator[RecordBatch]:
        reader = {"jsonl": self._jsonl, "json": self._json, "csv": self._csv, "parquet": self._parquet}[self.format]
        self._batch_rows = size
        try:
            yield from _regroup(reader(), size)
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        for closer in self._opened.closers:
            try:
                closer.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # -- formats
    def _note_columns(self, record: dict[str, Any]) -> None:
        for key in record:
            if key not in self._columns:
                self._columns[key] = None

    def _jsonl(self) -> Iterator[RecordBatch]:
        lines = self._open_lines(any_newline=False)
        batch = RecordBatch([], [])
        for lineno, line in lines:
            if len(batch.records) + len(batch.malformed) >= self._batch_rows:
                yield batch
                batch = RecordBatch([], [])
            if line == TOO_LONG:
                batch.malformed.append(lines.too_long(lineno))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                batch.malformed.append(_malformed(lineno, "not valid JSON: nested too deeply"))
                continue
            except ValueError as exc:
                batch.malformed.append(_malformed(lineno, f"not valid JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                batch.malformed.append(_not_an_object(lineno, value))
                continue
            self._note_columns(value)
            batch.records.append(value)
            batch.rows.append(lineno)
        yield batch

    def _json(self) -> Iterator[RecordBatch]:
        """A JSON document: parsed whole when small (exactly as `json.loads`), else a top-level
        array item by item; a large document that keeps its rows under a key is parsed whole
        within `max_decompressed_mb`."""
        stream = self._content
        buffer = stream.read(WHOLE_JSON_BYTES + 1)
        utf16 = buffer[:2] in UTF16_BOMS
        starts_array = buffer.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["
        if len(buffer) > WHOLE_JSON_BYTES and starts_array and not utf16:
            yield from self._json_array(io.BufferedReader(_Prefixed(buffer, stream), buffer_size=_READ_CHUNK))
            return
        cap = self.options.max_decompressed_mb * 1024**2
        parts = [buffer]
        size = len(buffer)
        while chunk := stream.read(_READ_CHUNK):
            size += len(chunk)
            if size > cap:
                raise DataFormatError(
                    f"a JSON document over {self.options.max_decompressed_mb} MB that is not a plain array "
                    "(limit: max_decompressed_mb); store large files as JSON Lines"
                )
            parts.append(chunk)
        data = b"".join(parts)
        del parts, buffer
        if utf16:
            try:
                text = data.decode("utf-16")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"invalid UTF-16 text: {exc.reason}") from exc
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = data.decode("utf-8-sig", errors="replace")
                self._decode_errors = True
        del data
        try:
            doc = json.loads(text)
        except RecursionError as exc:
            raise DataFormatError("invalid JSON: nested too deeply") from exc
        except json.JSONDecodeError as exc:
            line = exc.lineno + self._opened.skipped_lines
            raise DataFormatError(f"invalid JSON at line {line} column {exc.colno}: {exc.msg}") from exc
        del text
        items, where = _json_rows(doc)
        if where:
            self.warnings.append(f"rows read from the {where!r} key of the JSON document")
        batch = RecordBatch([], [])
        for index, value in enumerate(items, start=1):
            self._add_item(batch, index, value)
            if len(batch.records) + len(batch.malformed) >= self._batch_rows:
                yield batch
                batch = RecordBatch([], [])
        yield batch

    def _json_array(self, stream: IO[bytes]) -> Iterator[RecordBatch]:
        """The items of a large top-level JSON array, parsed incrementally (strict JSON)."""
        import ijson

        if stream.peek(3)[:3] == b"\xef\xbb\xbf":
            stream.read(3)
        batch = RecordBatch([], [])
        index = 0
        try:
            for index, value in enumerate(ijson.items(stream, "item", use_float=True), start=1):
                self._add_item(batch, index, value)
                if len(batch.records) + len(batch.malformed) >= self._batch_rows:
                    yield batch
                    batch = RecordBatch([], [])
        except ijson.JSONError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataFormatError(
                f"invalid JSON after item {index}: {reason} (a JSON array over {WHOLE_JSON_BYTES // 1024**2} MB "
                "is read item by item, which needs strict JSON: no NaN or Infinity, integers within 64 bits)"
            ) from None
        except RecursionError as exc:
            raise DataFormatError("invalid JSON: nested too deeply") from exc
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"invalid UTF-8 in a JSON array after item {index}: {exc.reason}") from None
        yield batch

    def _add_item(self, batch: RecordBatch, index: int, value: Any) -> None:
        if isinstance(value, dict):
            self._note_columns(value)
            batch.records.append(value)
            batch.rows.append(index)
        else:
            batch.malformed.append(_not_an_object(index, value))

    def _csv(self) -> Iterator[RecordBatch]:
        lines = self._open_lines(any_newline=True)
        # Long texts are the point of this data; lift the csv module's 128 KiB field cap.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        first = lines.next()
        while first is not None and not first[1].strip():
            first = lines.next()
        if first is None:
            raise DataFormatError("the CSV file has no header row")
        lines.push_back(first)
        try:
            sample = first[1] if first[1] != TOO_LONG else ""
            dialect: Any = csv.Sniffer().sniff(sample.rstrip("\r\n") or sample, delimiters=",\t;|")
            delimiter = dialect.delimiter
        except csv.Error:
            delimiter = ","

        def text_lines() -> Iterator[str]:
            for lineno, line in lines:
                if line == TOO_LONG:
                    raise DataFormatError(f"CSV line {lineno} is {lines.too_long(lineno).message}")
                yield line

        reader = csv.reader(text_lines(), delimiter=delimiter, quotechar='"', doublequote=True)
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
        for h in header:
            self._columns[h] = None
        if delimiter != ",":
            self.warnings.append(f"CSV delimiter detected as {delimiter!r}")
        batch = RecordBatch([], [])
        row_no = 0
        while True:
            if len(batch.records) + len(batch.malformed) >= self._batch_rows:
                yield batch
                batch = RecordBatch([], [])
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                row_no += 1
                batch.malformed.append(_malformed(row_no, f"unreadable CSV record: {exc}"))
                break  # the reader cannot resynchronise after a broken record
            if not fields or (len(fields) == 1 and not fields[0].strip() and len(header) > 1):
                continue  # blank line
            row_no += 1
            if len(fields) != len(header):
                batch.malformed.append(_malformed(row_no, f"{len(fields)} fields where the header has {len(header)}"))
                continue
            batch.records.append(dict(zip(header, fields)))
            batch.rows.append(row_no)
        yield batch

    def _parquet(self) -> Iterator[RecordBatch]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        opened = self._opened
        spool = None
        try:
            if opened.path is not None:
                target: Any = str(opened.path)
            else:  # gzip or bytes: Parquet needs a seekable file; spool the content to disk
                spool = tempfile.TemporaryFile()
                spool.write(opened.head)
                while chunk := opened.stream.read(_READ_CHUNK):
                    spool.write(chunk)
                spool.seek(0)
                target = spool
            try:
                parquet = pq.ParquetFile(target)
                for name in parquet.schema_arrow.names:
                    self._columns[name] = None
                row = 0
                for record_batch in parquet.iter_batches(batch_size=self._batch_rows):
                    records = pa.Table.from_batches([record_batch]).to_pylist()
                    yield RecordBatch(records, list(range(row + 1, row + len(records) + 1)))
                    row += len(records)
            except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
                raise DataFormatError(f"unreadable Parquet file: {exc}") from exc
        finally:
            if spool is not None:
                spool.close()


def _regroup(batches: Iterator[RecordBatch], size: int) -> Iterator[RecordBatch]:
    """Batches of about `size` records (the last may be smaller; malformed rows ride along)."""
    out = RecordBatch([], [])
    for batch in batches:
        out.records.extend(batch.records)
        out.rows.extend(batch.rows)
        out.malformed.extend(batch.malformed)
        if len(out.records) + len(out.malformed) >= size:
            yield out
            out = RecordBatch([], [])
    if out.records or out.malformed:
        yield out


def open_records(
    source: str | Path | bytes, filename: str | None, fmt: str, options: IngestOptions = IngestOptions()
) -> RecordReader:
    """Open `source` (a path or bytes; maybe gzipped) as `fmt` ('auto' detects from content and name)."""
    if fmt not in ("auto", "json", "jsonl", "csv", "parquet"):
        raise DataFormatError(f"unknown format {fmt!r}; use auto, jsonl, json, csv or parquet")
    opened = _open_input(source, filename, options)
    try:
        return _sniffed_reader(opened, fmt, options)
    except BaseException:
        for closer in opened.closers:
            closer.close()
        raise


def _sniffed_reader(opened: _Opened, fmt: str, options: IngestOptions) -> RecordReader:
    if not opened.head.strip():
        raise DataFormatError("the file is empty")
    hint = format_from_name(opened.name)
    if fmt == "auto":
        if opened.head[:4] == PARQUET_MAGIC:
            fmt = "parquet"
        elif hint == "parquet":
            raise DataFormatError(f"{opened.name} does not start like a Parquet file")
    if fmt == "parquet":
        opened.stream = io.BufferedReader(_Prefixed(opened.head, opened.stream), buffer_size=_READ_CHUNK)
        opened.head = b""
        return RecordReader(opened, "parquet", options)
    _check_text(opened.head)
    prefix = bytearray(opened.head)
    if fmt == "auto":
        fmt = _sniff(prefix, opened, hint, options.max_row_mb * 1024**2)
    opened.stream = io.BufferedReader(_Prefixed(bytes(prefix), opened.stream), buffer_size=_READ_CHUNK)
    opened.head = b""
    return RecordReader(opened, fmt, options)


def _sniff(prefix: bytearray, opened: _Opened, hint: str | None, max_row_bytes: int) -> str:
    """json / jsonl / csv from the first non-blank line and whether anything follows it.

    Reads on into `prefix` (from `opened.stream`) until the first line is complete, at most a
    row's limit, and past blank lines to see whether more follows."""
    if prefix[:2] in UTF16_BOMS:  # rare: sniff from the decoded head alone
        text = bytes(prefix).decode("utf-16", errors="replace").lstrip()
        first, _, rest = text.partition("\n")
        return sniff_text_format(first, bool(rest.strip()) or len(prefix) >= SNIFF_BYTES, hint)
    eof = len(prefix) < SNIFF_BYTES
    start = len(prefix) - len(prefix.lstrip())
    while (newline := prefix.find(b"\n", start)) < 0 and not eof and len(prefix) - start <= max_row_bytes:
        chunk = opened.stream.read(_READ_CHUNK)
        eof = not chunk
        prefix += chunk
    if newline < 0 and not eof:
        return sniff_text_format(chr(prefix[start]), True, hint)  # a first line over the row limit: its start decides
    end = newline if newline >= 0 else len(prefix)
    first = bytes(prefix[start:end]).decode("utf-8-sig", errors="replace")
    after = newline + 1 if newline >= 0 else len(prefix)
    while not prefix[after:].strip() and not eof and len(prefix) - after <= max_row_bytes:
        chunk = opened.stream.read(SNIFF_BYTES)
        eof = not chunk
        prefix += chunk
    rest_nonblank = bool(prefix[after:].strip()) or not eof
    return sniff_text_format(first, rest_nonblank, hint)


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


def _not_an_object(row: int, value: Any) -> Issue:
    return _malformed(row, f"a JSON {type(value).__name__} where an object was expected")


def _malformed(row: int, message: str) -> Issue:
    return Issue(row=row, reason="malformed", column=None, message=message, unusable=True)
