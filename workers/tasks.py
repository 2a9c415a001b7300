"""The Celery tasks: run a chunk of a job's rows and commit each row's outcome as it finishes
(`run_chunk`), and pick the chunk a free slot runs next by the jobs' fair shares (`run_next`).

A chunk is leased while it runs (a second delivery of it skips), rows already done are dropped before
anything is sent, and each outcome is committed with its done mark and usage in one atomic step. A
chunk whose worker died too many times fails its remaining rows instead of looping forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import orjson
import redis
from celery.signals import worker_shutdown

from promptmill.config.celery_config import TASK_RUN_CHUNK, TASK_RUN_NEXT
from promptmill.jobs.state.chunk_run import ChunkRun
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.shards import ShardError, flush_chunk, shard_lines
from promptmill.jobs.state.chunks import COMMITTED, LATE
from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.items import ErrorKind, ItemError, ItemOutcome, RenderedRequest, iso_utc
from promptmill.pipelines.parse import OutputParseError, parse_output
from promptmill.workers.app import app
from promptmill.workers.backends.base import EngineDied, FatalJobError, RawOutcome
from promptmill.workers.fallback import handoff_of
from promptmill.workers.metrics import count_row
from promptmill.workers.metrics import flush as flush_metrics
from promptmill.workers.layers import Billed, Gate
from promptmill.workers.request_path import fan_out
from promptmill.workers.runtime import WorkerRuntime, current_runtime, runtime

log = logging.getLogger(__name__)

MAX_ROW_STARTS = 3  # a row in flight this often when its worker died is poison: it fails
_RUNNABLE_CHECK_S = 1.0


# The finish reasons of an answer stopped by its token cap: Anthropic's, OpenAI's and vLLM's.
CUT_AT_MAX_TOKENS = ("max_tokens", "length")


def to_outcome(job: JobSpec, raw: RawOutcome, line: int = 0, attachments: list[dict] | None = None) -> ItemOutcome:
    common = {
        "usage": raw.usage,
        "text": raw.text if job.pipeline.store_text else None,
        "finish_reason": raw.finish_reason,
        "attempts": raw.attempts,
        "model": (raw.model or job.model) if raw.attempts else None,  # a row refused before sending reached no model
        "priced_as": raw.ledger_model if raw.attempts else None,
        "models_tried": raw.models_tried,
        "request_id": raw.request_id,
        "started_at": iso_utc(raw.started_at),
        "finished_at": iso_utc(raw.finished_at),
        "latency_ms": raw.latency_ms,
        "ttft_ms": raw.ttft_ms,
        "errors": raw.errors,
        "line": line,
        "attachments": attachments,
    }
    if raw.error is not None:
        return ItemOutcome(row=raw.row, status="failed", error=raw.error, **common)
    try:
        value = parse_output(job.pipeline.output, raw.text or "")
    except OutputParseError as bad:
        message = str(bad)
        if raw.finish_reason in CUT_AT_MAX_TOKENS:
            message = (f"the answer was cut at max_tokens ({job.pipeline.max_tokens}) before its end; raise max_tokens "
                       f"in the pipeline ({message})")  # fmt: skip
        error = ItemError(kind=ErrorKind.unparseable_output, message=message)
        return ItemOutcome(row=raw.row, status="failed", error=error, **common)
    return ItemOutcome(row=raw.row, status="ok", output=value, **common)


class ChunkAttempts:
    """The chunk's failed attempts per row, read once when the chunk starts and counted in Redis."""

    def __init__(self, run: ChunkRun):
        # A batch's failed attempts are counted beside its answers, under MODEL@batch.
        self.run, self.model = run, run.job.model + run.job.info.ledger_suffix
        self.counts = run.failed_attempts()

    def prior(self, row: int) -> int:
        return self.counts.get(row, 0)

    def failed(self, row: int, cost: Billed | None = None, model: str | None = None) -> None:
        """Count a failed attempt of the row, in the ledger under `model` (default: the job's), with
        what the provider billed for it."""
        self.counts[row] = self.run.add_failed_attempt(row, model or self.model, cost and (cost.ledger_model, cost.usage))

    def for_model(self, model: str, first: bool) -> "ModelAttempts":
        return ModelAttempts(self, model, first)


