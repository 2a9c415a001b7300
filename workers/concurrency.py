"""How many requests one worker process keeps in flight: enough to use the fleet's grant rate at the
provider's measured latency (Little's law), and no more, so a slow provider needs no config change.
"""

from __future__ import annotations

import asyncio
import collections
import math

_HEADROOM = 1.5  # latency varies; a little more in flight than the mean needs keeps the grants used
_FLOOR = 4  # requests waiting on a grant, ready to go the moment it comes
_LATENCY_WEIGHT = 0.1  # how fast the latency estimate follows the provider


class AdaptiveConcurrency:
    """A semaphore whose size is `rate x latency x headroom`, bounded by `ceiling`.

    With no known rate (no limit configured or learned) it opens to `ceiling`.
    """

    def __init__(self, ceiling: int):
        self.ceiling = ceiling
        self.latency_s: float | None = None
        self.rate_per_s: float | None = None
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def limit(self) -> int:
        if self.rate_per_s is None:
            return self.ceiling
        latency = self.latency_s if self.latency_s is not None else 1.0
        wanted = math.ceil(self.rate_per_s * latency * _HEADROOM) + _FLOOR
        return max(1, min(self.ceiling, wanted))

    def observe(self, latency_s: float, rate_per_s: float | None) -> None:
        if self.latency_s is None:
            self.latency_s = latency_s
        else:
            self.latency_s += _LATENCY_WEIGHT * (latency_s - self.latency_s)
        self.rate_per_s = rate_per_s
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
