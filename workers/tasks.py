"""The one Celery task: run a chunk of a job's rows and commit each row's outcome as it finishes.

A chunk is leased while it runs (a second delivery of it skips), rows already done are dropped before
anything is sent, and each outcome is committed with its done mark and usage in one atomic step. A
chunk whose worker died too many times fails its remaining rows instead of looping forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from config.celery_config import TASK_RUN_CHUNK
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import ErrorKind, ItemError, ItemOutcome, RenderedRequest
from pipelines.parse import OutputParseError, parse_output
from workers.app import app
from workers.backends.base import FatalJobError, RawOutcome, get_backend
from workers.runtime import WorkerRuntime, runtime

log = logging.getLogger(__name__)

LEASE_TTL_MS = 15_000  # a dead worker's chunk is free again this soon; renewed every third of it
MAX_CHUNK_RUNS = 4  # a chunk started this often without finishing has killed its worker each time
_RUNNABLE_CHECK_S = 1.0


class _LeaseHeartbeat(threading.Thread):
    """Keeps the chunk's lease alive from a thread: a blocking engine call cannot starve it."""

    def __init__(self, store: JobStore, job_id: str, chunk_id: str, token: str):
        super().__init__(daemon=True, name=f"lease-{chunk_id}")
        self.store, self.job_id, self.chunk_id, self.token = store, job_id, chunk_id, token
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LEASE_TTL_MS / 3000):
            self.store.renew_lease(self.job_id, self.chunk_id, self.token, LEASE_TTL_MS)


def to_outcome(job: JobSpec, raw: RawOutcome) -> ItemOutcome:
    common = {"usage": raw.usage, "text": raw.text, "finish_reason": raw.finish_reason, "attempts": raw.attempts}
    if raw.error is not None:
        return ItemOutcome(row=raw.row, status="failed", error=raw.error, **common)
    try:
        value = parse_output(job.pipeline.output, raw.text or "")
    except OutputParseError as bad:
        error = ItemError(kind=ErrorKind.unparseable_output, message=str(bad))
        return ItemOutcome(row=raw.row, status="failed", error=error, **common)
    return ItemOutcome(row=raw.row, status="ok", output=value, **common)


class ChunkAttempts:
    """The chunk's failed attempts per row, read once when the chunk starts and counted in Redis."""

    def __init__(self, store: JobStore, job_id: str, chunk_id: str):
        self.store, self.job_id, self.chunk_id = store, job_id, chunk_id
        self.counts = store.failed_attempts(job_id, chunk_id)

    def prior(self, row: int) -> int:
        return self.counts.get(row, 0)

    def failed(self, row: int) -> None:
        self.counts[row] = self.store.add_failed_attempt(self.job_id, self.chunk_id, row)


async def _run_requests(rt: WorkerRuntime, job: JobSpec, chunk_id: str, pending: list[RenderedRequest]) -> int:
    backend = get_backend(job, rt.settings, rt.store)
    attempts = ChunkAttempts(rt.store, job.job_id, chunk_id)
    committed = 0
    checked_at = time.monotonic()
    async for raw in backend.run(job, pending, attempts):
        committed += rt.store.commit(job.job_id, chunk_id, job.model, to_outcome(job, raw))
        if time.monotonic() - checked_at > _RUNNABLE_CHECK_S:
            checked_at = time.monotonic()
            if not rt.store.is_runnable(job.job_id):
                break  # cancelled or failed elsewhere: the rest stays pending for a resume
    return committed


class _LeasedElsewhere(Exception):
    def __init__(self, wait_s: float):
        super().__init__(f"leased elsewhere for {wait_s:.1f}s")
        self.wait_s = wait_s


MAX_TASK_ERRORS = 3  # an unexpected error in our own code is retried, then fails the chunk's rows


@app.task(bind=True, name=TASK_RUN_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self, job_id: str, chunk_id: str, errors: int = 0) -> str:
    # `errors` counts our own failures on this chunk; waiting for another worker's lease is no error.
    try:
        return _run_chunk(job_id, chunk_id)
    except _LeasedElsewhere as leased:
        # Another worker holds the chunk (or held it and died): look again when its lease runs out.
        raise self.retry(countdown=leased.wait_s, max_retries=None)
    except Exception as error:  # noqa: BLE001 - a chunk must end terminal, never silently dropped
        if errors < MAX_TASK_ERRORS:
            log.exception("chunk %s of job %s failed; retrying", chunk_id, job_id)
            raise self.retry(kwargs={"errors": errors + 1}, countdown=2**errors, max_retries=None)
        rt = runtime()
        message = f"the worker failed on this chunk {errors + 1} times: {type(error).__name__}: {error}"
        _fail_pending(rt.store, rt.spec(job_id), chunk_id, ErrorKind.engine_error, message)
        return "failed after errors"


def _fail_pending(store: JobStore, job: JobSpec, chunk_id: str, kind: ErrorKind, message: str) -> None:
    """Commit every row of the chunk that is not done yet as failed."""
    done = store.done_rows(job.job_id, chunk_id)
    for request in store.chunk(job.job_id, chunk_id).requests:
        if request.row not in done:
            store.commit(job.job_id, chunk_id, job.model, ItemOutcome.failure(request.row, kind, message))


def _run_chunk(job_id: str, chunk_id: str) -> str:
    rt = runtime()
    store = rt.store
    try:
        job = rt.spec(job_id)
    except KeyError:
        return "unknown job"
    if not store.is_runnable(job_id):
        return "job not runnable"
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not store.acquire_lease(job_id, chunk_id, token, LEASE_TTL_MS):
        raise _LeasedElsewhere(store.lease_ttl_ms(job_id, chunk_id) / 1000 + 0.5)
    heartbeat = _LeaseHeartbeat(store, job_id, chunk_id, token)
    heartbeat.start()
    try:
        runs = store.count_chunk_run(job_id, chunk_id)
        if runs > MAX_CHUNK_RUNS:
            message = f"the chunk's worker died {runs - 1} times while running it"
            _fail_pending(store, job, chunk_id, ErrorKind.worker_lost, message)
            return "failed as poison"
        done = store.done_rows(job_id, chunk_id)
        pending = [request for request in store.chunk(job_id, chunk_id).requests if request.row not in done]
        try:
            committed = rt.run(_run_requests(rt, job, chunk_id, pending))
        except FatalJobError as fatal:
            log.error("job %s stopped: %s", job_id, fatal)
            store.fail_job(job_id, str(fatal))
            return "job failed"
        finally:
            store.forget_chunk_runs(job_id, chunk_id)  # the run ended on its own, not by its worker dying
        return f"{committed} committed"
    finally:
        heartbeat.stopped.set()
        store.release_lease(job_id, chunk_id, token)
