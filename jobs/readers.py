"""Streams a dataset's rows one at a time, never loading the file: JSONL, JSON arrays, CSV and Parquet.

Each row comes out numbered from 0 in file order, with the line it starts on (for Parquet and JSON
arrays: its position, from 1), as a dict or as an `InvalidRow` carrying the reason it cannot be read,
so one bad line fails one item and the rest of the job goes on.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import orjson

from promptmill.jobs.json_array import BrokenArray, array_items
from promptmill.jobs.spec import INPUT_FORMATS, InputFormat
from promptmill.pipelines.render import BODY_COLUMN

_SUFFIXES: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_BOM = b"\xef\xbb\xbf"

# The csv module refuses fields over 128 KiB by default; a row's size is bounded by max_row_bytes, as
# its lines are read (`_BoundedLines`), before the csv module sees them.
csv.field_size_limit(sys.maxsize)
_SKIP_READ = 1 << 16  # what an oversized line is skipped by, a read at a time


@dataclass(frozen=True)
class InvalidRow:
    reason: str


Row = dict[str, Any] | InvalidRow


def detect_format(path: Path) -> InputFormat:
    """By the file's name; a JSONL file whose first line is a batch request is an OpenAI batch file."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in _SUFFIXES:
            found = _SUFFIXES[suffix]
            if found == "jsonl" and path.is_file():
                first = next(_jsonl_rows(path, 0, limit=1 << 24), None)
                if first is not None and is_batch_line(first[1]):
                    return "openai-batch"
            return found
    raise ValueError(f"cannot tell the format of {path} from its name; pass --format {'|'.join(INPUT_FORMATS)}")


class _Hashing(io.RawIOBase):
    """The file's bytes, hashed as they stream past: every byte is read once, in order, skipped rows too."""

    def __init__(self, raw: IO[bytes], digest: Any):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open(path: Path, digest: Any = None) -> io.BufferedReader:
    raw = path.open("rb", buffering=0)
    return io.BufferedReader(_Hashing(raw, digest) if digest is not None else raw)  # type: ignore[arg-type]


def iter_rows(
    path: Path, input_format: InputFormat, skip: int = 0, max_row_bytes: int | None = None, digest: Any = None
) -> Iterator[tuple[int, int, Row]]:
    """(row number from 0, line, row); the first `skip` rows are passed over without being parsed.

    A row bigger than `max_row_bytes` (as read, or as JSON for Parquet) is an `InvalidRow`. A
    `hashlib` digest given is fed the whole file's bytes as the rows stream (once they all have).
    """
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows,
               "openai-batch": _batch_file_rows}  # fmt: skip
    limit = max_row_bytes or None
    rows = readers[input_format](path, skip, digest, limit)
    for row_number, (line, row, size) in enumerate(rows, start=skip):
        if row is None:  # longer than the limit as read: never held whole, and skipped to the next line
            row = InvalidRow(f"line {line}: the row is over PROMPTMILL_MAX_ROW_BYTES ({limit:,}); "
                             "read on from the next line")  # fmt: skip
        elif limit is not None and size > limit and not isinstance(row, InvalidRow):
            row = InvalidRow(f"line {line}: the row is {size:,} bytes, over PROMPTMILL_MAX_ROW_BYTES ({limit:,})")
        yield row_number, line, row


# (line, row, its size in bytes); row None: the row was longer than the limit and skipped unread.
_Read = Iterator[tuple[int, Row | None, int]]


def _jsonl_rows(path: Path, skip: int, digest: Any = None, limit: int | None = None) -> _Read:
    with _open(path, digest) as handle:
        yield from _jsonl_lines(handle, skip, limit)


def _batch_file_rows(path: Path, skip: int, digest: Any = None, limit: int | None = None) -> _Read:
    """An OpenAI batch file: each line's request as a row of its `custom_id` and its `body`."""
    for line, row, size in _jsonl_rows(path, skip, digest, limit):
        if isinstance(row, dict):
            row = {"custom_id": row.get("custom_id"), BODY_COLUMN: row.get("body")}
        yield line, row, size


def json_lines(path: Path, limit: int | None = None) -> _Read:
    """A JSONL file's lines as (line, object or InvalidRow, bytes); None for one over `limit`."""
    return _jsonl_rows(path, 0, None, limit)


def is_batch_line(row: Any) -> bool:
    """Does this JSON line look like an OpenAI batch file's request?"""
    return isinstance(row, dict) and {"custom_id", "body"} <= row.keys() and ("url" in row or "method" in row)


def _skip_rest_of_line(readline: Any, ends: tuple[Any, ...]) -> None:
    """Read past the rest of a line, a bounded read at a time (memory never holds the line)."""
    while True:
        part = readline(_SKIP_READ)
        if not part or part.endswith(ends):
            return


def _jsonl_lines(handle: IO[bytes], skip: int, limit: int | None = None) -> _Read:
    line_number = 0
    while True:
        # One byte over the limit tells a line too long; it is never read whole.
        line = handle.readline(-1 if limit is None else limit + 1)
        if not line:
            return
        line_number += 1
        too_long = limit is not None and len(line) > limit and not line.endswith(b"\n")
        if too_long:
            _skip_rest_of_line(handle.readline, (b"\n",))
        if line_number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue  # blank lines are not rows
        if skip:
            skip -= 1
            continue
        yield line_number, None if too_long else _json_object(line, line_number), len(line)


def _json_object(raw: bytes, line: int) -> Row:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidRow(f"line {line}: not valid UTF-8 ({bad.reason} at byte {bad.start})")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as bad:
        return InvalidRow(f"line {line}: not valid JSON ({bad})")
    if not isinstance(value, dict):
        return InvalidRow(f"line {line}: a JSON {type(value).__name__}, not an object")
    return value


