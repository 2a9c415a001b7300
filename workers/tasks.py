"""The one Celery task: run a chunk of a job's rows and commit each row's outcome as it finishes.

A chunk is leased while it runs (a second delivery of it skips), rows already done are dropped before
anything is sent, and each outcome is committed with its done mark and usage in one atomic step. A
chunk whose worker died too many times fails its remaining rows instead of looping forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid

import redis
from celery.signals import worker_shutdown

from config.celery_config import TASK_RUN_CHUNK
from jobs.shards import flush_chunk
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import ErrorKind, ItemError, ItemOutcome, RenderedRequest, iso_utc
from pipelines.parse import OutputParseError, parse_output
from workers.app import app
from workers.backends.base import EngineDied, FatalJobError, RawOutcome, get_backend, shutdown_backends
from workers.runtime import WorkerRuntime, runtime

log = logging.getLogger(__name__)

MAX_ROW_STARTS = 3  # a row in flight this often when its worker died is poison: it fails
_RUNNABLE_CHECK_S = 1.0


class _LeaseHeartbeat(threading.Thread):
    """Keeps the chunk's lease alive from a thread: a blocking engine call cannot starve it."""

    def __init__(self, store: JobStore, job_id: str, chunk_id: str, token: str, ttl_ms: int):
        super().__init__(daemon=True, name=f"lease-{chunk_id}")
        self.store, self.job_id, self.chunk_id, self.token, self.ttl_ms = store, job_id, chunk_id, token, ttl_ms
        self.stopped = threading.Event()
        self.lost = threading.Event()  # another worker may hold the chunk now: stop sending its rows

    def run(self) -> None:
        while not self.stopped.wait(self.ttl_ms / 3000):  # renewed every third of its life
            try:
                if not self.store.renew_lease(self.job_id, self.chunk_id, self.token, self.ttl_ms):
                    log.warning("lost the lease on chunk %s of job %s; stopping it here", self.chunk_id, self.job_id)
                    self.lost.set()
                    return
            except redis.RedisError:
                continue  # Redis restarting: the next beat tries again


def to_outcome(job: JobSpec, raw: RawOutcome, line: int = 0) -> ItemOutcome:
    common = {
        "usage": raw.usage,
        "text": raw.text if job.pipeline.store_text else None,
        "finish_reason": raw.finish_reason,
        "attempts": raw.attempts,
        "model": job.model if raw.attempts else None,  # a row refused before sending reached no model
        "request_id": raw.request_id,
        "started_at": iso_utc(raw.started_at),
        "finished_at": iso_utc(raw.finished_at),
        "latency_ms": raw.latency_ms,
        "errors": raw.errors,
        "line": line,
    }
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

    def __init__(self, store: JobStore, job: JobSpec, chunk_id: str):
        self.store, self.job_id, self.chunk_id, self.model = store, job.job_id, chunk_id, job.model
        self.counts = store.failed_attempts(job.job_id, chunk_id)

    def prior(self, row: int) -> int:
        return self.counts.get(row, 0)

    def failed(self, row: int) -> None:
        self.counts[row] = self.store.add_failed_attempt(self.job_id, self.chunk_id, row, self.model)


async def _run_requests(
    rt: WorkerRuntime, job: JobSpec, chunk_id: str, pending: list[RenderedRequest], lease_lost: threading.Event
) -> int:
    backend = get_backend(job, rt.settings, rt.store)
    attempts = ChunkAttempts(rt.store, job, chunk_id)
    lines = {request.row: request.line for request in pending}
    committed = 0
    checked_at = time.monotonic()
    async with contextlib.aclosing(backend.run(job, pending, attempts)) as outcomes:
        async for raw in outcomes:
            outcome = to_outcome(job, raw, lines.get(raw.row, 0))
            committed += rt.store.commit(job.job_id, chunk_id, rt.ledger_model(job, raw.usage), outcome)
            if lease_lost.is_set():
                break  # sending on would pay twice for rows the new holder sends too
            if time.monotonic() - checked_at > _RUNNABLE_CHECK_S:
                checked_at = time.monotonic()
                if not rt.store.is_runnable(job.job_id):
                    break  # cancelled or failed elsewhere: the rest stays pending for a resume
    return committed


class _LeasedElsewhere(Exception):
    def __init__(self, wait_s: float):
        super().__init__(f"leased elsewhere for {wait_s:.1f}s")
        self.wait_s = wait_s


MAX_REDIS_ERRORS = 3  # a Redis error (a restart, a failover) is retried; anything else stops the job


