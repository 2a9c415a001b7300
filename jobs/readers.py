"""Streams a dataset's rows one at a time, never loading the file: JSONL, CSV and Parquet.

Each row comes out numbered from 0 in file order, as a dict or as an `InvalidRow` carrying the reason
it cannot be read, so one bad line fails one item and the rest of the job goes on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import orjson

InputFormat = Literal["jsonl", "csv", "parquet"]
_SUFFIXES: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class InvalidRow:
    reason: str


Row = dict[str, Any] | InvalidRow


def detect_format(path: Path) -> InputFormat:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
    raise ValueError(f"cannot tell the format of {path} from its name; pass --format jsonl|csv|parquet")


def iter_rows(path: Path, input_format: InputFormat, skip: int = 0) -> Iterator[tuple[int, Row]]:
    """Rows numbered from 0; the first `skip` rows are passed over without being parsed."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    yield from enumerate(readers[input_format](path, skip), start=skip)


def _jsonl_rows(path: Path, skip: int) -> Iterator[Row]:
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            if skip:
                skip -= 1
                continue
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                yield InvalidRow(f"line {line_number}: not valid UTF-8 ({bad.reason} at byte {bad.start})")
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as bad:
                yield InvalidRow(f"line {line_number}: not valid JSON ({bad})")
                continue
            if not isinstance(value, dict):
                yield InvalidRow(f"line {line_number}: a JSON {type(value).__name__}, not an object")
                continue
            yield value


def _csv_rows(path: Path, skip: int) -> Iterator[Row]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is caught below
    # instead of the decoder stopping the whole file.
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        for record in reader:
            if not record:
                continue
            if skip:
                skip -= 1
                continue
            where = f"line {reader.line_num}"
            if len(record) != len(header):
                yield InvalidRow(f"{where}: {len(record)} fields where the header has {len(header)}")
                continue
            if any(_has_surrogates(value) for value in record):
                yield InvalidRow(f"{where}: not valid UTF-8")
                continue
            yield dict(zip(header, record))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_rows(path: Path, skip: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=1024):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield from batch.slice(skip).to_pylist()
        skip = 0


__all__ = ["InvalidRow", "InputFormat", "Row", "detect_format", "iter_rows"]