@dataclass
class ModelAttempts:
    chunk: ChunkAttempts
    model: str
    first: bool
    counts: dict[int, int] = field(default_factory=dict)

    def prior(self, row: int) -> int:
        return self.chunk.prior(row) if self.first else self.counts.get(row, 0)

    def failed(self, row: int, cost: Billed | None = None) -> None:
        self.counts[row] = self.counts.get(row, 0) + 1
        self.chunk.failed(row, cost, self.model)


class _StillWaiting(Exception):
    """The chunk's rows wait on the provider (a batch) past the backend's hold: the chunk is sent again
    later, and its rows are found where they wait."""

    def __init__(self, run: ChunkRun):
        super().__init__(run.run_id)
        self.run = run


async def _run_requests(rt: WorkerRuntime, run: ChunkRun, pending: list[RenderedRequest]) -> int:
    """Send the rows down the run's request path and commit their outcomes as they come, holding the
    backends it uses meanwhile (another job's chunk never closes them under it)."""
    async with rt.holding():
        return await _send_and_commit(rt, run, pending)


async def _send_and_commit(rt: WorkerRuntime, run: ChunkRun, pending: list[RenderedRequest]) -> int:
    job, lease_lost = run.job, run.lease.lost
    gate = Gate()
    carried = run.handed() if run.link else None
    path = await rt.request_path(job, ChunkAttempts(run), gate, run.link, carried)
    hold_s = (await rt.backend(run.model_job)).hold_s
    lines = {request.row: request.line for request in pending}
    audits = {request.row: [ref.audit() for ref in request.attachments] for request in pending if request.attachments}
    committed = handed = 0
    checked_at = time.monotonic()
    deadline: asyncio.Timeout | None = None

    def stop() -> None:  # the process is going away (WorkerRuntime.stop_sending)
        gate.closed = True
        if deadline is not None and hold_s is not None:
            deadline.reschedule(asyncio.get_running_loop().time())  # its rows wait in their batch for the next run

    async with contextlib.aclosing(fan_out(path, job, run.chunk_id, pending)) as outcomes:
        try:
            async with asyncio.timeout(hold_s) as deadline:
                rt.stoppers.add(stop)
                if rt.stopping.is_set():
                    stop()
                async for raw in outcomes:
                    if raw.handed_to is not None:  # gone on to another queue's model: its run commits it
                        run.hand_off(raw.row, handoff_of(raw))
                        handed += 1
                    else:
                        outcome = to_outcome(job, raw, lines.get(raw.row, 0), audits.get(raw.row))
                        committed += _commit(rt, run, raw.ledger_model or job.model, outcome, raw)
                    if gate.closed:
                        continue  # draining: the answers in flight are paid for, so they are committed
                    if lease_lost.is_set():
                        gate.closed = True  # sending on would pay twice for rows the new holder sends too
                    elif time.monotonic() - checked_at > _RUNNABLE_CHECK_S:
                        checked_at = time.monotonic()
                        # Cancelled or failed elsewhere: send nothing more; the rest stays pending for a resume.
                        gate.closed = not run.runnable()
        except TimeoutError:
            raise _StillWaiting(run) from None
        finally:
            rt.stoppers.discard(stop)
            rt.pace.write()  # what this chunk did is in `status` by the time it ends
            if rt.metrics:
                flush_metrics()
    if hold_s is not None and committed + handed < len(pending) and not lease_lost.is_set() and run.runnable():
        raise _StillWaiting(run)  # rows whose batch was canceled under a running job: a new batch takes them
    return committed


def _commit(rt: WorkerRuntime, run: ChunkRun, model: str, outcome: ItemOutcome, raw: RawOutcome | None = None) -> bool:
    """Commit a row's outcome (False: the row was done already) and count a new one in the job's
    pace and the process's metrics."""
    done = run.commit(model, outcome)
    if done == LATE:
        _late_answer(rt, run, model, outcome)
    new = done == COMMITTED
    job = run.job
    if new:
        if raw is None:  # failed before any request (a poison row): no latency, no tokens
            rt.pace.add(job.job_id, None, 0, False, None, None)
        else:
            rt.pace.add(job.job_id, raw.latency_ms, raw.usage.output_tokens, outcome.status == "ok",
                        raw.started_at, raw.finished_at, raw.ttft_ms)  # fmt: skip
        if rt.metrics:
            count_row(job.job_id, outcome.status)
    return new


