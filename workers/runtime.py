"""What one worker process keeps between chunks: its event loop, settings, job store and backends.

Clients such as `AsyncAnthropic` and the fleet limiter are bound to the loop they were made on, so
each process runs one persistent loop in a thread of its own, and every task thread hands its chunk's
coroutine to it. Several chunks then share one loop, one client, one limiter and one in-flight
budget: requests keep flowing while one chunk drains and the next starts.

The runtime holds the backend registry: one backend per identity (backend, server, key variable,
engine settings), shared by the chunks that use it and closed only when none does (clients and
engines outlive a chunk), and the per-process state its request path needs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import importlib
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Hashable, Iterator, TypeVar

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.state.chunks import HandOff
from promptmill.jobs.state.fallback import FallbackState
from promptmill.jobs.state.pace import PaceRecorder
from promptmill.jobs.shards import shards_reachable
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.spec import RateLimits
from promptmill.workers.backends.base import Backend, BackendFactory
from promptmill.workers.concurrency import AdaptiveConcurrency
from promptmill.workers.fallback import Fallback
from promptmill.workers.limit_signals import InputTokenEstimate
from promptmill.workers.metrics import (
    forget_measures,
    gathered_for,
    jobs_measured,
    limiter_waited,
    metrics_on,
    watch_limiter,
)
from promptmill.workers.rate_limit import FleetLimiter
from promptmill.jobs.state.outage import OutageClock
from promptmill.workers.layers import AttemptLog, ChunkAttemptLog, Gate, Health, RequestSeen, Send
from promptmill.workers.request_path import PathParts, build_path

T = TypeVar("T")



def transport(job: JobSpec) -> BackendFactory:
    """How to build the job's backend: the transport its descriptor names (config/backends.py)."""
    module, _, name = job.info.transport.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(eq=False)
class _Served:
    backend: Backend
    identity: Hashable
    slots: AdaptiveConcurrency | None
    estimate: InputTokenEstimate = field(default_factory=InputTokenEstimate)
    users: int = 0  #: the chunks running on it now: it is closed only when none is


# The backends a running chunk holds (`WorkerRuntime.holding`): each coroutine's own.
_held: ContextVar[list[_Served] | None] = ContextVar("promptmill_held_backends", default=None)


