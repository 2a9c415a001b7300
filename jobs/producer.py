"""The producer: streams a dataset, renders each row and stores the job as chunks of requests.

Chunk ids are the first row's number, so producing the same file again (a resumed job) adds nothing
twice. A row that cannot be read or rendered is committed at once as a failed item with its reason.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import redis

from promptmill.jobs.state.chunks import ChunkPayload, chunk_id_for
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.shards import flush_chunk, shards_reachable
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind, ItemOutcome, RenderedRequest
from promptmill.config.settings import get_settings
from promptmill.pipelines.attachments import AttachmentError, describe, limits_for
from promptmill.pipelines.render import RenderError

OnChunk = Callable[[ChunkPayload, bool], None]
_ROOM_POLL_S = 0.2


def _chunks(spec: JobSpec, start_row: int, digest: Any) -> Iterator[tuple[ChunkPayload, list[ItemOutcome]]]:
    requests: list[RenderedRequest] = []
    failures: list[ItemOutcome] = []
    first_row = start_row
    row_count = 0
    rows = iter_rows(Path(spec.input_path), spec.input_format, start_row, spec.max_row_bytes, digest)
    request_for = RequestMaker(spec)
    for row_number, line, row in rows:
        if row_count == 0:
            first_row = row_number
        row_count += 1
        if isinstance(row, InvalidRow):
            failures.append(ItemOutcome.failure(row_number, ErrorKind.invalid_row, row.reason, line=line))
        else:
            request = request_for(row_number, row, line)
            if isinstance(request, ItemOutcome):
                failures.append(request)
            else:
                requests.append(request)
        if row_count == spec.chunk_size:
            yield ChunkPayload(chunk_id=chunk_id_for(first_row), first_row=first_row, row_count=row_count, requests=requests), failures
            requests, failures, row_count = [], [], 0
    if row_count:
        yield ChunkPayload(chunk_id=chunk_id_for(first_row), first_row=first_row, row_count=row_count, requests=requests), failures


class RequestMaker:
    """A row's request as the producer makes it (and `resume --retry-failed` again): rendered, its
    files checked where the job may take them from (`Access`) and each read once, for its size, type
    and sha256; or the row's failure, with its reason."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.limits = limits_for(spec.backend)
        self.settings = get_settings()

    def __call__(self, row_number: int, row: dict[str, Any], line: int) -> RenderedRequest | ItemOutcome:
        try:
            request = self.spec.render(row_number, row, line, self.settings)
            if request.attachments:
                resized = self.spec.pipeline.resized
                request.attachments = [
                    describe(ref, row[ref.column], self.limits, ref.column in resized) for ref in request.attachments
                ]
            return request
        except RenderError as bad:
            return ItemOutcome.failure(row_number, ErrorKind.render_error, str(bad), line=line)
        except AttachmentError as bad:
            return ItemOutcome.failure(row_number, ErrorKind.attachment_error, str(bad), line=line)


def _wait_for_room(spec: JobSpec, store: JobStore, max_pending_rows: int, on_wait: Callable[[], None] | None) -> None:
    """Hold the producer while too many rows wait in Redis: memory follows the work, not the file."""
    while True:
        status = store.status(spec.job_id)
        if status.rows_produced - status.terminal < max_pending_rows or not status.state.runnable:
            return
        if on_wait is not None:
            on_wait()
        time.sleep(_ROOM_POLL_S)


class ProducerFailed(RuntimeError):
    """The input could not be read on (a corrupt file, a lost disk): the job is failed, resumable."""


def produce(
    spec: JobSpec,
    store: JobStore,
    on_chunk: OnChunk | None = None,
    max_pending_rows: int | None = None,
    on_wait: Callable[[], None] | None = None,
) -> int:
    """Store every chunk of the job; `on_chunk(chunk, added)` is called after each. Returns rows seen.

    A producer that stopped halfway (killed, interrupted) starts again at the last chunk it stored,
    without parsing the rows before it: that chunk is produced again (adding nothing twice) in case
    its unreadable rows were not yet committed as failed when the producer died.
    """
    try:
        return _produce(spec, store, on_chunk, max_pending_rows, on_wait)
    except redis.RedisError:
        raise  # Redis itself went away: the job stays as it was, for `resume` once it is back
    except Exception as error:  # noqa: BLE001 - whatever stops the producer must not leave the job producing forever
        message = f"the producer stopped: {type(error).__name__}: {error}"
        store.fail_job(spec.job_id, message)
        raise ProducerFailed(message) from error


def _produce(
    spec: JobSpec,
    store: JobStore,
    on_chunk: OnChunk | None,
    max_pending_rows: int | None,
    on_wait: Callable[[], None] | None,
) -> int:
    start_row = store.chunks.last_chunk_first_row(spec.job_id) or 0
    rows = start_row
    digest = hashlib.sha256()  # the input's, for the manifest: every byte streams past, skipped rows too
    for chunk, failures in _chunks(spec, start_row, digest):
        if max_pending_rows is not None:
            _wait_for_room(spec, store, max_pending_rows, on_wait)
        if not store.is_runnable(spec.job_id):
            break  # cancelled or failed while producing
        added = store.chunks.add(spec.job_id, chunk)
        for failure in failures:
            store.chunks.commit(spec.job_id, chunk.chunk_id, spec.model, failure)
        if not chunk.requests and shards_reachable(spec):
            flush_chunk(store, spec, chunk.chunk_id)  # every row failed to read: complete already
        rows += chunk.row_count
        if on_chunk is not None:
            on_chunk(chunk, added)
    else:
        store.finish_producing(spec.job_id, digest.hexdigest())
    return rows
