"""`resume --retry-failed`: the job's failed rows go back to pending, to be sent again.

Rows that failed for their own input (unreadable, unrenderable, too long) would fail the same way and
stay failed. The others are rendered again from the input, their chunk is put back in Redis (a
flushed chunk's other outcomes come back from its shard), and their attempts keep counting. What
their failed answers cost stays in the ledger (`JobStore.requeue_failed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from promptmill.jobs.state.chunks import ChunkPayload
from promptmill.jobs.producer import RequestMaker
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.shards import outcomes_by_chunk
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind, ItemOutcome, RenderedRequest

INPUT_FAULTS = frozenset({ErrorKind.invalid_row, ErrorKind.render_error, ErrorKind.prompt_too_long})


@dataclass(frozen=True)
class Requeued:
    rows: int  # failed rows sent again
    kept_failed: int  # failed rows whose input is at fault: they stay failed


def _retryable(outcome: ItemOutcome) -> bool:
    return outcome.status == "failed" and (outcome.error is None or outcome.error.kind not in INPUT_FAULTS)


def _render(spec: JobSpec, rows: set[int]) -> dict[int, RenderedRequest]:
    """The requests of these rows, rendered again from the input as the producer did."""
    requests: dict[int, RenderedRequest] = {}
    request_for = RequestMaker(spec)
    start, last = min(rows), max(rows)
    for number, line, row in iter_rows(Path(spec.input_path), spec.input_format, start, spec.max_row_bytes):
        if number > last:
            break
        if number in rows and not isinstance(row, InvalidRow):
            request = request_for(number, row, line)
            if isinstance(request, RenderedRequest):  # else the input changed under the job: it stays failed
                requests[number] = request
    return requests


def requeue_failed(store: JobStore, spec: JobSpec) -> Requeued:
    chunks: list[tuple[str, list[ItemOutcome]]] = []
    kept_failed = 0
    for chunk_id, outcomes in outcomes_by_chunk(store, spec):
        kept_failed += sum(1 for o in outcomes if o.status == "failed" and not _retryable(o))
        if any(_retryable(o) for o in outcomes):
            chunks.append((chunk_id, outcomes))
    if not chunks:
        return Requeued(0, kept_failed)
    requests = _render(spec, {o.row for _, outcomes in chunks for o in outcomes if _retryable(o)})
    retried = 0
    for chunk_id, outcomes in chunks:
        retry = [o for o in outcomes if _retryable(o) and o.row in requests]
        kept_failed += sum(1 for o in outcomes if _retryable(o) and o.row not in requests)
        if not retry:
            continue
        retry_rows = {o.row for o in retry}
        keep = [o for o in outcomes if o.row not in retry_rows]
        payload = ChunkPayload(
            chunk_id=chunk_id,
            first_row=int(chunk_id),
            row_count=store.chunks.row_count(spec.job_id, chunk_id),
            requests=[requests[o.row] for o in retry],
        )
        retried += store.chunks.requeue_failed(spec.job_id, chunk_id, payload, keep, retry)
    return Requeued(retried, kept_failed)
