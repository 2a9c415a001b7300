"""Export: one record per input row, in input order, plus the failures on their own.

Files are written beside their final name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterator, Literal

import orjson

from jobs.shards import flush_complete_chunks, iter_outcomes
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import ItemOutcome

ExportFormat = Literal["jsonl", "csv", "parquet"]


def _record(outcome: ItemOutcome) -> dict[str, Any]:
    return {
        "row": outcome.row,
        "status": outcome.status,
        "output": outcome.output,
        "text": outcome.text,
        "error": outcome.error.model_dump(mode="json") if outcome.error else None,
        "usage": outcome.usage.model_dump(),
        "finish_reason": outcome.finish_reason,
        "attempts": outcome.attempts,
    }


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A record for tabular formats: output as JSON text, error and usage as columns."""
    error = record["error"] or {}
    return {
        "row": record["row"],
        "status": record["status"],
        "output": None if record["output"] is None else orjson.dumps(record["output"]).decode(),
        "text": record["text"],
        "error_kind": error.get("kind"),
        "error_message": error.get("message"),
        **record["usage"],
        "finish_reason": record["finish_reason"],
        "attempts": record["attempts"],
    }


def export_job(store: JobStore, spec: JobSpec, out_dir: Path, fmt: ExportFormat = "jsonl") -> dict[str, Any]:
    """Write results and failures from the job's shards and Redis; returns the paths and counts written.

    Complete chunks that workers could not flush (no shared folder) are flushed here first.
    """
    flush_complete_chunks(store, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"results.{fmt}"
    failures_path = out_dir / "failures.jsonl"
    partial_results = results_path.with_name(results_path.name + ".partial")
    partial_failures = failures_path.with_name(failures_path.name + ".partial")
    records: Iterator[dict[str, Any]] = (_record(o) for o in iter_outcomes(store, spec))
    written = failed = 0
    with partial_failures.open("wb") as failures:
        def counted() -> Iterator[dict[str, Any]]:
            nonlocal written, failed
            for record in records:
                written += 1
                if record["status"] == "failed":
                    failed += 1
                    failures.write(orjson.dumps(record) + b"\n")
                yield record

        if fmt == "jsonl":
            with partial_results.open("wb") as handle:
                for record in counted():
                    handle.write(orjson.dumps(record) + b"\n")
        elif fmt == "csv":
            with partial_results.open("w", newline="", encoding="utf-8") as handle:
                writer: csv.DictWriter | None = None
                for record in counted():
                    flat = _flat(record)
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(flat))
                        writer.writeheader()
                    writer.writerow(flat)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer_pq: pq.ParquetWriter | None = None
            batch: list[dict[str, Any]] = []
            for record in counted():
                batch.append(_flat(record))
                if len(batch) == 4096:
                    writer_pq = _write_batch(pq, pa, partial_results, writer_pq, batch)
                    batch = []
            if batch or writer_pq is None:
                writer_pq = _write_batch(pq, pa, partial_results, writer_pq, batch)
            writer_pq.close()
    os.replace(partial_results, results_path)
    os.replace(partial_failures, failures_path)
    return {"results": str(results_path), "failures": str(failures_path), "records": written, "failed": failed}


def _write_batch(pq: Any, pa: Any, path: Path, writer: Any, batch: list[dict[str, Any]]) -> Any:
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("status", pa.string()),
            ("output", pa.string()),
            ("text", pa.string()),
            ("error_kind", pa.string()),
            ("error_message", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("cache_creation_input_tokens", pa.int64()),
            ("cache_read_input_tokens", pa.int64()),
            ("cache_creation_1h_input_tokens", pa.int64()),
            ("engine_us", pa.int64()),
            ("finish_reason", pa.string()),
            ("attempts", pa.int64()),
        ]
    )
    if writer is None:
        writer = pq.ParquetWriter(path, schema)
    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return writer
