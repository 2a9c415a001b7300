"""The process's adaptive concurrency limit and the engine clock, on their own: fed latencies and
times by the test, so nothing depends on how fast this machine is."""

from __future__ import annotations

import asyncio

from promptmill.workers.concurrency import AdaptiveConcurrency
from promptmill.workers.engine_clock import EngineClock


def test_steady_latency_lets_the_limit_grow_to_its_ceiling():
    slots = AdaptiveConcurrency(ceiling=64, initial=16)
    for _ in range(200):
        slots.observe(0.3, rate_per_s=None)
    assert slots.limit == 64


def test_latency_that_climbs_shrinks_the_limit():
    slots = AdaptiveConcurrency(ceiling=256, initial=16)
    for _ in range(100):
        slots.observe(0.2, rate_per_s=None)
    grown = slots.limit
    for _ in range(30):
        slots.observe(1.0, rate_per_s=None)  # five times slower: we, or the provider, are queueing
    assert slots.limit < grown


def test_a_known_request_rate_bounds_the_limit_by_littles_law():
    slots = AdaptiveConcurrency(ceiling=1024, initial=16)
    for _ in range(200):
        slots.observe(0.5, rate_per_s=10)  # 10 a second at 0.5 s each: 5 in flight do it
    assert slots.limit <= 10 * 0.5 * 1.5 + 4 + 1
    assert slots.limit >= 4


async def test_waiters_are_admitted_in_order_as_slots_free_and_a_cancelled_waiter_passes_its_turn():
    slots = AdaptiveConcurrency(ceiling=4, initial=4)
    admitted: list[int] = []
    release = asyncio.Event()

    async def hold(index: int) -> None:
        async with slots:
            admitted.append(index)
            await release.wait()

    holders = [asyncio.ensure_future(hold(index)) for index in range(6)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert admitted == [0, 1, 2, 3] and slots.in_flight == 4
    holders[4].cancel()  # gives up waiting: its turn goes to the next one
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*holders, return_exceptions=True)
    assert admitted == [0, 1, 2, 3, 5] and slots.in_flight == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_engine_clock_splits_busy_time_evenly_among_the_requests_running():
    clock = FakeClock()
    engine = EngineClock(devices=1, clock=clock)
    a = engine.start()  # t=100: A alone
    clock.now = 101.0
    b = engine.start()  # t=101: A and B share the engine
    clock.now = 103.0
    a_us = engine.finish(a)  # A: 1 s alone + 2 s shared by two = 2 s
    clock.now = 104.0
    b_us = engine.finish(b)  # B: 1 s shared + 1 s alone = 2 s
    assert (a_us, b_us) == (2_000_000, 2_000_000)
    assert a_us + b_us == 4_000_000  # the shares add up to the time the engine had work


def test_the_engine_clock_charges_every_device_and_nothing_for_idle_time():
    clock = FakeClock()
    engine = EngineClock(devices=4, clock=clock)
    clock.now = 200.0  # idle time before any request: nobody pays for it
    mark = engine.start()
    clock.now = 200.5
    assert engine.finish(mark) == 4 * 500_000
