"""The request path: every layer a request passes through on its way to a backend, composed once.

Read from the outside in, as a request travels (dramatiq's middleware is the model):

    Audit        the row's start and end times, its model, the attempts it took
    Retry        attempt after attempt: backoff, the attempts log, a job-fatal refusal stops the job
    Concurrency  a slot among the process's requests in flight, adapted to the provider's latency
    Budget       the request's most possible cost held against the job's cap, then settled
    Ledger       the name the answer is priced under (a long-context rate, a batch's discount)
    Limit        a grant from the fleet's rate limiter; the answer's headers and usage go back to it
    Gate         shut when the chunk stops: nothing more is sent, what was sent finishes
    backend      the transport: one attempt, one reply

Every backend gets every layer that applies to it; one that does not (no fleet limit for a local
engine, no budget hold for a job without a cap) is left out of its path, so no request pays for it.
`fan_out` sends a chunk's requests down the path at once and hands back each outcome as it
finishes: the one fan-out loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.budget import BudgetStore
from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.items import AttemptError, ErrorKind, ItemError, RenderedRequest, Usage
from promptmill.workers.backends.base import Backend, Call, FatalJobError, RawOutcome, Reply
from promptmill.workers.concurrency import AdaptiveConcurrency
from promptmill.workers.limit_signals import InputTokenEstimate
from promptmill.workers.rate_limit import FleetLimiter
from promptmill.workers.retry import Verdict, backoff_s

# What a layer hands the request to; None: not sent (the job's budget could not hold it).
Send = Callable[[Call], Awaitable[Reply | None]]


class Layer(Protocol):
    async def __call__(self, call: Call, send: Send) -> Reply | None: ...


class AttemptLog(Protocol):
    """Failed attempts per row, kept outside the process so a resumed row does not start afresh."""

    def prior(self, row: int) -> int: ...

    def failed(self, row: int, cost: "Billed | None" = None) -> None:
        """Count a failed attempt of the row, with what the provider billed for it (a broken stream)."""
        ...


class ChunkAttemptLog(AttemptLog, Protocol):
    def for_model(self, model: str, first: bool) -> AttemptLog:
        """The log of a fallback chain's model: its own count of a row's attempts (the first model's
        goes on from the row's), its failed attempts in the ledger under its name."""
        ...


@dataclass(frozen=True)
class Billed:
    """What a reply cost: its usage and the name the ledger prices it under."""

    ledger_model: str
    usage: Usage


def billed(reply: Reply | None) -> Billed | None:
    """The usage a reply was billed for, once the ledger layer has named its price: an answer's, or a
    failed attempt's that the provider billed anyway (a stream broken off mid-answer)."""
    if reply is None or reply.ledger_model is None or reply.usage is None:
        return None
    return Billed(reply.ledger_model, reply.usage)


@dataclass
class Audit:
    async def __call__(self, call: Call, send: Send) -> Reply | None:
        started_at = time.time()
        reply = await send(call)
        if isinstance(reply, RawOutcome):
            reply.row = call.request.row
            reply.started_at = reply.started_at or started_at
            reply.finished_at = time.time()
        return reply


@dataclass
class Retry:
    attempts: AttemptLog
    settings: Settings
    label: str

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        call.attempt = self.attempts.prior(call.request.row)
        errors: list[AttemptError] = []
        while True:
            call.attempt += 1
            reply = await send(call)
            if reply is None:
                return None  # the row stays pending: a resume with a higher budget sends it
            if isinstance(reply, RawOutcome):
                reply.attempts = call.attempt if reply.attempts is None else reply.attempts
                reply.errors = errors + reply.errors
                return reply
            verdict = reply
            if verdict.fatal_for_job:
                raise FatalJobError(f"{self.label} refused the job: {verdict.message}")
            self.attempts.failed(call.request.row, billed(verdict))
            errors.append(AttemptError(status=verdict.status, message=verdict.message))
            if not verdict.retryable or call.attempt >= (1 if call.probe else call.job.max_attempts):
                error = ItemError(kind=verdict.kind, message=verdict.final_message(call.attempt))
                return RawOutcome(row=call.request.row, error=error, attempts=call.attempt, errors=errors)
            settings = self.settings
            await asyncio.sleep(backoff_s(call.attempt, settings.backoff_base_s, settings.backoff_cap_s, verdict.retry_after_s))


@dataclass
class Concurrency:
    slots: AdaptiveConcurrency
    limiter: FleetLimiter | None

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        # Held inside a slot, the budget holds what is in flight, not every row waiting.
        async with self.slots:
            reply = await send(call)
        if isinstance(reply, RawOutcome) and reply.error is None and reply.latency_ms is not None:
            rate = self.limiter.request_rate_per_s if self.limiter is not None else None
            self.slots.observe(reply.latency_ms / 1000, rate)
        return reply


@dataclass
class Budget:
    budgets: BudgetStore
    prices: PriceTable
    estimate: InputTokenEstimate
    suffix: str = ""  # the backend's ledger suffix: a batch's worst case is at batch prices

    def _worst_case_micro_usd(self, call: Call) -> int:
        """The input estimated from characters (with a quarter's margin) at the dearer of the input
        and cache-write prices, the output at `max_tokens`."""
        input_tokens = math.ceil(self.estimate.estimate(call.chars) * 1.25)
        price = self.prices.price_for(self.prices.ledger_model(call.job.model, input_tokens) + self.suffix)
        worst = max(price.input, price.cache_write_5m, price.cache_write_1h) * input_tokens
        worst += price.output * call.job.pipeline.max_tokens
        return math.ceil(worst)  # USD per million tokens x tokens = micro-USD

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        job_id = call.job.job_id
        held = self._worst_case_micro_usd(call)
        if not self.budgets.hold(job_id, held):
            return None
        spent = 0
        try:
            reply = await send(call)
            if (cost := billed(reply)) is not None:
                price = self.prices.price_for(cost.ledger_model)
                spent = round(price.cost_usd(**cost.usage.token_counts()) * 1_000_000)
            return reply
        finally:
            self.budgets.settle(job_id, held, spent)


@dataclass
class Ledger:
    prices: PriceTable
    per_token: bool
    suffix: str = ""  # "@batch": billed at the batch discount, and shown apart

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        reply = await send(call)
        if reply is None or reply.usage is None:
            return reply
        model = call.job.model
        if self.per_token:
            model = self.prices.ledger_model(model, reply.usage.prompt_tokens)
        if isinstance(reply, Verdict):  # a failed attempt billed all the same
            return dataclasses.replace(reply, ledger_model=model + self.suffix)
        reply.ledger_model = model + self.suffix
        return reply


@dataclass
class Limit:
    limiter: FleetLimiter
    estimate: InputTokenEstimate
    backend: Backend
    # Told of each request sent (the job's pace): how long the limiter held it, whether it was a 429,
    # whether it was the provider's failure (as the breaker counts it), and the requests-per-minute
    # limit in force.
    seen: Callable[[float, bool, bool, float | None], None] | None = None

    def _charge(self, input_tokens: int, output_tokens: int, max_tokens: int) -> tuple[int, int]:
        if self.backend.one_token_budget:
            return input_tokens + max_tokens, 0
        return input_tokens, output_tokens

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        limiter = self.limiter
        max_tokens = call.job.pipeline.max_tokens
        # Output is reserved at max_tokens, and given back once the answer says what it used.
        asked = time.monotonic()
        grant = await limiter.acquire(*self._charge(self.estimate.estimate(call.chars), max_tokens, max_tokens))
        started = time.monotonic()
        reply = await send(call)
        age_s = time.monotonic() - started
        if self.seen is not None and reply is not None:
            failed = reply if isinstance(reply, Verdict) else None
            self.seen(started - asked, failed is not None and failed.kind is ErrorKind.rate_limited,
                      failed is not None and failed.server_failure, limiter.effective[0])  # fmt: skip
        if isinstance(reply, Verdict):
            limiter.observe(reply.limits, age_s)
            if reply.usage is not None:  # broken off mid-answer: what it used is known
                used = reply.usage
                limiter.settle(grant, *self._charge(self.backend.limited_input(used), used.output_tokens, max_tokens))
            elif reply.kind is ErrorKind.timeout:
                limiter.settle(grant, grant.input_tokens, grant.output_tokens)  # it may have been served
            else:
                limiter.settle(grant, None, None)
            if reply.kind is ErrorKind.rate_limited:
                limiter.rate_limited(reply.retry_after_s)
            else:
                limiter.record(server_failure=reply.server_failure)
            return reply
        if reply is None or reply.error is not None:
            limiter.settle(grant, None, None)
            return reply
        limiter.observe(reply.limits, age_s)
        usage = reply.usage
        charged_input = self.backend.limited_input(usage)
        limiter.settle(grant, *self._charge(charged_input, usage.output_tokens, max_tokens))
        limiter.record(ok=True)
        self.estimate.learn(call.chars, charged_input)
        return reply


@dataclass
class Gate:
    """The innermost layer: closed when the chunk must stop (its job cancelled, its lease lost). A
    request not yet sent is not sent (its row stays pending); one already sent finishes and its
    answer is committed, since it is paid for."""

    closed: bool = False

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        if self.closed:
            return None
        return await send(call)


def compose(layers: list[Layer], backend: Backend) -> Send:
    """The layers, outermost first, around the backend's `send`. A layer is bound to the next by
    `partial` (no frame of its own): every frame is paid on each of a request's awaits."""
    path: Send = backend.send
    for layer in reversed(layers):
        path = functools.partial(layer, send=path)
    return path


async def fan_out(
    path: Send, job: JobSpec, chunk_id: str, requests: list[RenderedRequest]
) -> AsyncIterator[RawOutcome]:
    """Send every request down the path at once; yield each row's outcome as it finishes.

    Closing the aiter early (a dead engine, a chunk's hold ending) cancels what is still in flight:
    those rows stay pending for the next run. A chunk that stops sending closes its Gate instead.
    """

    async def one(request: RenderedRequest) -> RawOutcome | None:
        reply = await path(Call(job, request, chunk_id))
        assert not isinstance(reply, Verdict), "the retry layer turns every verdict into an outcome"
        return reply

    tasks = [asyncio.ensure_future(one(request)) for request in requests]
    try:
        for finished in asyncio.as_completed(tasks):
            outcome = await finished
            if outcome is not None:
                yield outcome
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
