"""The layers of the request path, one class each (workers/request_path.py composes them, in order).

A layer takes a `Call` and the next layer's `Send`, and returns what came back: a `RawOutcome`, a
`Verdict` (a classified failure the retry layer decides on), or None (not sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.state.budget import BudgetStore
from promptmill.jobs.state.fallback import FallbackState
from promptmill.jobs.state.outage import OutageClock
from promptmill.jobs.state.pace import RequestSeen
from promptmill.pipelines.items import AttemptError, ErrorKind, ItemError, Usage
from promptmill.workers.backends.base import Backend, Call, FatalJobError, RawOutcome, Reply
from promptmill.workers.concurrency import AdaptiveConcurrency
from promptmill.workers.limit_signals import InputTokenEstimate
from promptmill.workers.metrics import Gathered
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
    outage: OutageClock | None = None  # None: connection failures count as any other (a chain, an engine)

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        call.attempt = self.attempts.prior(call.request.row)
        errors: list[AttemptError] = []
        failing_since: float | None = None  # this row's first connection failure
        while True:
            call.attempt += 1
            reply = await send(call)
            if reply is None:
                return None  # the row stays pending: a resume with a higher budget sends it
            unreachable = isinstance(reply, Verdict) and reply.kind is ErrorKind.connection_error
            if self.outage is not None and not unreachable:
                self.outage.answered()
            if isinstance(reply, RawOutcome):
                reply.attempts = call.attempt if reply.attempts is None else reply.attempts
                reply.errors = errors + reply.errors
                return reply
            verdict = reply
            if verdict.fatal_for_job:
                raise FatalJobError(f"{self.label} refused the job: {verdict.message}")
            exhausted = not verdict.retryable or call.attempt >= (1 if call.probe else call.job.max_attempts)
            if unreachable and self.outage is not None:
                failing_since = failing_since or time.time()
                outage = self.outage.failed()
                if outage.lasted_s >= self.settings.outage_pause_s:
                    self.outage.pause(
                        f"outage: no answer from {self.label} for {outage.lasted_s:.0f}s "
                        f"(PROMPTMILL_OUTAGE_PAUSE_S), the last error: {verdict.message}; `promptmill resume {call.job.job_id}` goes on"
                    )
                    return None  # the row stays pending, its attempts as they were
                if exhausted and outage.answered_at < failing_since:
                    # Nothing has answered since this row began failing: an outage, not the row's fault.
                    # The row waits without spending its attempts, until an answer comes or the job pauses.
                    call.attempt -= 1
                    await asyncio.sleep(self.settings.backoff_cap_s)
                    continue
            self.attempts.failed(call.request.row, billed(verdict))
            errors.append(AttemptError(status=verdict.status, message=verdict.message))
            if exhausted:
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
        and cache-write prices, the output at the row's `max_tokens`."""
        input_tokens = math.ceil(self.estimate.estimate(call.chars) * 1.25) + call.file_tokens
        price = self.prices.price_for(self.prices.ledger_model(call.job.model, input_tokens) + self.suffix)
        worst = max(price.input, price.cache_write_5m, price.cache_write_1h) * input_tokens
        worst += price.output * call.max_tokens
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
    seen: Callable[[RequestSeen], None] | None = None  # told of each request sent

    def _charge(self, input_tokens: int, output_tokens: int, max_tokens: int) -> tuple[int, int]:
        if self.backend.one_token_budget:
            return input_tokens + max_tokens, 0
        return input_tokens, output_tokens

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        limiter = self.limiter
        max_tokens = call.max_tokens
        # Output is reserved at max_tokens, and given back once the answer says what it used.
        asked = time.monotonic()
        grant = await limiter.acquire(*self._charge(self.estimate.estimate(call.chars) + call.file_tokens, max_tokens, max_tokens))
        started = time.monotonic()
        reply = await send(call)
        age_s = time.monotonic() - started
        if self.seen is not None and reply is not None:
            failed = reply if isinstance(reply, Verdict) else None
            self.seen(RequestSeen(
                held_s=started - asked, rate_limited=failed is not None and failed.kind is ErrorKind.rate_limited,
                server_failure=failed is not None and failed.server_failure, rpm=limiter.effective[0],
            ))  # fmt: skip
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
        if not call.request.attachments:  # a file's tokens are not its text's: they would skew the ratio
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


@dataclass
class Health:
    """A layer right inside Retry on each model's path: every attempt's outcome, told to the fleet."""

    state: FallbackState
    link: int

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        reply = await send(call)
        if isinstance(reply, Verdict):
            if reply.server_failure or reply.kind is ErrorKind.model_not_found:
                self.state.failed(self.link)
        elif isinstance(reply, RawOutcome) and reply.error is None:
            self.state.succeeded(self.link)
        return reply


@dataclass
class OnWire:
    """The innermost layer but the Gate on a chain's model: marks the call while an attempt is on
    the wire, the one time a row may not be taken off a model the fleet has left (it is paid for),
    and counts what was sent, for the record of a row taken off between attempts."""

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        call.on_wire = True
        call.wire_attempts += 1
        try:
            reply = await send(call)
        finally:
            call.on_wire = False
        if isinstance(reply, Verdict):
            call.wire_errors.append(AttemptError(status=reply.status, message=reply.message))
        return reply


@dataclass
class Measure:
    """The innermost layer but the Gate: each request sent, counted when its reply comes, into the
    process's gathered metrics for the job's model (workers/metrics.py writes them out)."""

    gathered: Gathered

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        gathered = self.gathered
        gathered.in_flight += 1
        try:
            reply = await send(call)
        finally:
            gathered.in_flight -= 1
        if reply is None:
            return None  # not sent (the gate closed)
        if isinstance(reply, Verdict):
            # Broken off mid-answer, a failed attempt is billed for what it said.
            gathered.request(str(reply.status), reply.usage)
        elif reply.error is not None:  # refused by the engine, or a batch request's error
            gathered.request(str(reply.errors[-1].status) if reply.errors else "engine_error", None)
        else:
            gathered.request("200", reply.usage, reply.latency_ms, reply.ttft_ms)
        return reply