@dataclass
class WorkerRuntime:
    pid: int
    loop: asyncio.AbstractEventLoop
    store: JobStore
    settings: Settings
    specs: dict[str, JobSpec] = field(default_factory=dict)
    reachable: dict[str, bool] = field(default_factory=dict)  # job id -> sees the job's shard folder
    served: dict[tuple[str, Hashable], _Served] = field(default_factory=dict)  # (backend, identity) -> it
    _swap: asyncio.Condition | None = None  # made on the loop: backends made, closed and let go under it
    limiters: dict[tuple[str, RateLimits], FleetLimiter] = field(default_factory=dict)
    scoped_jobs: set[str] = field(default_factory=set)
    careful: threading.Lock = field(default_factory=threading.Lock)  # one chunk at a time hunts for poison
    prices: dict[str, PriceTable] = field(default_factory=dict)  # job id -> its price table
    fallbacks: dict[str, FallbackState] = field(default_factory=dict)  # job id -> its chain's fleet state
    outages: dict[str, OutageClock] = field(default_factory=dict)  # job id -> its outage clock
    pace: PaceRecorder = field(init=False)  # the process's rows, latency and output tokens, for `status`
    metrics: bool = field(init=False)  # Prometheus metrics measured (a port, or `run`'s folder for them)
    running: collections.Counter = field(default_factory=collections.Counter)  # job id -> its chunks running here
    running_lock: threading.Lock = field(default_factory=threading.Lock)  # task threads start and end chunks at once
    stopping: threading.Event = field(default_factory=threading.Event)  # no chunk sends anything more
    stoppers: set[Callable[[], None]] = field(default_factory=set)  # each running chunk's, called on the loop
    ended_at: dict[str, float] = field(default_factory=dict)  # job id -> when this process saw it end (monotonic)

    def __post_init__(self) -> None:
        self.pace = PaceRecorder(self.store.redis)
        self.metrics = metrics_on(self.settings.metrics_port)

    def prices_for(self, job: JobSpec) -> PriceTable:
        if job.job_id not in self.prices:
            self.prices[job.job_id] = job.pipeline.price_table(self.settings)
        return self.prices[job.job_id]

    def spec(self, job_id: str) -> JobSpec:
        if job_id not in self.specs:
            self.specs[job_id] = self.store.spec(job_id)
        return self.specs[job_id]

    def shards_reachable(self, job: JobSpec) -> bool:
        if job.job_id not in self.reachable:
            self.reachable[job.job_id] = shards_reachable(job)
        return self.reachable[job.job_id]

    @contextlib.contextmanager
    def running_chunk(self, job_id: str) -> Iterator[None]:
        """A chunk of the job runs in this process: what it keeps for the job stays meanwhile."""
        with self.running_lock:
            self.running[job_id] += 1
        try:
            yield
        finally:
            with self.running_lock:
                self.running[job_id] -= 1
                if not self.running[job_id]:
                    del self.running[job_id]

    def jobs_held(self) -> set[str]:
        """The jobs this process keeps anything for (specs, prices, chains, limiters' scopes, metrics)."""
        return set(self.specs) | set(self.reachable) | set(self.prices) | set(self.fallbacks) | set(self.outages) | self.scoped_jobs | jobs_measured()

    def forget_ended_jobs(self, after_s: float) -> list[str]:
        """Let go of what this process keeps for the jobs that ended (complete, stopped or deleted) at
        least `after_s` ago and run no chunk here: a long-lived worker does not grow with every job.
        A job that runs again is read afresh. Returns the jobs forgotten."""
        now = time.monotonic()
        forgotten = []
        with self.running_lock:
            running = set(self.running)
        for job_id in sorted(self.jobs_held() - running):
            try:
                ended = not self.store.status(job_id).state.runnable
            except KeyError:
                ended = True  # deleted, or its keys expired
            if not ended:
                self.ended_at.pop(job_id, None)
                continue
            if now - self.ended_at.setdefault(job_id, now) < after_s:
                continue
            for cache in (self.specs, self.reachable, self.prices, self.fallbacks, self.outages, self.ended_at):
                cache.pop(job_id, None)
            self.scoped_jobs.discard(job_id)
            forget_measures(job_id)
            forgotten.append(job_id)
        if forgotten:
            # A limiter serves every job of its scope and limits: those of no job held any more go.
            in_use = {link.limits for spec in self.specs.values() for link in spec.links()}
            for key in [key for key in self.limiters if key[1] not in in_use]:
                del self.limiters[key]
            self.run(self._close_unused())
        return forgotten

    async def _close_unused(self) -> None:
        """Close the backends that no running chunk holds and no job held here uses."""
        in_use = {(link.backend, transport(link).identity(link, self.settings)) for spec in self.specs.values() for link in spec.links()}
        swap = self._swapping()
        async with swap:
            for key in [key for key, served in self.served.items() if key not in in_use and served.users == 0]:
                await self.served.pop(key).backend.close()

    def stop_sending(self) -> None:
        """The process is going away (the run that started it is gone): every running chunk sends
        nothing more, commits what is on the wire, and stops waiting on a provider's batch (its rows
        stay in the batch for the next run). Safe from any thread."""
        self.stopping.set()
        for stop in list(self.stoppers):
            self.loop.call_soon_threadsafe(stop)

    def warm(self, job_id: str) -> None:
        """Start the local engine a job of this worker's will need, before its first chunk comes: `run`
        knows its job when it starts its workers. In the background; a start that fails is logged, and
        the first chunk tries again."""

        async def start() -> None:
            job = self.spec(job_id)
            if job.info.local:
                await (await self._served(job)).backend.warm(job_id)  # type: ignore[attr-defined]

        def told(future: "concurrent.futures.Future[None]") -> None:
            if future.exception() is not None:
                log.warning("starting the engine ahead of job %s's first chunk failed: %s", job_id, future.exception())

        asyncio.run_coroutine_threadsafe(start(), self.loop).add_done_callback(told)

    def run(self, work: Awaitable[T]) -> T:
        """Run a coroutine on the process's loop and wait for it from this (task) thread."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    # -- backends and their request path ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """A chunk runs: every backend it gets meanwhile (`_served`) is held for it, and let go after."""
        held: list[_Served] = []
        token = _held.set(held)
        try:
            yield
        finally:
            _held.reset(token)
            swap = self._swapping()
            async with swap:
                for served in held:
                    served.users -= 1
                swap.notify_all()

    def _swapping(self) -> asyncio.Condition:
        if self._swap is None:
            self._swap = asyncio.Condition()
        return self._swap

    async def _served(self, job: JobSpec) -> _Served:
        """The process's backend for the job's identity (held for the running chunk, if any).

        Chunks of jobs on other servers or keys get backends of their own beside it (a client, and a
        batch backend's pollers, live until no job held here uses them: `forget_ended_jobs`). A local
        engine holds the device: one per process, so an engine with other arguments waits until the
        chunks on the running one are done, and then replaces it (between chunks, never under one)."""
        factory = transport(job)
        key = (job.backend, factory.identity(job, self.settings))
        held = _held.get()
        mine = held or []
        swap = self._swapping()
        async with swap:
            if key not in self.served and job.info.local:
                others = [other for other in self.served if other[0] == job.backend]
                # (a chunk never waits on an engine it holds itself: a fallback chain of local models)
                await swap.wait_for(lambda: key in self.served or all(
                    self.served[other].users == mine.count(self.served[other]) for other in others if other in self.served
                ))  # fmt: skip
            if key not in self.served:
                if job.info.local:
                    for other in [other for other in self.served if other[0] == job.backend]:
                        if self.served[other].users == 0:
                            await self.served.pop(other).backend.close()
                backend = factory(job, self.settings, self.store)
                ceiling = backend.max_in_flight
                slots = None if ceiling is None else AdaptiveConcurrency(ceiling=ceiling)
                self.served[key] = _Served(backend, key[1], slots)
            served = self.served[key]
            if held is not None:
                served.users += 1
                held.append(served)
            return served

    def _limiter(self, backend: Backend, job: JobSpec) -> FleetLimiter | None:
        scope = backend.limit_scope(job)
        if scope is None:
            return None
        if job.job_id not in self.scoped_jobs:
            self.store.limits.set_scope(job.job_id, scope)
            self.scoped_jobs.add(job.job_id)
        key = (scope, job.limits)
        if key not in self.limiters:
            self.limiters[key] = FleetLimiter(self.store.redis, scope, job.limits)
        return self.limiters[key]

    async def backend(self, job: JobSpec) -> Backend:
        return (await self._served(job)).backend

    async def request_path(
        self, job: JobSpec, attempts: ChunkAttemptLog, gate: Gate, start: int = 0, carried: dict[int, HandOff] | None = None
    ) -> Send:
        """The path every request of this chunk goes through (workers/request_path.py); with a
        fallback chain, one path per model under the chain (workers/fallback.py), for the models served
        on the queue of the one this run starts at (`start`, with what its rows carry)."""
        links = job.links()
        if len(links) == 1:
            return await self._path(job, attempts, gate)
        if job.job_id not in self.fallbacks:
            self.fallbacks[job.job_id] = FallbackState(self.store.redis, job)
        state = self.fallbacks[job.job_id]
        queue = links[start].queue
        paths: list[Send | None] = [
            await self._path(link, attempts.for_model(link.model + link.info.ledger_suffix, first=i == 0), gate, Health(state, i))
            if i >= start and link.queue == queue else None
            for i, link in enumerate(links)
        ]  # fmt: skip
        return Fallback(list(zip(links, paths)), state, start, carried or {})

    async def _path(self, job: JobSpec, attempts: AttemptLog, gate: Gate, health: Health | None = None) -> Send:
        """One model's path, of the process's backend and state for it."""
        served = await self._served(job)
        backend = served.backend
        limiter = self._limiter(backend, job)
        prices = self.prices_for(job)
        if limiter is not None and self.metrics:
            watch_limiter(job.model, limiter)
        info = job.info
        gathered = (
            gathered_for(job.job_id, job.model, job.backend, prices, info.billed_per_token, info.ledger_suffix)
            if self.metrics else None
        )  # fmt: skip
        return build_path(PathParts(
            job, backend, self.settings, prices, attempts, gate, served.estimate, served.slots, limiter,
            budgets=self.store.budgets if self.store.budgets.has_cap(job.job_id) else None,  # read once per chunk
            health=health, seen=self._request_seen(job.job_id) if limiter is not None else None, gathered=gathered,
            # A chain's model that cannot be reached is the chain's to pass over, not an outage.
            outage=self._outage(job.job_id) if health is None and not info.local and not info.batches else None,
        ))  # fmt: skip

    def _outage(self, job_id: str) -> OutageClock:
        if job_id not in self.outages:
            self.outages[job_id] = OutageClock(self.store.redis, job_id)
        return self.outages[job_id]

    def _request_seen(self, job_id: str) -> Callable[[RequestSeen], None]:
        """What a request sent under a limiter tells: the job's request pace (`report`), and the
        limiter's wait (metrics)."""

        def seen(request: RequestSeen) -> None:
            self.pace.request(job_id, request)
            if self.metrics:
                limiter_waited(request.held_s)

        return seen

    def close_backends(self) -> None:
        """Let go of every client and engine (a worker stopping): an engine's processes must not outlive it."""
        while self.served:
            _, served = self.served.popitem()
            self.run(served.backend.close())


log = logging.getLogger(__name__)
_runtime: WorkerRuntime | None = None
_settings: Settings | None = None
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """The settings this process's workers run with (the `worker` command passes them)."""
    global _settings
    _settings = settings


def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="promptmill-loop", daemon=True).start()
    return loop


def runtime() -> WorkerRuntime:
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            if _settings is None or not _settings.redis_url:
                raise RuntimeError("this process was not configured as a worker (run `promptmill worker`)")
            _runtime = WorkerRuntime(
                pid=os.getpid(), loop=_start_loop(), store=JobStore.from_url(_settings.redis_url), settings=_settings
            )
        return _runtime


def current_runtime() -> WorkerRuntime | None:
    return _runtime
