"""What a batch transport keeps of the rows it gathers and the batches it waits on, and
how rows are packed into the batches the API takes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from promptmill.jobs.spec import JobSpec
from promptmill.workers.backends.base import Call, Reply

Waiter = asyncio.Future  # resolved with the row's Reply, or None (canceled: the row stays pending)


@dataclass
class Arrival:
    call: Call
    waiter: Waiter
    request: dict[str, Any]  # the request line as the batch API takes it, with its "custom_id"
    size: int  # bytes of the request as JSON: they count against the batch's bound


@dataclass(frozen=True)
class Made:
    """The batch the provider made of an intent."""

    batch_id: str
    created_at: float  # epoch seconds


@dataclass
class WaitedBatch:
    """A provider batch this process waits on, and the rows waiting."""

    batch_id: str
    job: JobSpec
    created_at: float  # epoch seconds
    intent: str | None = None  # its custom_ids' prefix (None: a batch made before intents, custom_id = row)
    waiters: dict[int, Waiter] = field(default_factory=dict)  # row -> its waiting task's future
    chunk_of: dict[int, str] = field(default_factory=dict)
    cancel_sent: bool = False
    for_deadline: bool = False  # cancelled because its job's deadline is near: its rows go in real time
    # What its results said, by row, as they are read: a row whose next run starts waiting while they
    # stream (its chunk's hold ended meanwhile) takes its reply from here, not from a read gone past it.
    results: dict[int, Reply | None] = field(default_factory=dict)

    def wait(self, row: int, chunk_id: str, waiter: Waiter) -> None:
        self.waiters[row], self.chunk_of[row] = waiter, chunk_id
        if row in self.results and not waiter.done():
            waiter.set_result(self.results[row])

    def answer(self, row: int, reply: Reply | None) -> None:
        self.results[row] = reply
        waiter = self.waiters.get(row)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def resolve_rest(self, reply: Reply) -> None:
        """Every row not answered yet gets this reply."""
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_result(reply)

    def waiting(self) -> bool:
        return any(not waiter.done() for waiter in self.waiters.values())

    def row_of(self, custom_id: str) -> int | None:
        """The row a result is for: "INTENT-ROW" (None for another intent's: not this batch's rows)."""
        intent, _, row = custom_id.rpartition("-")
        if intent != (self.intent or "") or not row.isdigit():
            return None
        return int(row)


def resolve(group: list[Arrival], reply: Reply | None) -> None:
    for arrival in group:
        if not arrival.waiter.done():
            arrival.waiter.set_result(reply)


def fail(group: list[Arrival], error: BaseException) -> None:
    for arrival in group:
        if not arrival.waiter.done():
            arrival.waiter.set_exception(error)


def packed(arrivals: list[Arrival], max_requests: int, max_bytes: int) -> list[list[Arrival]]:
    """The rows in batches the API takes: at most so many requests and bytes each."""
    groups: list[list[Arrival]] = []
    size = 0
    for arrival in arrivals:
        if not groups or len(groups[-1]) >= max_requests or size + arrival.size > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(arrival)
        size += arrival.size
    return groups
