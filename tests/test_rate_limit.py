"""The fleet's limiter script on a real Redis, on a clock the test moves: three budgets, refunds,
learned limits, fleet-wide pauses, the circuit breaker, and many clients drawing on one set of
buckets. No assertion depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from promptmill.jobs.state.keys import LIMIT_BREAKER_TRIPS, LIMIT_GRANTED, LIMIT_RATE_LIMITED
from promptmill.jobs.state.limits import LimitStore
from promptmill.pipelines.spec import RateLimits
from promptmill.workers.limit_signals import LimitHeaders
from promptmill.workers.rate_limit import (
    BURST_S,
    UNKNOWN_RPM,
    FleetLimiter,
    Grant,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0  # seconds

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(redis_url: str, scope: str, clock: FakeClock, **limits: int) -> FleetLimiter:
    return FleetLimiter(redis.Redis.from_url(redis_url), scope, RateLimits(**limits), clock=clock)


def gate_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def new_scope() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"


def granted_over(gate: FleetLimiter, clock: FakeClock, seconds: float, cost: tuple[int, int], step_s: float = 0.1) -> int:
    """Ask for as much as fits at every step of the virtual clock; how many were granted in all."""
    granted = 0
    for _ in range(round(seconds / step_s) + 1):
        granted += gate.try_grant([cost] * 50)[0]
        clock.advance(step_s)
    return granted


def test_the_request_budget_grants_a_full_bucket_then_its_rate(redis_url, clock):
    # 600 a minute = 10 a second, in a bucket of BURST_S seconds.
    gate = limiter(redis_url, new_scope(), clock, rpm=600)
    burst = round(10 * BURST_S)
    assert gate.try_grant([(1, 1)] * 50)[0] == burst
    granted = granted_over(gate, clock, 60.0, (1, 1))
    assert 600 - 1 <= granted <= 600 + 1  # the rate, once the bucket is spent
    state = LimitStore(gate_client(redis_url)).state(gate.scope)
    assert state[LIMIT_GRANTED] == burst + granted


def test_input_token_budget_binds_when_requests_are_plentiful(redis_url, clock):
    # 60,000 input tokens a minute = 1,000 a second: 500-token requests get 2 at once, then 2 a second.
    gate = limiter(redis_url, new_scope(), clock, rpm=100_000, input_tpm=60_000)
    assert gate.try_grant([(500, 1)] * 10)[0] == 2
    clock.advance(0.1)
    assert granted_over(gate, clock, 10.0, (500, 1)) in (20, 21)


def test_output_tokens_reserved_at_max_tokens_come_back_when_the_answer_is_short(redis_url, clock):
    # 600 output tokens a minute: 10 a second and a bucket of 10; a request reserving 10 empties it.
    scope = new_scope()
    gate = limiter(redis_url, scope, clock, rpm=60_000, output_tpm=600)
    assert gate.try_grant([(1, 10)])[0] == 1
    granted, wait_ms = gate.try_grant([(1, 10)])
    assert granted == 0 and 900 <= wait_ms <= 1000  # a second to refill 10 tokens
    gate.settle(Grant(input_tokens=1, output_tokens=10), input_tokens=1, output_tokens=2)  # the answer used 2 of the 10 reserved
    clock.advance(0.2)  # 8 given back + 2 refilled
    assert gate.try_grant([(1, 10)])[0] == 1

    unrefunded = limiter(redis_url, new_scope(), clock, rpm=60_000, output_tpm=600)
    assert unrefunded.try_grant([(1, 10)])[0] == 1
    clock.advance(0.2)
    assert unrefunded.try_grant([(1, 10)])[0] == 0  # without the refund, 2 tokens are not enough


def test_limits_are_learned_from_headers_and_a_configured_limit_above_them_gives_way(redis_url, clock):
    unknown = limiter(redis_url, new_scope(), clock)
    unknown.try_grant([(1, 1)])
    assert unknown.effective == (UNKNOWN_RPM, None, None)  # probing until a response says more
    said = {"anthropic-ratelimit-requests-limit": "900", "anthropic-ratelimit-output-tokens-limit": "9000"}
    unknown.observe(LimitHeaders.from_anthropic(said), 0.1)
    unknown.try_grant([(1, 1)])
    assert unknown.effective == (900, None, 9000)

    too_high = limiter(redis_url, new_scope(), clock, rpm=1320)
    too_high.try_grant([(1, 1)])
    assert too_high.effective[0] == 1320
    too_high.observe(LimitHeaders.from_anthropic({"anthropic-ratelimit-requests-limit": "1200"}), 0.1)
    too_high.try_grant([(1, 1)])
    assert too_high.effective[0] == 1200


def test_a_response_without_limit_headers_ends_the_probing_pace(redis_url, clock):
    gate = limiter(redis_url, new_scope(), clock)
    gate.observe(LimitHeaders.from_anthropic({}), 0.1)
    gate.try_grant([])
    assert gate.effective == (None, None, None)


def test_a_response_saying_nothing_remains_empties_the_bucket(redis_url, clock):
    gate = limiter(redis_url, new_scope(), clock, rpm=60)  # one a second, a bucket of one
    clock.advance(1.0)
    gate.observe(LimitHeaders.from_anthropic({"anthropic-ratelimit-requests-remaining": "0"}), 0.0)
    granted, wait_ms = gate.try_grant([(1, 1)])
    assert granted == 0 and wait_ms >= 900
    clock.advance(1.0)
    assert gate.try_grant([(1, 1)])[0] == 1


def seen_elsewhere(redis_url: str, clock: FakeClock, report) -> tuple[FleetLimiter, dict[str, float]]:
    """One process reports something; what does another process on the same account get?"""
    scope = new_scope()
    reporter, elsewhere = limiter(redis_url, scope, clock, rpm=60_000), limiter(redis_url, scope, clock, rpm=60_000)
    reporter.try_grant([(1, 1)])
    report(reporter)
    reporter.try_grant([])  # the report reaches Redis with the next call
    return elsewhere, LimitStore(gate_client(redis_url)).state(scope)


def test_a_429_in_one_process_pauses_every_process_until_its_retry_time(redis_url, clock):
    elsewhere, state = seen_elsewhere(redis_url, clock, lambda gate: gate.rate_limited(retry_after_s=7.0))
    granted, wait_ms = elsewhere.try_grant([(1, 1)])
    assert granted == 0 and wait_ms == 7000 and state[LIMIT_RATE_LIMITED] == 1
    clock.advance(7.0)
    assert elsewhere.try_grant([(1, 1)])[0] == 1


def test_mostly_failing_requests_open_the_breaker_for_the_whole_fleet(redis_url, clock):
    def mostly_failing(gate: FleetLimiter) -> None:
        for _ in range(10):
            gate.record(server_failure=True)
        gate.record(ok=True)

    elsewhere, state = seen_elsewhere(redis_url, clock, mostly_failing)
    granted, wait_ms = elsewhere.try_grant([(1, 1)])
    assert granted == 0 and wait_ms == 2000 and state[LIMIT_BREAKER_TRIPS] == 1  # the first opening: 2 s
    clock.advance(2.0)
    assert elsewhere.try_grant([(1, 1)])[0] == 1


def test_eight_clients_on_their_own_connections_share_one_limit(redis_url, clock):
    scope = new_scope()
    gates = [limiter(redis_url, scope, clock, rpm=1200) for _ in range(8)]  # 20 a second, a bucket of 20
    counts = [0] * len(gates)
    for step in range(300):  # 3 virtual seconds in steps of 10 ms, each client asking in turn
        for turn in range(len(gates)):
            index = (step + turn) % len(gates)
            counts[index] += gates[index].try_grant([(1, 1)] * 3)[0]
        clock.advance(0.01)
    assert 20 + 60 - 1 <= sum(counts) <= 20 + 60 + 1  # the full bucket at the start, then the rate
    assert all(count > 0 for count in counts)  # no client hogs it


async def test_a_request_waits_for_its_grant_and_a_cancelled_wait_gives_its_grant_back(redis_url, clock):
    gate = limiter(redis_url, new_scope(), clock, rpm=60)  # one a second, a bucket of one
    await asyncio.wait_for(gate.acquire(1, 1), timeout=30)
    waiting = asyncio.ensure_future(gate.acquire(1, 1))
    await asyncio.sleep(0.3)  # the granter has asked and been told to wait
    assert not waiting.done()
    waiting.cancel()
    clock.advance(1.0)  # one more grant's worth: it goes to the next request, not the cancelled one
    await asyncio.wait_for(gate.acquire(1, 1), timeout=30)
    gate.close()
