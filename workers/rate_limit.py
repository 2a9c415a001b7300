"""The fleet's rate limiter: one set of buckets in Redis per provider account and model, shared by
every worker process on every machine.

Three budgets, as Anthropic counts them: requests, input tokens (uncached input plus cache writes)
and output tokens per minute. One Lua script (jobs/state/limits.py) grants a request only when all three allow it; input is
estimated before sending and output reserved at `max_tokens`, and the difference is given back when
the real usage is known. The same script learns the account's limits from the `anthropic-ratelimit-*`
headers, pauses every worker's grants until a 429's `retry-after`, and opens a circuit breaker when
most recent requests fail with 5xx or 529.

In a process, one granter task per (account, model, limits) batches every waiting request into one
script call, so the fleet pays one Redis round trip per batch, not per request; `aiolimiter` then
spreads each batch over a tenth of a second so a process never bursts above the fleet's rate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import redis
from aiolimiter import AsyncLimiter

from promptmill.jobs.state.keys import LIMIT_PAUSE, limiter_key
from promptmill.jobs.state.limits import LIMIT, LimitCall
from promptmill.pipelines.spec import RateLimits
from promptmill.workers.limit_signals import LimitHeaders

log = logging.getLogger(__name__)

BURST_S = 1.0  # each bucket holds this many seconds of its limit: small, so the fleet never bursts
UNKNOWN_RPM = 50  # the pace before the first response tells the limits (Anthropic's lowest tier)
MAX_BATCH = 256
_MAX_SLEEP_S = 0.25  # a waiting granter looks again at least this often (a pause may have ended)
_REPORT_DELAY_S = 0.02  # refunds with no one waiting are sent this late, to batch them

@dataclass
class _Report:
    """What happened since the last script call, sent with the next one."""

    refund: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    ok: int = 0
    failed: int = 0
    rate_limited: int = 0
    pause_ms: int = 0
    headers: LimitHeaders | None = None
    headers_age_ms: int = 0

    def pending(self) -> bool:
        return bool(any(self.refund) or self.ok or self.failed or self.rate_limited or self.pause_ms or self.headers)


@dataclass(frozen=True)
class Grant:
    """One request's charge: what to give back once its real usage is known."""

    input_tokens: int
    output_tokens: int