def _late_answer(rt: WorkerRuntime, run: ChunkRun, model: str, outcome: ItemOutcome) -> None:
    """An answer for a row whose chunk is in its shard already: paid twice, unless it is the very answer
    the shard holds (the same request id: one batch's result read by two runs, billed once). Where the
    shard cannot be read here, it counts as paid twice (the bill is never under-counted)."""
    job = run.job
    try:
        kept = [orjson.loads(line) for line in shard_lines(job, run.chunk_id)] if rt.shards_reachable(job) else []
    except (ShardError, OSError, orjson.JSONDecodeError):
        kept = []
    if not any(record.get("row") == outcome.row and record.get("request_id") == outcome.request_id for record in kept):
        rt.store.chunks.paid_twice(job.job_id, model, outcome.usage)


class _LeasedElsewhere(Exception):
    def __init__(self, wait_s: float):
        super().__init__(f"leased elsewhere for {wait_s:.1f}s")
        self.wait_s = wait_s


MAX_REDIS_ERRORS = 3  # a Redis error (a restart, a failover) is retried; anything else stops the job


# max_retries=None: a chunk is sent again as often as it waits (on a lease, on a batch for up to a day);
# Celery's default of 3 would end a batch chunk's fourth hold with MaxRetriesExceededError.
@app.task(bind=True, name=TASK_RUN_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=None)
def run_chunk(self, job_id: str, chunk_id: str, errors: int = 0, link: int = 0) -> str:
    # `errors` counts Redis failures on this chunk; waiting for another worker's lease is no error.
    # `link`: run only the chunk's rows handed to that model of the job's fallback chain.
    try:
        with runtime().running_chunk(job_id):
            return _run_chunk(job_id, chunk_id, link)
    except _LeasedElsewhere as leased:
        # Another worker holds the chunk (or held it and died): look again when its lease runs out.
        raise self.retry(countdown=leased.wait_s)
    except _StillWaiting as waiting:
        # Its rows wait on the provider's batch: give the worker's slot back and look again soon. The
        # sweeper must not take the delayed message for a lost one meanwhile.
        countdown = runtime().settings.batch_poll_min_s
        waiting.run.sent_later(time.time() + countdown)
        raise self.retry(countdown=countdown)
    except EngineDied as died:
        # Counted as its worker dying (the chunk's run count stays), so a row that kills engines is
        # found and failed as poison; the next run starts a new engine.
        log.error("chunk %s of job %s: %s", chunk_id, job_id, died)
        raise self.retry(countdown=1)
    except redis.RedisError:
        if errors >= MAX_REDIS_ERRORS:
            raise  # Redis is gone for now: the chunk is stranded, and the sweeper sends it again later
        log.exception("chunk %s of job %s: Redis failed; retrying", chunk_id, job_id)
        raise self.retry(kwargs={"errors": errors + 1, "link": link}, countdown=2**errors)
    except Exception as error:  # noqa: BLE001 - not the rows' fault: stop the job, fail no row
        # A missing key, a bug, a spec from another version: every row would fail the same way and
        # be lost for good. The job stops with the reason; `resume` goes on once it is fixed.
        log.exception("chunk %s of job %s: unexpected error; stopping the job", chunk_id, job_id)
        message = f"a worker failed on chunk {chunk_id}: {type(error).__name__}: {error}"
        runtime().store.fail_job(job_id, message)
        return "job failed"


