"""How many requests one worker process keeps in flight, adapted to the provider as it answers.

Two bounds, the lower wins:
- latency: the limit follows the ratio of the long-run latency to the recent one (the gradient
  method of Netflix's concurrency-limits): while answers come as fast as ever it grows; when they
  slow down because we (or the provider) are queueing, it shrinks. A slow provider with steady
  latency therefore gets as many requests in flight as it takes, with no config change.
- rate: with a known request rate, no more than `rate x latency x headroom` (Little's law): more in
  flight would only wait for grants.
"""

from __future__ import annotations

import asyncio
import collections
import math

_FLOOR = 4  # never fewer in flight than this
_TOLERANCE = 1.5  # recent latency may be this much above the long-run latency before the limit shrinks
_SHORT_WEIGHT = 0.1  # how fast the recent latency follows the answers
_LONG_WEIGHT = 0.005  # how fast the long-run latency does
_SMOOTHING = 0.2  # how far the limit moves towards its new value per answer
_HEADROOM = 1.5  # latency varies; a little more in flight than the mean needs keeps the grants used


class AdaptiveConcurrency:
    """A semaphore whose size adapts between `_FLOOR` and `ceiling` as answers come back."""

    def __init__(self, ceiling: int, initial: int = 16):
        self.ceiling = ceiling
        self.estimate = float(min(ceiling, max(_FLOOR, initial)))
        self.short_latency_s: float | None = None
        self.long_latency_s: float | None = None
        self.rate_per_s: float | None = None
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def limit(self) -> int:
        limit = self.estimate
        if self.rate_per_s is not None and self.short_latency_s is not None:
            limit = min(limit, self.rate_per_s * self.short_latency_s * _HEADROOM + _FLOOR)
        return max(_FLOOR, min(self.ceiling, math.ceil(limit)))

    def observe(self, latency_s: float, rate_per_s: float | None) -> None:
        """One answer's latency, and the fleet's request rate as last granted (None = unlimited)."""
        self.rate_per_s = rate_per_s
        if self.short_latency_s is None or self.long_latency_s is None:
            self.short_latency_s = self.long_latency_s = latency_s
        else:
            self.short_latency_s += _SHORT_WEIGHT * (latency_s - self.short_latency_s)
            self.long_latency_s += _LONG_WEIGHT * (latency_s - self.long_latency_s)
            if self.long_latency_s > self.short_latency_s * 2:
                self.long_latency_s = self.short_latency_s  # the provider got faster: forget the slow past
        gradient = max(0.5, min(1.0, _TOLERANCE * self.long_latency_s / max(self.short_latency_s, 1e-6)))
        wanted = self.estimate * gradient + math.sqrt(self.estimate)
        self.estimate += _SMOOTHING * (wanted - self.estimate)
        self.estimate = max(_FLOOR, min(self.ceiling, self.estimate))
        self._admit()

    async def __aenter__(self) -> None:
        if self.in_flight >= self.limit or self._waiters:
            turn = asyncio.get_running_loop().create_future()
            self._waiters.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # our turn came as we gave up: pass it on
                raise
            return  # the releaser counted us in
        self.in_flight += 1

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            turn = self._waiters.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)