class FleetLimiter:
    """This process's door to the fleet's buckets for one account, model and set of job limits."""

    def __init__(
        self,
        client: redis.Redis,
        scope: str,
        limits: RateLimits,
        burst_s: float = BURST_S,
        clock: Callable[[], float] | None = None,
    ):
        self._client = client
        self._script = client.register_script(LIMIT)
        self._clock = clock  # seconds; None: Redis's clock, the one every machine of the fleet shares
        self.scope = scope
        self._key = limiter_key(scope)
        self.limits = limits
        self.burst_s = burst_s
        self._waiters: collections.deque[tuple[asyncio.Future, int, int]] = collections.deque()
        self._report = _Report()
        self._wake = asyncio.Event()
        self._granter: asyncio.Task | None = None
        self._smoother: AsyncLimiter | None = None
        self.effective: tuple[float | None, float | None, float | None] = (UNKNOWN_RPM, None, None)
        self.learned: tuple[int, int, int] = (0, 0, 0)  # what this process last read in the provider's headers

    # -- what requests call ---------------------------------------------------------------------

    async def acquire(self, input_tokens: int, output_tokens: int) -> Grant:
        """Wait until the fleet's buckets allow one request of these costs, and charge it."""
        if self._granter is None or self._granter.done():
            self._granter = asyncio.ensure_future(self._grant_forever())
        granted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append((granted, input_tokens, output_tokens))
        self._wake.set()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._refund(1, input_tokens, output_tokens)  # granted just as we gave up
            raise
        if self._smoother is not None:
            await self._smoother.acquire()
        return Grant(input_tokens, output_tokens)

    def settle(self, grant: Grant, input_tokens: int | None, output_tokens: int | None) -> None:
        """Correct a grant's charge by its real usage; None = the request used nothing."""
        used_in = 0 if input_tokens is None else input_tokens
        used_out = 0 if output_tokens is None else output_tokens
        self._refund(0, grant.input_tokens - used_in, grant.output_tokens - used_out)

    def record(self, *, ok: bool = False, server_failure: bool = False) -> None:
        self._report.ok += int(ok)
        self._report.failed += int(server_failure)
        self._wake.set()

    def rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: every worker in the fleet waits until the provider's retry time."""
        self._report.rate_limited += 1
        pause_ms = int(1000 * (retry_after_s if retry_after_s is not None else 1.0))
        self._report.pause_ms = max(self._report.pause_ms, pause_ms)
        self._wake.set()

    def observe(self, said: LimitHeaders | None, age_s: float) -> None:
        """What a response said of the limits (None: no response came), `age_s` after it was sent."""
        if said is None:
            return
        if not said.said_anything:
            if self._report.headers is None:
                # A response without limit headers still tells us the account answers: stop probing.
                self._report.headers = LimitHeaders()
            return
        self._report.headers = said
        self.learned = said.limits
        self._report.headers_age_ms = int(age_s * 1000)
        if said.exhausted_for_s:  # the provider said a budget is spent until then: the fleet waits
            self._report.pause_ms = max(self._report.pause_ms, int(said.exhausted_for_s * 1000))
        self._wake.set()

    def paused_for_s(self) -> float:
        """How long the whole fleet still holds this limit's requests (a 429's pause, an open breaker)."""
        until_ms = float(self._client.hget(self._key, LIMIT_PAUSE) or 0)
        now_ms = time.time() * 1000 if self._clock is None else self._clock() * 1000
        return max(0.0, (until_ms - now_ms) / 1000)

    def close(self) -> None:
        if self._granter is not None:
            self._granter.cancel()

    # -- the granter ----------------------------------------------------------------------------

    def _refund(self, requests: int, input_tokens: float, output_tokens: float) -> None:
        refund = self._report.refund
        refund[0] += requests
        refund[1] += input_tokens
        refund[2] += output_tokens
        self._wake.set()

    async def _grant_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiters and self._waiters[0][0].done():
                self._waiters.popleft()  # its request was cancelled
            if not self._waiters:
                if self._report.pending():
                    await asyncio.sleep(_REPORT_DELAY_S)
                    if not self._waiters:
                        await self._call_or_wait([])
                continue
            batch = [waiter for waiter in list(self._waiters)[:MAX_BATCH] if not waiter[0].done()]
            answer = await self._call_or_wait([(cost_in, cost_out) for _, cost_in, cost_out in batch])
            if answer is None:
                continue
            granted, wait_ms = answer
            for future, cost_in, cost_out in batch[:granted]:
                self._waiters.remove((future, cost_in, cost_out))
                if future.done():
                    self._refund(1, cost_in, cost_out)
                else:
                    future.set_result(None)
            if granted < len(batch):
                await asyncio.sleep(min(wait_ms / 1000, _MAX_SLEEP_S))
            self._wake.set()

    async def _call_or_wait(self, costs: list[tuple[int, int]]) -> tuple[int, int] | None:
        try:
            return self.try_grant(costs)
        except redis.RedisError as error:
            log.warning("the fleet's rate limiter is unreachable (%s); trying again", error)
            await asyncio.sleep(_MAX_SLEEP_S)
            self._wake.set()
            return None

    def try_grant(self, costs: list[tuple[int, int]]) -> tuple[int, int]:
        """One script call: report what happened since the last, and grant what fits now, in order.
        Returns (granted, ms to wait before the first one not granted could be)."""
        report, self._report = self._report, _Report()
        headers = report.headers
        call = LimitCall(
            configured=(self.limits.rpm or 0, self.limits.input_tpm or 0, self.limits.output_tpm or 0),
            burst_ms=int(self.burst_s * 1000), unknown_rpm=UNKNOWN_RPM, refund=tuple(report.refund),  # type: ignore[arg-type]
            ok=report.ok, failed=report.failed, rate_limited=report.rate_limited, pause_ms=report.pause_ms,
            observed=headers is not None, named=headers.limits if headers else (0, 0, 0),
            remaining=headers.remaining if headers else (-1, -1, -1), observed_age_ms=report.headers_age_ms,
            now_ms=0 if self._clock is None else int(self._clock() * 1000), costs=costs,
        )  # fmt: skip
        try:
            granted, wait_ms, eff_r, eff_i, eff_o = self._script(keys=[self._key], args=call.args())
        except redis.RedisError:
            self._merge_back(report)
            raise
        self.effective = tuple(None if float(e) < 0 else float(e) for e in (eff_r, eff_i, eff_o))  # type: ignore[assignment]
        self._pace(self.effective[0])
        return int(granted), int(float(wait_ms))

    def _merge_back(self, report: _Report) -> None:
        """A failed call's report is not lost: it goes with the next call."""
        current = self._report
        current.refund = [a + b for a, b in zip(current.refund, report.refund)]
        current.ok += report.ok
        current.failed += report.failed
        current.rate_limited += report.rate_limited
        current.pause_ms = max(current.pause_ms, report.pause_ms)
        current.headers = current.headers or report.headers

    def _pace(self, rpm: float | None) -> None:
        if rpm is None:
            self._smoother = None
            return
        per_tenth = max(1.0, rpm / 600)
        if self._smoother is None or not math.isclose(self._smoother.max_rate, per_tenth):
            self._smoother = AsyncLimiter(per_tenth, 0.1)

    @property
    def request_rate_per_s(self) -> float | None:
        rpm = self.effective[0]
        return None if rpm is None else rpm / 60
