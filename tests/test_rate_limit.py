"""The fleet's limiter script on a real Redis: three budgets, refunds, learned limits, fleet-wide
pauses, the circuit breaker, and many clients drawing on one set of buckets at once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import redis

from jobs.store import JobStore
from pipelines.spec import RateLimits
from workers.rate_limit import UNKNOWN_RPM, FleetLimiter


def limiter(redis_url: str, scope: str, **limits: int) -> FleetLimiter:
    return FleetLimiter(redis.Redis.from_url(redis_url), scope, RateLimits(**limits))


def new_scope() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"


async def grants_within(gate: FleetLimiter, seconds: float, input_tokens: int, output_tokens: int, tries: int) -> int:
    granted = 0

    async def one() -> None:
        nonlocal granted
        await gate.acquire(input_tokens, output_tokens)
        granted += 1

    tasks = [asyncio.ensure_future(one()) for _ in range(tries)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gate.close()
    return granted


async def test_one_process_is_paced_at_the_request_rate_even_with_a_full_bucket(redis_url):
    # 600 per minute = 10 per second; the fleet's bucket holds 10, but aiolimiter spreads them out.
    gate = limiter(redis_url, new_scope(), rpm=600)
    assert await grants_within(gate, 1.0, 1, 1, tries=100) in range(9, 12)
    state = JobStore.from_url(redis_url).limit_state(gate.scope)
    assert int(state["granted"]) in range(17, 22)  # the bucket's burst plus a second of its rate


async def test_input_token_budget_binds_when_requests_are_plentiful(redis_url):
    # 60,000 input tokens per minute = 1,000 per second: 500-token requests get 2 at once, 2 per second.
    gate = limiter(redis_url, new_scope(), rpm=100_000, input_tpm=60_000)
    assert await grants_within(gate, 1.0, 500, 1, tries=100) in range(3, 6)


async def test_output_tokens_reserved_at_max_tokens_come_back_when_the_answer_is_short(redis_url):
    # 600 output tokens per minute: a bucket of 10 tokens, and a request reserving 10 empties it.
    gate = limiter(redis_url, new_scope(), rpm=60_000, output_tpm=600)
    first = await gate.acquire(1, 10)
    blocked = asyncio.ensure_future(gate.acquire(1, 10))
    await asyncio.sleep(0.3)
    assert not blocked.done()
    gate.settle(first, input_tokens=1, output_tokens=2)  # the answer used 2 of the 10 reserved
    await asyncio.wait_for(blocked, timeout=0.5)
    gate.close()


async def test_limits_are_learned_from_headers_and_a_configured_limit_above_them_gives_way(redis_url):
    unknown = limiter(redis_url, new_scope())
    await unknown.acquire(1, 1)
    assert unknown.effective == (UNKNOWN_RPM, None, None)  # probing until a response says more
    unknown.observe({"anthropic-ratelimit-requests-limit": "900", "anthropic-ratelimit-output-tokens-limit": "9000"}, 0.1)
    await unknown.acquire(1, 1)
    assert unknown.effective == (900, None, 9000)
    unknown.close()

    too_high = limiter(redis_url, new_scope(), rpm=1320)
    await too_high.acquire(1, 1)
    assert too_high.effective[0] == 1320
    too_high.observe({"anthropic-ratelimit-requests-limit": "1200"}, 0.1)
    await too_high.acquire(1, 1)
    assert too_high.effective[0] == 1200
    too_high.close()


async def test_a_response_saying_nothing_remains_empties_the_bucket(redis_url):
    gate = limiter(redis_url, new_scope(), rpm=60)  # one per second, a bucket of one
    await asyncio.sleep(1.1)
    gate.observe({"anthropic-ratelimit-requests-remaining": "0"}, 0.0)
    gate._wake.set()
    await asyncio.sleep(0.1)  # let the report reach Redis
    started = time.monotonic()
    await gate.acquire(1, 1)
    assert time.monotonic() - started > 0.5
    gate.close()


async def wait_seen_elsewhere(redis_url: str, report) -> tuple[float, dict[str, float]]:
    """One process reports something; how long must another process on the same account wait?"""
    scope = new_scope()
    reporter, elsewhere = limiter(redis_url, scope, rpm=60_000), limiter(redis_url, scope, rpm=60_000)
    await reporter.acquire(1, 1)
    report(reporter)
    await asyncio.sleep(0.1)  # the report reaches Redis
    started = time.monotonic()
    await elsewhere.acquire(1, 1)
    waited = time.monotonic() - started
    reporter.close()
    elsewhere.close()
    return waited, JobStore.from_url(redis_url).limit_state(scope)


async def test_a_429_in_one_process_pauses_every_process_until_its_retry_time(redis_url):
    waited, state = await wait_seen_elsewhere(redis_url, lambda gate: gate.rate_limited(retry_after_s=1.0))
    assert waited > 0.7 and state["rate_limited"] == 1


async def test_mostly_failing_requests_open_the_breaker_for_the_whole_fleet(redis_url):
    def mostly_failing(gate: FleetLimiter) -> None:
        for _ in range(10):
            gate.record(server_failure=True)
        gate.record(ok=True)

    waited, state = await wait_seen_elsewhere(redis_url, mostly_failing)
    assert waited > 1.5 and state["breaker_trips"] == 1  # the first opening lasts 2 s


def test_eight_clients_on_their_own_connections_share_one_limit(redis_url):
    scope = new_scope()
    rpm, seconds, clients = 1200, 3.0, 8  # 20 per second and a bucket of 20
    counts: list[int] = []

    def client() -> None:
        gate = limiter(redis_url, scope, rpm=rpm)
        counts.append(asyncio.run(grants_within(gate, seconds, 1, 1, tries=200)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    allowed = rpm / 60 * (1 + seconds)  # the full bucket at the start, then the rate
    assert sum(counts) <= allowed + 2
    assert sum(counts) >= 0.8 * allowed
    assert sum(1 for count in counts if count > 0) >= clients // 2  # not one client hogging it all
