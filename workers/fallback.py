"""A fallback chain on the request path: each model of the chain has its own path (its limits,
retries, budget and prices), and a row goes down them in turn.

A row moves to the next model when its attempts on one are spent on errors a provider's trouble
causes (5xx, 529, timeouts, dropped connections, 429s after their retries) or when the model is not
found (404: retired). It never moves for its own fault (400, an answer that does not parse) or for the
job's budget. The fleet-wide position (jobs/state/fallback.py) decides where a new row starts; the layers that tell it
each attempt (Health) and mark a row on the wire (OnWire) are workers/layers.py's.

A chain may cross queues (an api job falling back on a vLLM engine): a model another queue serves
has no path in this process, so a row reaching it is handed off (`RawOutcome.handed_to`) with what
it went through, and its chunk's task sends it there (workers/tasks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from promptmill.jobs.state.chunks import HandOff
from promptmill.jobs.state.fallback import FallbackState
from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.items import AttemptError, ErrorKind, ItemError
from promptmill.workers.backends.base import Call, RawOutcome, Reply
from promptmill.workers.layers import Send

FALLS_BACK = frozenset(
    {ErrorKind.server_error, ErrorKind.timeout, ErrorKind.connection_error, ErrorKind.rate_limited,
     ErrorKind.model_not_found}
)  # fmt: skip


class Departures:
    """An event per model of the chain, set while the fleet is past it; one watcher per process
    reads the fleet's position every half second while any row waits on a model."""

    def __init__(self, state: FallbackState):
        self.state = state
        self.events: dict[int, asyncio.Event] = {}
        self.waiting = 0
        self._watcher: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def watching(self, link: int) -> AsyncIterator[asyncio.Event]:
        self.waiting += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())
        try:
            yield self.events.setdefault(link, asyncio.Event())
        finally:
            self.waiting -= 1

    async def _watch(self) -> None:
        while self.waiting:
            at = self.state.position().link
            for link, event in self.events.items():
                if at > link:
                    event.set()
                else:
                    event.clear()
            await asyncio.sleep(0.5)


@dataclass
class Fallback:
    """A Send over the chain's paths: the row's outcome from the first model that settles it, with
    every model it went to, all its attempts and their errors. A row waiting on a model (for a slot,
    a grant through a circuit breaker's pause, a backoff) when the fleet leaves that model goes on to
    the next at once, unless an attempt of it is on the wire.

    A link without a path is served on another queue: a row reaching it is handed off. A run of rows
    handed to link `start` (a handoff run) begins there, with what each row went through (`carried`)."""

    links: list[tuple[JobSpec, Send | None]]
    state: FallbackState
    start: int = 0
    carried: dict[int, HandOff] = field(default_factory=dict)
    departures: Departures = field(init=False)

    def __post_init__(self) -> None:
        self.departures = Departures(self.state)

    async def _on(self, link: int, call: Call, last: bool) -> Reply | None:
        path = self.links[link][1]
        if last or call.probe:
            return await path(call)
        attempt = asyncio.ensure_future(path(call))
        async with self.departures.watching(link) as left:
            departed = asyncio.ensure_future(left.wait())
            try:
                while not attempt.done():
                    # Once the fleet has left, look every 50 ms for the attempt to be off the wire.
                    await asyncio.wait(
                        {attempt, departed}, timeout=0.05 if departed.done() else None,
                        return_when=asyncio.FIRST_COMPLETED,
                    )  # fmt: skip
                    if departed.done() and not attempt.done() and not call.on_wire:
                        attempt.cancel()
                        await asyncio.gather(attempt, return_exceptions=True)
                        passed = ItemError(kind=ErrorKind.server_error, message="passed over: the fleet moved on")
                        return RawOutcome(row=call.request.row, error=passed, attempts=call.wire_attempts,
                                          errors=list(call.wire_errors), passed_over=True)  # fmt: skip
            finally:
                departed.cancel()
                if not attempt.done():
                    attempt.cancel()  # the row itself was cancelled (its chunk stopped): so is its attempt
        return attempt.result()

    def _route(self) -> tuple[list[int], bool]:
        if not self.start:
            return self.state.route()
        # A handoff run: its rows have been before this link; the fleet may be past it by now. No
        # probe of an earlier model from here: that turn is the fleet's new rows'.
        return list(range(max(self.start, self.state.position().link), len(self.links))), False

    async def __call__(self, call: Call) -> Reply | None:
        route, probing = self._route()
        before = self.carried.get(call.request.row)
        started_at = before.started_at if before and before.started_at else time.time()
        tried: list[str] = list(before.models_tried) if before else []
        errors: list[AttemptError] = list(before.errors) if before else []
        attempts = before.attempts if before else 0
        reply: Reply | None = None
        for step, link in enumerate(route):
            job, path = self.links[link]
            if path is None:
                return RawOutcome(row=call.request.row, attempts=attempts, errors=errors, models_tried=tried,
                                  started_at=started_at, handed_to=link)  # fmt: skip
            # A probe has one attempt: it must not hold its row up for long.
            link_call = Call(job, call.request, call.chunk_id, probe=probing and step == 0)
            reply = await self._on(link, link_call, last=step == len(route) - 1)
            if not isinstance(reply, RawOutcome):
                return reply  # not sent (the job's budget): the row stays pending
            if reply.attempts or not reply.passed_over:  # a model the row was sent to (and paid nothing)
                tried.append(job.model)
            attempts += reply.attempts or 0
            errors += reply.errors
            reply.model, reply.models_tried, reply.started_at = job.model, list(tried), started_at
            reply.attempts, reply.errors = attempts, list(errors)
            if reply.error is None or reply.error.kind not in FALLS_BACK:
                return reply
        return reply


def handoff_of(reply: RawOutcome) -> HandOff:
    """What a row handed to another queue's model carries there."""
    return HandOff(link=reply.handed_to, models_tried=reply.models_tried or [], attempts=reply.attempts or 0,
                   errors=reply.errors, started_at=reply.started_at)  # fmt: skip
