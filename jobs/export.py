"""Export: one record per input row, in input order, plus the failures on their own.

Files are written beside their final name, synced and renamed into place (jobs/files.py), so a reader
never sees half a file; `manifest.json` beside them says what produced them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

import orjson

from promptmill.jobs.batch_files import batch_lines
from promptmill.jobs.carried import with_carried
from promptmill.jobs.files import atomic_write
from promptmill.jobs.manifest import write_manifest
from promptmill.jobs.shards import worker_logs
from promptmill.jobs.shards import flush_complete_chunks, iter_outcomes, shard_dir, shard_paths, shards_reachable, unmark
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.tabular import Tabular, fitted
from promptmill.pipelines.items import ItemOutcome

ExportFormat = Literal["jsonl", "csv", "parquet", "openai-batch"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def _record(outcome: ItemOutcome) -> dict[str, Any]:
    return outcome.model_dump(mode="json")


def export_job(store: JobStore, spec: JobSpec, out_dir: Path, fmt: ExportFormat = "jsonl") -> dict[str, Any]:
    """Write results and failures from the job's shards and Redis; returns the paths and counts written.

    Where the job's own folder is here, complete chunks that workers could not flush (no shared
    folder) are flushed into it first; elsewhere (another host, `--out` anywhere) nothing is written
    there, and outcomes are read from Redis and whatever shards this host sees.
    """
    if shards_reachable(spec):
        flush_complete_chunks(store, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "openai-batch":
        return _export_batch_files(store, spec, out_dir)
    results_path = out_dir / f"results.{fmt}"
    failures_path = out_dir / "failures.jsonl"
    records = with_carried(spec, (_record(o) for o in iter_outcomes(store, spec)))
    table = Tabular(spec)
    written = failed = 0
    with atomic_write(failures_path) as failures, atomic_write(results_path, **_OPEN[fmt]) as handle:

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal written, failed
            for record in records:
                written += 1
                if record["status"] == "failed":
                    failed += 1
                    failures.write(orjson.dumps(record) + b"\n")
                yield record

        if fmt == "jsonl":
            for record in counted():
                handle.write(orjson.dumps(record) + b"\n")
        elif fmt == "csv":
            writer: csv.DictWriter | None = None
            for record in counted():
                flat = table.flat(record)
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(flat))
                    writer.writeheader()
                writer.writerow({name: spreadsheet_safe(value) for name, value in flat.items()})
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer_pq: pq.ParquetWriter | None = None
            batch: list[dict[str, Any]] = []
            for record in counted():
                batch.append(table.flat(record, typed=True))
                if len(batch) == 4096:
                    writer_pq = _write_batch(pq, pa, handle, writer_pq, table, batch)
                    batch = []
            if batch or writer_pq is None:
                writer_pq = _write_batch(pq, pa, handle, writer_pq, table, batch)
            writer_pq.close()
    manifest = write_manifest(store, spec, out_dir)
    return {
        "results": str(results_path), "failures": str(failures_path), "manifest": str(manifest),
        "records": written, "failed": failed,
    }  # fmt: skip


def _export_batch_files(store: JobStore, spec: JobSpec, out_dir: Path) -> dict[str, Any]:
    """The Batch API's own files: answers in output.jsonl, failures in errors.jsonl."""
    records = with_carried(spec, (_record(o) for o in iter_outcomes(store, spec)))
    output_path, errors_path = out_dir / "output.jsonl", out_dir / "errors.jsonl"
    written = failed = 0
    with atomic_write(output_path) as output, atomic_write(errors_path) as errors:
        for answered, line in batch_lines(records, spec.model, "openai"):
            written += 1
            failed += not answered
            (output if answered else errors).write(line)
    manifest = write_manifest(store, spec, out_dir)
    return {"results": str(output_path), "failures": str(errors_path), "manifest": str(manifest),
            "records": written, "failed": failed}  # fmt: skip


def write_run_batch_output(store: JobStore, spec: JobSpec, output: Path) -> dict[str, int]:
    """`vllm run-batch`'s output file: one line per request, answers and failures together, in input order."""
    if shards_reachable(spec):
        flush_complete_chunks(store, spec)
    records = with_carried(spec, (_record(o) for o in iter_outcomes(store, spec)))
    written = failed = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as handle:
        for answered, line in batch_lines(records, spec.model, "vllm"):
            written += 1
            failed += not answered
            handle.write(line)
    return {"records": written, "failed": failed}


