"""A provider's batch API as a transport: the same requests at half price, answered within 24 hours.

A transport like any other to the request path: `send(call)` returns one row's reply, so retries,
budget, ledger and audit apply unchanged. Behind it, the rows that arrive within `batch_gather_s` (the
chunks this process runs at once) go out together as one batch per job, within the provider's bounds
on requests and bytes, with "INTENT-ROW" as `custom_id`. The batch and its rows are recorded in Redis
the moment the provider names it (jobs/state/batches.py): a run after a kill or a dead worker finds
its rows there and polls that batch instead of sending them again. A poller per batch waits, backing
off from `batch_poll_min_s` to `batch_poll_max_s` with the batch's age (polling draws nothing from the
fleet's rate limit), then streams the results (in any order) to the rows that wait on them.

An errored or expired request is a retryable verdict like any other: the retry layer counts the
attempt and sends the row again, into a later batch, never to the real-time endpoint. A canceled
request (the job was cancelled: its poller cancels the batch) leaves its row pending for a resume.

A job with a deadline goes over to the real-time API once the deadline is near: when the rows it has
left would need, at the real-time limit, all the time until the deadline but `deadline_margin_s`.
From then on no batch is made for it, its batches are cancelled (what they answered first is kept
and paid at the batch price), and each row they did not answer, and each row arriving, is passed
over to the chain's last link, the provider's real-time API, served by api workers under the
fleet's limits (jobs/state/fallback.py).

What differs between providers (how a request line looks, how a batch is made, read, found after a
lost create and cancelled) is a subclass's: anthropic_batch.py, openai_batch.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson
import redis

from promptmill.config.settings import Settings
from promptmill.jobs.state.batches import BatchCounts, BatchIntent
from promptmill.jobs.state.fallback import switch_to_realtime, switched_at
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind, ItemError
from promptmill.workers.backends.base import Call, FatalJobError, RawOutcome, Reply
from promptmill.workers.backends.batch_rows import Arrival, Made, WaitedBatch, Waiter, fail, packed, resolve
from promptmill.workers.retry import Verdict, classify

log = logging.getLogger(__name__)

_UNCLEAR = ("timeout", "dropped")  # a create whose answer was lost: the batch may exist all the same
CLOCK_MARGIN_S = 300.0  # how far the provider's clock may be behind ours when looking for a batch
_CUSTOM_ID_BYTES = 32  # "INTENT-ROW", added to a request's size once its batch is intended
EXPIRED = Verdict(
    ErrorKind.expired, "expired: the batch ended before this request was processed", retryable=True, status="expired"
)
CANCELED = object()  # a result for a request the batch never ran because it was cancelled
_NEAR_CHECK_S = 1.0  # how often a process looks again whether a job's deadline is near


def passed_to_realtime(row: int) -> RawOutcome:
    """A row the batch will not answer before the job's deadline: on to the real-time API."""
    error = ItemError(kind=ErrorKind.server_error, message="passed over: the deadline is near")
    return RawOutcome(row=row, error=error, attempts=0, passed_over=True)


class BatchGone(Exception):
    """The provider knows no such batch."""


@dataclass(frozen=True)
class BatchState:
    """What the provider says of a batch: its status in its own words, its counts, and whether it ended."""

    status: str
    counts: BatchCounts
    ended: bool
    created_at: float | None = None  # epoch seconds
    cancellable: bool = False
    files: dict[str, str] | None = None  # OpenAI's: the output and error files, once written