def _json_rows(path: Path, skip: int, digest: Any = None, limit: int | None = None) -> _Read:
    """A `.json` file: an array of objects, streamed item by item; anything else is read as JSONL. An
    item over `limit` is passed over as it is read, never held whole."""
    with _open(path, digest) as handle:
        if _first_char(handle) != b"[":
            yield from _jsonl_lines(handle, skip, limit)
            return
        position = 0
        try:
            for position, raw in enumerate(array_items(handle, limit), start=1):
                if position <= skip:
                    continue
                if raw is None:
                    yield position, InvalidRow(f"item {position}: the item is over PROMPTMILL_MAX_ROW_BYTES ({limit:,}); "
                                               "read on from the next item"), 0  # fmt: skip
                    continue
                value = _json_object(raw, position)
                if isinstance(value, InvalidRow):
                    value = InvalidRow(value.reason.replace(f"line {position}:", f"item {position}:", 1))
                yield position, value, len(raw)
        except BrokenArray as bad:
            # The array is cut or broken from here on: one failed item says where, nothing after it.
            yield position + 1, InvalidRow(f"item {position + 1}: the JSON array is not valid from here ({bad})"), 0


def _first_char(handle: io.BufferedReader) -> bytes:
    start = handle.peek(4096)  # read nothing: the reader after this sees the whole file
    if start.startswith(_BOM):
        start = start[len(_BOM) :]
    return start.lstrip()[:1]


class _RecordTooLong(Exception):
    pass


class _BoundedLines:
    """A text's lines for the csv reader, each record's read with a length limit: a record longer than
    the limit (an unbalanced quote, a file with no line ends) raises `_RecordTooLong` once the rest of
    its line is skipped, and reading goes on from the next line. Counts the lines it reads."""

    def __init__(self, handle: IO[str], limit: int | None):
        self.handle, self.limit = handle, limit
        self.lines = 0  # physical lines read so far
        self.record = 0  # characters of the record being read

    def __iter__(self) -> "_BoundedLines":
        return self

    def __next__(self) -> str:
        room = -1 if self.limit is None else self.limit + 1 - self.record
        line = self.handle.readline(room)
        if not line:
            raise StopIteration
        self.lines += 1
        self.record += len(line)
        if self.limit is not None and self.record > self.limit:
            if not line.endswith(("\n", "\r")):
                _skip_rest_of_line(self.handle.readline, ("\n", "\r"))
            raise _RecordTooLong()
        return line


def _csv_rows(path: Path, skip: int, digest: Any = None, limit: int | None = None) -> _Read:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is caught below
    # instead of the decoder stopping the whole file.
    binary = _open(path, digest)
    with io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        lines = _BoundedLines(handle, limit)
        reader = csv.reader(lines)
        header: list[str] | None = None
        while True:
            line = lines.lines + 1  # where the next record starts
            lines.record = 0
            try:
                record = next(reader)
            except StopIteration:
                return
            except _RecordTooLong:
                reader = csv.reader(lines)  # the old one is mid-field: read on from the next line
                if header is None:
                    yield line, InvalidRow(f"line {line}: the header is over PROMPTMILL_MAX_ROW_BYTES ({limit:,})"), 0
                    return
                if skip:
                    skip -= 1
                else:
                    yield line, None, 0
                continue
            if header is None:
                header = record
                continue
            if not record:
                continue
            if skip:
                skip -= 1
                continue
            where = f"line {line}"
            if len(record) != len(header):
                yield line, InvalidRow(f"{where}: {len(record)} fields where the header has {len(header)}"), 0
                continue
            if any(_has_surrogates(value) for value in record):
                yield line, InvalidRow(f"{where}: not valid UTF-8"), 0
                continue
            yield line, dict(zip(header, record)), sum(len(value.encode()) for value in record)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_rows(path: Path, skip: int, digest: Any = None, limit: int | None = None) -> _Read:
    import pyarrow.parquet as pq

    if digest is not None:  # pyarrow reads by offsets, not in order: hash the file as a stream of its own
        with _open(path, digest) as handle:
            while handle.read(1 << 20):
                pass
    parquet = pq.ParquetFile(path)
    position = 0
    for batch in parquet.iter_batches(batch_size=1024):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            position += batch.num_rows
            continue
        position += skip
        for row in batch.slice(skip).to_pylist():
            position += 1
            yield position, row, len(orjson.dumps(row, default=str))
        skip = 0


def input_columns(path: Path, input_format: InputFormat, sample_rows: int = 100) -> tuple[list[str], str] | None:
    """The columns the input has, as far as its start tells, and where they were read from: the header
    (CSV), the schema (Parquet), or the first rows' keys (JSONL, JSON arrays). None: no row to tell by."""
    if input_format == "csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            try:
                header = next(csv.reader(_BoundedLines(handle, 1 << 20)), None)
            except _RecordTooLong:
                return None  # the reader fails that row itself
        return (header, "its header") if header else None
    if input_format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names, "its schema"
    names: dict[str, None] = {}
    seen = 0
    for _, _, row in iter_rows(path, input_format, max_row_bytes=1 << 24):
        if isinstance(row, dict):
            names.update(dict.fromkeys(map(str, row)))
            seen += 1
            if seen == sample_rows:
                break
    return (list(names), f"its first {seen:,} rows") if seen else None


__all__ = ["INPUT_FORMATS", "InvalidRow", "InputFormat", "Row", "detect_format", "input_columns", "is_batch_line", "iter_rows", "json_lines"]