_OPEN: dict[str, dict[str, Any]] = {"jsonl": {}, "parquet": {}, "csv": {"mode": "w", "newline": "", "encoding": "utf-8"}}


def _write_batch(pq: Any, pa: Any, sink: Any, writer: Any, table: Tabular, batch: list[dict[str, Any]]) -> Any:
    if writer is None:
        writer = pq.ParquetWriter(sink, table.arrow_schema(pa, batch))
    rows = list(fitted(pa, writer.schema, table.carried, batch))
    writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))
    return writer


class FilesKept(RuntimeError):
    """The job's folder cannot be told to be its own here: nothing in it is removed."""


# A cell a spreadsheet program would read as a formula: `=`, `+`, `-`, `@`, or a tab or return first.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as the text it is: a string that would start a formula (a
    model's answer, an input's text: `=HYPERLINK(...)`) gets a leading apostrophe, as OWASP advises and
    spreadsheet programs take it (they show the text without it)."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def own_folder(spec: JobSpec) -> bool:
    """Is the job's folder here and its own (its shard folder's marker names it)? False: there is no
    folder (removed already). Raises `FilesKept` where it is not the job's to remove from."""
    folder = Path(spec.out_dir)
    if not folder.exists() and not folder.is_symlink():
        return False
    if folder.is_symlink() or shard_dir(spec).is_symlink() or not shards_reachable(spec):
        raise FilesKept(f"{shard_dir(spec) / '.job'} does not name job {spec.job_id} here: its folder is on "
                        "another machine, or not its own")  # fmt: skip
    return True


KEPT_FILE = "job.json"  #: beside a complete named job's results: its spec and cost, for when Redis has let it go
REPORT_FILE = "report.html"


def _names_job(path: Path, job_id: str) -> bool:
    """Does the file (a job.json, a report) name this job? Another job may share the folder."""
    try:
        return path.is_file() and job_id in path.read_text(errors="replace")
    except OSError:
        return False


def remove_job_files(spec: JobSpec) -> list[Path]:
    """Remove what the job wrote in its folder, and nothing else: its own shards and worker logs, its
    results, failures and manifest where the manifest names it, then each folder it empties. Only
    where the shard folder's marker names the job (another job, or the user, may share the folder);
    a symlink is removed, never followed. Raises `FilesKept` where the marker does not name it."""
    folder = Path(spec.out_dir)
    if not own_folder(spec):
        return []  # removed already
    written = [*shard_paths(spec)]
    logs = folder / "logs"
    if not logs.is_symlink():
        written += worker_logs(logs, spec.job_id) + [logs / f"{spec.job_id}.ui-resume.log"]
    written += [path for path in (folder / KEPT_FILE, folder / REPORT_FILE) if _names_job(path, spec.job_id)]
    if _manifest_names(folder / "manifest.json", spec.job_id):
        written += [folder / name for name in ("failures.jsonl", "output.jsonl", "errors.jsonl",
                                               *(f"results.{fmt}" for fmt in EXPORT_FORMATS[:3]))]  # fmt: skip
        written.append(folder / "manifest.json")  # last: it says whose the results are, should a removal fail
    removed = []
    for path in written:
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(path)
    if not any(folder.glob("*.html")):  # the script a report drew with, once no page is left to use it
        for script in folder.glob("plotly-*.min.js"):
            if script.is_file() or script.is_symlink():
                script.unlink()
                removed.append(script)
    unmark(spec)
    for emptied in (shard_dir(spec), logs, folder):
        if emptied.is_dir() and not emptied.is_symlink() and not any(emptied.iterdir()):
            emptied.rmdir()
            removed.append(emptied)
    return removed


def _manifest_names(path: Path, job_id: str) -> bool:
    """Does the manifest there say the results beside it are this job's?"""
    if path.is_symlink():
        return False
    try:
        return orjson.loads(path.read_bytes()).get("job_id") == job_id
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return False