class ProviderBatchBackend:
    """The batch transport; a subclass says how its provider's batches are made, read and cancelled."""

    label = "a provider's batch API"
    api_error: type[BaseException] = Exception  # what its SDK raises
    max_requests = 100_000
    max_bytes = 250 * 1024 * 1024
    max_in_flight = None  # every row of a chunk goes in at once: the provider schedules the batch
    one_token_budget = False

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        self.settings = settings
        self.hold_s: float | None = settings.batch_hold_s
        self.store = store  # the worker's: where its batches are recorded
        self._arriving: dict[str, list[Arrival]] = {}  # job id -> rows gathered for its next batch
        self._gatherers: dict[str, asyncio.Task] = {}
        self._batches: dict[str, WaitedBatch] = {}  # batch id -> the rows this process waits on in it
        self._pollers: set[asyncio.Task] = set()
        self._creating: dict[str, asyncio.Future[Made | None]] = {}  # intent id -> its create's answer
        self._near: dict[str, tuple[float, bool]] = {}  # job id -> (when looked, its deadline near)

    def limit_scope(self, job: JobSpec) -> None:
        return None  # a batch is not paced by the real-time limits; the API queues what it takes

    # -- what a provider says ----------------------------------------------------------------------

    def request_line(self, call: Call) -> dict[str, Any]:
        """The row's request as the batch API takes it, its `custom_id` left for the batch to set."""
        raise NotImplementedError

    async def create_batch(self, job: JobSpec, intent: BatchIntent, requests: list[dict[str, Any]]) -> Made:
        """Make one batch of these requests, once (no retry of the create itself)."""
        raise NotImplementedError

    async def find_batch(self, intent: BatchIntent) -> Made | None:
        """The provider's batch made of this intent, if one was made; None: none was."""
        raise NotImplementedError

    async def batch_state(self, batch_id: str) -> BatchState:
        """The batch as the provider sees it now (raises BatchGone when it knows no such batch)."""
        raise NotImplementedError

    def batch_results(self, batch: WaitedBatch) -> AsyncIterator[tuple[str, Reply | object]]:
        """An ended batch's results: (custom_id, the row's reply, or CANCELED), in any order."""
        raise NotImplementedError

    async def cancel_batch(self, batch_id: str) -> None:
        raise NotImplementedError

    async def close_client(self) -> None:
        raise NotImplementedError

    def deadline_near(self, job: JobSpec) -> bool:
        """Is the job's deadline near (its rows now go in real time)? Switches the job when it is."""
        if job.deadline_at is None or job.deadline_link is None:
            return False
        looked_at, near = self._near.get(job.job_id, (float("-inf"), False))
        if near or time.monotonic() - looked_at < _NEAR_CHECK_S:
            return near
        near = switched_at(self.store.redis, job.job_id) is not None
        if not near:
            rpm = job.links()[job.deadline_link].limits.rpm or self.settings.deadline_rpm
            needed_s = self.store.status(job.job_id).pending / (rpm / 60)
            near = time.time() >= job.deadline_at - needed_s - self.settings.deadline_margin_s
            if near and switch_to_realtime(self.store.redis, job.job_id):
                log.warning("job %s: its deadline is near (the rows left need %.0fs at %d rpm): they go in real time",
                            job.job_id, needed_s, rpm)  # fmt: skip
        self._near[job.job_id] = (time.monotonic(), near)
        return near

    # -- a row's way in ----------------------------------------------------------------------------

    async def send(self, call: Call) -> Reply | None:
        request = self.request_line(call)  # its custom_id "INTENT-ROW", once the row's batch is intended
        waiter: Waiter = asyncio.get_running_loop().create_future()
        job_id = call.job.job_id
        size = len(orjson.dumps(request)) + _CUSTOM_ID_BYTES
        self._arriving.setdefault(job_id, []).append(Arrival(call, waiter, request, size))
        if job_id not in self._gatherers:
            self._gatherers[job_id] = asyncio.ensure_future(self._gather(call.job))
        return await waiter  # cancelled with the row's task (a lost lease, a chunk's hold ending)

    async def _gather(self, job: JobSpec) -> None:
        """After the gathering window: rows a recorded batch already holds wait on it, rows of a batch
        whose create was never answered wait on it if the provider made it, the rest go out."""
        await asyncio.sleep(self.settings.batch_gather_s)
        self._gatherers.pop(job.job_id, None)
        arrivals = [a for a in self._arriving.pop(job.job_id, []) if not a.waiter.done()]
        if not arrivals:
            return
        try:
            held = self.store.batches.holding(job.job_id, [(a.call.chunk_id, a.call.request.row) for a in arrivals])
        except redis.RedisError as error:  # the chunk retries as on any Redis error
            fail(arrivals, error)
            return
        fresh: list[Arrival] = []
        unanswered: dict[str, list[Arrival]] = {}  # intent -> its rows: the provider's answer to its create was lost
        for arrival in arrivals:
            holder = held.get((arrival.call.chunk_id, arrival.call.request.row))
            if holder is None or holder.attempt != arrival.call.attempt:
                fresh.append(arrival)  # a first attempt, or the next after one that errored or expired
            elif holder.batch_id is not None:
                self._wait_on(job, holder.batch_id, holder.intent, None, arrival)  # sent before a kill: wait on it again
            else:
                unanswered.setdefault(holder.intent, []).append(arrival)
        try:
            if fresh and self.deadline_near(job):  # no batch now: they go in real time
                for arrival in fresh:
                    arrival.waiter.set_result(passed_to_realtime(arrival.call.request.row))
                fresh = []
            for intent_id, group in unanswered.items():
                await self._look_for(job, intent_id, group)
            for group in packed(fresh, self.max_requests, self.max_bytes):
                await self._create(job, group)
        except Exception as error:  # noqa: BLE001 - the rows' tasks must not wait forever on a dead gatherer
            fail(arrivals, error)  # a Redis error: the chunk retries; anything else stops the job
            raise

    async def _create(self, job: JobSpec, group: list[Arrival]) -> None:
        """One batch of these rows, created once: intended in Redis first, created without the SDK's
        retries, and after an unclear failure looked for before anything is sent again."""
        intent = BatchIntent(intent_id=secrets.token_hex(6), at=time.time(), requests=len(group))
        attempts: dict[str, dict[int, int]] = {}
        for arrival in group:
            arrival.request["custom_id"] = f"{intent.intent_id}-{arrival.call.request.row}"
            attempts.setdefault(arrival.call.chunk_id, {})[arrival.call.request.row] = arrival.call.attempt
        try:
            self.store.batches.intend(job.job_id, intent, attempts)
        except redis.RedisError as error:
            fail(group, error)
            return
        # Another run of these rows in this process (after a chunk's hold) waits on this answer.
        creating = self._creating[intent.intent_id] = asyncio.get_running_loop().create_future()
        made: Made | None = None
        try:
            try:
                made = await self.create_batch(job, intent, [arrival.request for arrival in group])
            except self.api_error as error:
                verdict = classify(error)
                if verdict.status not in _UNCLEAR and not verdict.server_failure:
                    self._unmade(job, intent, group, verdict)  # refused: no batch was made
                    return
                log.warning("job %s: creating a batch failed (%s); looking for it before sending its rows again",
                            job.job_id, error)  # fmt: skip
                made = await self._find(job, intent.intent_id, group, verdict)
                return
            self._made(job, intent, made, group)
        finally:
            creating.set_result(made)
            self._creating.pop(intent.intent_id, None)

    async def _look_for(self, job: JobSpec, intent_id: str, group: list[Arrival]) -> None:
        """Rows of an intent whose batch is not recorded: if its create is on its way in this process
        (these rows' earlier run ended its hold meanwhile), its answer tells; else it was lost (a
        worker killed before it recorded the batch): the batch is looked for."""
        if intent_id not in self._creating:
            await self._find(job, intent_id, group)
            return
        made = await asyncio.shield(self._creating[intent_id])
        if made is None:  # no batch was made: the rows go in a new one
            for batch_rows in packed(group, self.max_requests, self.max_bytes):
                await self._create(job, batch_rows)
            return
        for arrival in group:
            self._wait_on(job, made.batch_id, intent_id, made.created_at, arrival)

    async def _find(
        self, job: JobSpec, intent_id: str, group: list[Arrival], failed: Verdict | None = None
    ) -> Made | None:
        """The provider's answer to the intent's create was lost: wait on the batch it made, if it made
        one; else the rows' attempt failed (`failed`), or, after a kill, their next run sends them anew."""
        intent = self.store.batches.intent(job.job_id, intent_id)
        if intent is None:  # its record is gone (the job's keys were deleted): nothing to look for
            resolve(group, failed)
            return None
        try:
            found = await self._made_of(intent)
        except self.api_error as error:
            # Unknown still: sending again could pay twice. The rows stay pending; the chunk's next
            # run (after its hold) looks again.
            log.warning("job %s: looking for batch of intent %s failed (%s)", job.job_id, intent_id, error)
            resolve(group, None)
            return None
        if found is None:
            if failed is None:
                self.store.batches.unmade(job.job_id, intent)
                for batch_rows in packed(group, self.max_requests, self.max_bytes):
                    await self._create(job, batch_rows)
            else:
                self._unmade(job, intent, group, failed)
            return None
        log.info("job %s: found batch %s, made of intent %s", job.job_id, found.batch_id, intent_id)
        self._made(job, intent, found, group)
        return found

    async def _made_of(self, intent: BatchIntent) -> Made | None:
        """The provider's batch made of this intent, and no other job's of this fleet."""
        # This process's creates on their way are let finish first: each of their batches is then
        # recorded as its own before the provider's list is read, and never taken for another's.
        others = [future for intent_id, future in self._creating.items() if intent_id != intent.intent_id]
        if others:
            await asyncio.wait([asyncio.shield(future) for future in others])
        return await self.find_batch(intent)

    def _made(self, job: JobSpec, intent: BatchIntent, made: Made, group: list[Arrival]) -> None:
        try:
            self.store.batches.record(job.job_id, intent, made.batch_id, made.created_at)
        except redis.RedisError:  # the batch is paid for: wait on it all the same
            log.exception("job %s: could not record batch %s; a run after a kill looks for it again", job.job_id, made.batch_id)
        log.info("job %s: batch %s with %d requests", job.job_id, made.batch_id, len(group))
        for arrival in group:
            self._wait_on(job, made.batch_id, intent.intent_id, made.created_at, arrival, fresh=True)

    def _unmade(self, job: JobSpec, intent: BatchIntent, group: list[Arrival], verdict: Verdict) -> None:
        """No batch was made of the intent: each row's attempt failed (the retry layer decides on each)."""
        try:
            self.store.batches.unmade(job.job_id, intent)
        except redis.RedisError:
            pass  # its rows' next attempt does not match the intent's: they go in a new batch all the same
        resolve(group, verdict)

    def _wait_on(
        self, job: JobSpec, batch_id: str, intent: str | None, created_at: float | None, arrival: Arrival,
        fresh: bool = False,
    ) -> None:
        batch = self._batches.get(batch_id)
        if batch is None:
            batch = self._batches[batch_id] = WaitedBatch(batch_id, job, created_at or time.time(), intent)
            poller = asyncio.ensure_future(self._poll(batch, first_wait=fresh))
            self._pollers.add(poller)
            poller.add_done_callback(self._pollers.discard)
        batch.wait(arrival.call.request.row, arrival.call.chunk_id, arrival.waiter)

    # -- a batch's way back ------------------------------------------------------------------------

    def _interval_s(self, batch: WaitedBatch) -> float:
        """From the shortest wait to the longest as the batch ages: most end within the hour."""
        age_s = max(0.0, time.time() - batch.created_at)
        return min(self.settings.batch_poll_max_s, max(self.settings.batch_poll_min_s, age_s / 6))

    async def _poll(self, batch: WaitedBatch, first_wait: bool) -> None:
        job_id = batch.job.job_id
        try:
            wait = first_wait
            while batch.waiting():
                if wait:
                    await asyncio.sleep(self._interval_s(batch))
                wait = True
                try:
                    state = await self.batch_state(batch.batch_id)
                except BatchGone:
                    gone = Verdict(ErrorKind.server_error, f"batch {batch.batch_id} is gone", retryable=True, status=404)
                    batch.resolve_rest(gone)
                    return
                except self.api_error as error:
                    log.warning("job %s: polling batch %s failed (%s); polling on", job_id, batch.batch_id, error)
                    continue
                batch.created_at = state.created_at or batch.created_at
                try:
                    self.store.batches.update(job_id, batch.batch_id, state.status, state.counts, state.files)
                    if state.ended:
                        await self._read_results(batch)
                        return
                    if state.cancellable and not batch.cancel_sent and not self.store.is_runnable(job_id):
                        batch.cancel_sent = True  # the job was cancelled: so is its batch (answers so far are kept)
                        await self._cancel(batch.batch_id)
                    elif state.cancellable and not batch.cancel_sent and self.deadline_near(batch.job):
                        batch.cancel_sent = batch.for_deadline = True  # what it did not answer goes in real time
                        await self._cancel(batch.batch_id)
                except (self.api_error, redis.RedisError) as error:
                    # A Redis restart, a failed read: the rows read so far are answered, the rest at the next try.
                    log.warning("job %s: batch %s: %s; polling on", job_id, batch.batch_id, error)
        except Exception as error:  # noqa: BLE001 - the rows' tasks must not wait forever on a dead poller
            # Sending the rows again could pay for them twice: the job stops, and `resume` polls again.
            log.exception("job %s: batch %s: polling stopped", job_id, batch.batch_id)
            stop = FatalJobError(f"polling batch {batch.batch_id} failed: {type(error).__name__}: {error}")
            for waiter in batch.waiters.values():
                if not waiter.done():
                    waiter.set_exception(stop)
        finally:
            self._batches.pop(batch.batch_id, None)

    async def _cancel(self, batch_id: str) -> None:
        try:
            await self.cancel_batch(batch_id)
        except self.api_error as error:
            log.warning("cancelling batch %s failed: %s", batch_id, error)

    async def _read_results(self, batch: WaitedBatch) -> None:
        job = batch.job
        seen = ours = 0
        async for custom_id, reply in self.batch_results(batch):
            row = batch.row_of(custom_id)
            seen, ours = seen + 1, ours + (row is not None)
            if row is None or row in batch.results:
                continue  # another intent's row (not this batch's), or one read already
            if reply is CANCELED:  # never processed, never billed; a resume sends the row in a new batch
                if row in batch.chunk_of:
                    self.store.batches.forget_row(job.job_id, batch.chunk_of[row], row)
                batch.answer(row, passed_to_realtime(row) if batch.for_deadline or self.deadline_near(job) else None)
            else:
                if isinstance(reply, RawOutcome):
                    reply.row = row
                batch.answer(row, reply)
        if seen and not ours:  # taken after a lost create, and another's: its rows go in a batch of their own
            log.warning("job %s: batch %s holds none of its rows; dropped", job.job_id, batch.batch_id)
            self.store.batches.disown(job.job_id, batch.batch_id, batch.intent)
            batch.resolve_rest(None)  # type: ignore[arg-type]  # their next run looks for the intent's own batch
            return
        missing = Verdict(ErrorKind.server_error, f"batch {batch.batch_id} returned no result", retryable=True, status=500)
        batch.resolve_rest(missing)

    async def close(self) -> None:
        for task in [*self._gatherers.values(), *self._pollers]:
            task.cancel()
        await self.close_client()