@app.task(bind=True, name=TASK_RUN_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self, job_id: str, chunk_id: str, errors: int = 0) -> str:
    # `errors` counts Redis failures on this chunk; waiting for another worker's lease is no error.
    try:
        return _run_chunk(job_id, chunk_id)
    except _LeasedElsewhere as leased:
        # Another worker holds the chunk (or held it and died): look again when its lease runs out.
        raise self.retry(countdown=leased.wait_s, max_retries=None)
    except EngineDied as died:
        # Counted as its worker dying (the chunk's run count stays), so a row that kills engines is
        # found and failed as poison; the next run starts a new engine.
        log.error("chunk %s of job %s: %s", chunk_id, job_id, died)
        raise self.retry(countdown=1, max_retries=None)
    except redis.RedisError:
        if errors >= MAX_REDIS_ERRORS:
            raise  # Redis is gone for now: the chunk is stranded, and the sweeper sends it again later
        log.exception("chunk %s of job %s: Redis failed; retrying", chunk_id, job_id)
        raise self.retry(kwargs={"errors": errors + 1}, countdown=2**errors, max_retries=None)
    except Exception as error:  # noqa: BLE001 - not the rows' fault: stop the job, fail no row
        # A missing key, a bug, a spec from another version: every row would fail the same way and
        # be lost for good. The job stops with the reason; `resume` goes on once it is fixed.
        log.exception("chunk %s of job %s: unexpected error; stopping the job", chunk_id, job_id)
        message = f"a worker failed on chunk {chunk_id}: {type(error).__name__}: {error}"
        runtime().store.fail_job(job_id, message)
        return "job failed"


def _run_carefully(
    rt: WorkerRuntime, job: JobSpec, chunk_id: str, pending: list[RenderedRequest], runs: int, lease_lost: threading.Event
) -> int:
    """Run a chunk whose last run died with its worker, so that a row that kills workers is found.

    Every row sent is counted in Redis first. On the second run the rows go together as usual; from
    the third on, one at a time, so each death counts against the one row in flight, and a row in
    flight at `MAX_ROW_STARTS` deaths fails as poison instead of being redelivered forever.
    """
    groups = [pending] if runs == 2 else [[request] for request in pending]
    committed = 0
    for group in groups:
        if lease_lost.is_set() or not rt.store.is_runnable(job.job_id):
            break  # as `_run_requests` does within a group: the rest stays pending
        starts = rt.store.count_row_starts(job.job_id, chunk_id, [request.row for request in group])
        runnable = []
        for request in group:
            if starts[request.row] > MAX_ROW_STARTS:
                message = f"its worker died {starts[request.row] - 1} times while this row was in flight"
                outcome = ItemOutcome.failure(request.row, ErrorKind.worker_lost, message)
                committed += rt.store.commit(job.job_id, chunk_id, job.model, outcome)
            else:
                runnable.append(request)
        if runnable:
            committed += rt.run(_run_requests(rt, job, chunk_id, runnable, lease_lost))
    return committed


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
    ttl_ms = int(rt.settings.lease_ttl_s * 1000)
    if not store.acquire_lease(job_id, chunk_id, token, ttl_ms):
        raise _LeasedElsewhere(store.lease_ttl_ms(job_id, chunk_id) / 1000 + 0.5)
    heartbeat = _LeaseHeartbeat(store, job_id, chunk_id, token, ttl_ms)
    heartbeat.start()
    try:
        if store.is_flushed(job_id, chunk_id):
            return "already complete"  # a redelivery of a chunk that is done and gone to its shard
        runs = store.count_chunk_run(job_id, chunk_id)
        store.add_host(job_id, socket.gethostname())
        done = store.done_rows(job_id, chunk_id)
        pending = [request for request in store.chunk(job_id, chunk_id).requests if request.row not in done]
        engine_died = False
        try:
            if runs > 1:
                committed = _run_carefully(rt, job, chunk_id, pending, runs, heartbeat.lost)
            else:
                committed = rt.run(_run_requests(rt, job, chunk_id, pending, heartbeat.lost))
        except FatalJobError as fatal:
            log.error("job %s stopped: %s", job_id, fatal)
            store.fail_job(job_id, str(fatal))
            return "job failed"
        except EngineDied:
            engine_died = True  # as its worker's death: the run stays counted
            raise
        finally:
            if not engine_died:
                store.forget_chunk_runs(job_id, chunk_id)  # the run ended on its own, not by a death
        _flush_if_complete(rt, job, chunk_id)
        return f"{committed} committed"
    finally:
        heartbeat.stopped.set()
        store.release_lease(job_id, chunk_id, token)


def _flush_if_complete(rt: WorkerRuntime, job: JobSpec, chunk_id: str) -> None:
    """Move the finished chunk's outcomes to its shard, when this worker sees the job's folder."""
    if not rt.shards_reachable(job):
        return  # another machine without the shared folder: `export` flushes it later
    try:
        flush_chunk(rt.store, job, chunk_id)
    except OSError as error:
        log.warning("could not flush chunk %s of job %s (%s); its outcomes stay in Redis", chunk_id, job.job_id, error)


@worker_shutdown.connect
def _stop_engine(**_: object) -> None:
    shutdown_backends()
