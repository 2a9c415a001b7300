"""Charges a local engine's busy time to the requests it serves, so a job knows its device time.

The engine runs many requests at once, so no request owns a stretch of time. Each interval between
two events (a request joins or finishes) is split evenly among the requests in the engine during
it, as processor sharing would: the shares of all requests add up exactly to the time the engine
had work, and a job's device time is the sum of its requests' shares.
"""

from __future__ import annotations

import time
from typing import Callable


class EngineClock:
    def __init__(self, devices: int = 1, clock: Callable[[], float] = time.monotonic):
        self.devices = devices
        self._clock = clock
        self._virtual = 0.0  # seconds of busy time each request in the engine has been charged so far
        self._at = clock()
        self._running = 0

    def _advance(self) -> None:
        now = self._clock()
        if self._running:
            self._virtual += (now - self._at) / self._running
        self._at = now

    def start(self) -> float:
        """A request joins; keep the mark this returns for `finish`."""
        self._advance()
        self._running += 1
        return self._virtual

    def finish(self, mark: float) -> int:
        """The request left the engine: its share of device time, in device-microseconds."""
        self._advance()
        self._running -= 1
        return round((self._virtual - mark) * self.devices * 1_000_000)