@app.task(name=TASK_RUN_NEXT, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_next(queue: str) -> str:
    """A slot of `queue` is free: pick the chunk the jobs' fair shares say is next (jobs/state/fair.py)
    and send it by name, ahead of every "pick the next chunk" message (those go at the lowest priority).

    The chunk runs as its own `run_chunk` task, named by its job and chunk in Celery's events and in
    Flower. If this worker dies between the pick and the send, the chunk is stranded (picked, never
    leased): the sweeper sends it again by name.
    """
    rt = runtime()
    picked = rt.store.fair.take(queue, rt.settings.max_priority)  # the fleet's own bound, whatever a spec says
    if picked is None:
        return "no chunk waits"
    ChunkSender(app).send(picked.job_id, picked.chunk_id, queue)
    return f"sent chunk {picked.chunk_id} of job {picked.job_id}"


def _run_carefully(rt: WorkerRuntime, run: ChunkRun, pending: list[RenderedRequest], runs: int) -> int:
    """Run a chunk whose last run died with its worker, so that a row that kills workers is found.

    Every row sent is counted in Redis first. On the second run the rows go together as usual; from
    the third on, one at a time, so each death counts against the one row in flight, and a row in
    flight at `MAX_ROW_STARTS` deaths fails as poison instead of being redelivered forever. One such
    chunk at a time runs in a process: chunks that died together are sent again together, and the
    first row of a bystander would otherwise be in flight at every death its neighbour's poison causes.
    """
    with rt.careful:
        return _run_counted_groups(rt, run, pending, runs)


def _run_counted_groups(rt: WorkerRuntime, run: ChunkRun, pending: list[RenderedRequest], runs: int) -> int:
    groups = [pending] if runs == 2 else [[request] for request in pending]
    committed = 0
    for group in groups:
        if run.lease.lost.is_set() or not run.runnable():
            break  # as `_run_requests` does within a group: the rest stays pending
        starts = run.count_row_starts([request.row for request in group])
        runnable = []
        for request in group:
            if starts[request.row] > MAX_ROW_STARTS:
                message = f"its worker died {starts[request.row] - 1} times while this row was in flight"
                outcome = ItemOutcome.failure(request.row, ErrorKind.worker_lost, message)
                committed += _commit(rt, run, run.job.model, outcome)
            else:
                runnable.append(request)
        if runnable:
            committed += rt.run(_run_requests(rt, run, runnable))
    return committed


def _run_chunk(job_id: str, chunk_id: str, link: int) -> str:
    """The story of one run of a chunk: leased, its pending rows sent and committed, handed rows sent
    on, flushed once complete."""
    rt = runtime()
    try:
        job = rt.spec(job_id)
    except KeyError:
        return "unknown job"
    run = ChunkRun(rt.store, job, chunk_id, link, rt.settings.lease_ttl_s)
    if not run.runnable():
        return "job not runnable"
    if not run.lease.acquire():
        raise _LeasedElsewhere(run.lease.remaining_s() + 0.5)
    try:
        if run.flushed():
            return "already complete"  # a redelivery of a chunk that is done and gone to its shard
        runs, pending = run.begin()
        engine_died = False
        try:
            # A batch's rows never run in the worker: a death there is no row's fault, and one row at a
            # time would send a batch per row.
            if runs > 1 and rt.run(rt.backend(run.model_job)).hold_s is None:
                committed = _run_carefully(rt, run, pending, runs)
            else:
                committed = rt.run(_run_requests(rt, run, pending))
        except FatalJobError as fatal:
            log.error("job %s stopped: %s", job_id, fatal)
            rt.store.fail_job(job_id, str(fatal))
            return "job failed"
        except EngineDied:
            engine_died = True  # as its worker's death: the run stays counted
            raise
        finally:
            # A run that ended on its own (not by a death) is no sign of poison; after a lost lease
            # the count is the new holder's.
            if not engine_died and not run.lease.lost.is_set():
                run.lease.forget_runs()
        _send_handed_rows(run)
        _flush_if_complete(rt, job, chunk_id)
        return f"{committed} committed"
    finally:
        run.lease.release()


def _send_handed_rows(run: ChunkRun) -> None:
    """Send the chunk's rows handed to other queues' models to their workers (rows an earlier run
    handed off too: a run killed before sending them). A message sent twice is harmless: the lease
    lets one run them, and done rows are never sent again."""
    links = run.job.links()
    for other in run.other_links():
        run.sent_to(other)
        ChunkSender(app).send(run.job_id, run.chunk_id, links[other].queue, other)


def _flush_if_complete(rt: WorkerRuntime, job: JobSpec, chunk_id: str) -> None:
    """Move the finished chunk's outcomes to its shard, when this worker sees the job's folder."""
    if not rt.shards_reachable(job):
        return  # another machine without the shared folder: `export` flushes it later
    try:
        flush_chunk(rt.store, job, chunk_id)
    except OSError as error:
        log.warning("could not flush chunk %s of job %s (%s); its outcomes stay in Redis", chunk_id, job.job_id, error)


@worker_shutdown.connect
def _close_backends(**_: object) -> None:
    rt = current_runtime()
    if rt is not None:
        rt.close_backends()
