"""Where a job's fallback chain stands, fleet-wide: which model new rows go to, and why.

Every worker reports each attempt on a model of the chain: a failure of the provider (5xx, 529, a
timeout, a dropped connection) or a 404 marks the model failing since then, unless it is marked
already; an answer clears the mark. The fleet is on the first model not failing for longer than the
pipeline's `fallback_after_s`. A model the fleet passed over is probed: once per `fallback_after_s`,
fleet-wide, one row tries it first (one attempt), and its answer brings the fleet back.

A batch job with a deadline has the provider's real-time API as its chain's last model: once the
deadline is near (the batch transport decides, `switch_to_realtime`), the whole fleet is on it for
good, with no probe back to the batches.

Each process reads the marks at most once a second, so a row costs no Redis round trip while the
chain is healthy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.spec import JobSpec

_FAILING = "failing_since:"
_SWITCHED = "deadline_switched_at"
READ_EVERY_S = 1.0


@dataclass(frozen=True)
class FleetPosition:
    link: int  # the model new rows go to: an index into the chain
    model: str  # as BACKEND:MODEL
    reason: str | None  # why it is not the first

    def as_dict(self, chain: list[str]) -> dict:
        return {"chain": chain, "on": self.model, "reason": self.reason}


def fleet_position(failing_since: dict[int, float], models: list[str], after_s: float, now: float) -> FleetPosition:
    """The first model not failing for longer than `after_s` (the last one if all are)."""
    for link, model in enumerate(models):
        since = failing_since.get(link)
        if since is None or now - since < after_s or link == len(models) - 1:
            passed = [f"{models[j]} failing for {now - failing_since[j]:.0f}s" for j in range(link)]
            reason = f"{'; '.join(passed)} (fallback_after_s {after_s:g})" if passed else None
            return FleetPosition(link, model, reason)
    raise ValueError("a chain has at least one model")


class FallbackState:
    def __init__(self, client: redis.Redis, job: JobSpec):
        self.client = client
        self.keys = JobKeys(job.job_id)
        self.models = [f"{link.backend}:{link.model}" for link in job.links()]
        self.after_s = job.pipeline.fallback_after_s
        self._failing: dict[int, float] = {}
        self._read_at = float("-inf")
        self._next_probe: dict[int, float] = {}
        self.deadline_link = job.deadline_link
        self._switched = False

    def _read(self) -> None:
        now = time.monotonic()
        if now - self._read_at < READ_EVERY_S:
            return
        self._read_at = now
        raw = self.client.hgetall(self.keys.fallback)
        self._failing = {
            int(field.decode().removeprefix(_FAILING)): float(value)
            for field, value in raw.items()
            if field.decode().startswith(_FAILING)
        }
        self._switched = _SWITCHED.encode() in raw

    def failed(self, link: int) -> None:
        if link not in self._failing:
            now = time.time()
            self.client.hsetnx(self.keys.fallback, f"{_FAILING}{link}", now)
            self._failing[link] = now  # until the next read says since when the fleet has seen it fail

    def succeeded(self, link: int) -> None:
        if link in self._failing:
            self.client.hdel(self.keys.fallback, f"{_FAILING}{link}")
            del self._failing[link]

    def position(self) -> FleetPosition:
        self._read()
        if self._switched and self.deadline_link is not None:
            reason = "the deadline is near: the rows left go through the real-time API"
            return FleetPosition(self.deadline_link, self.models[self.deadline_link], reason)
        return fleet_position(self._failing, self.models, self.after_s, time.time())

    def route(self) -> tuple[list[int], bool]:
        """The links a new row goes to, in order, and whether its first is a probe (one attempt)."""
        at = self.position().link
        onward = list(range(at, len(self.models)))
        if self._switched:
            # Every row starts at the batch still: one a batch holds waits on its answer (paid for);
            # the batch transport passes the others on to the real-time API. Never a probe.
            return list(range(len(self.models))), False
        now = time.monotonic()
        for link in range(at):
            if now < self._next_probe.get(link, 0):
                continue
            self._next_probe[link] = now + 1.0  # another process may hold the turn: ask again in a second
            if self.client.set(self.keys.probe(link), 1, nx=True, px=int(self.after_s * 1000)):
                return [link, *onward], True
        return onward, False


def switch_to_realtime(client: redis.Redis, job_id: str) -> bool:
    """The batch job's deadline is near: from now on its rows go through the real-time API (True: this
    call switched it)."""
    return bool(client.hsetnx(JobKeys(job_id).fallback, _SWITCHED, time.time()))


def switched_at(client: redis.Redis, job_id: str) -> float | None:
    """When the job's rows went over to the real-time API (None: they have not)."""
    raw = client.hget(JobKeys(job_id).fallback, _SWITCHED)
    return None if raw is None else float(raw)


def fallback_status(client: redis.Redis, job: JobSpec) -> dict | None:
    """`status`'s view of the chain: the models, the one the fleet is on, and why (None: no chain)."""
    if len(job.links()) == 1:
        return None
    state = FallbackState(client, job)
    return state.position().as_dict(state.models)
