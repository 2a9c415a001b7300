"""What one worker process keeps between chunks: its event loop, its job store and settings.

Clients such as `AsyncAnthropic` and the fleet limiter are bound to the loop they were made on, so
each process runs one persistent loop in a thread of its own, and every task thread hands its chunk's
coroutine to it. Several chunks then share one loop, one client, one limiter and one in-flight
budget: requests keep flowing while one chunk drains and the next starts.
Everything is keyed by process id: a prefork child builds its own after the fork.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

from config.prices import PriceTable
from config.settings import Settings, get_settings
from jobs.shards import shards_reachable
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import Usage

T = TypeVar("T")


@dataclass
class WorkerRuntime:
    pid: int
    loop: asyncio.AbstractEventLoop
    store: JobStore
    settings: Settings
    specs: dict[str, JobSpec]
    reachable: dict[str, bool] = field(default_factory=dict)  # job id -> sees the job's shard folder
    prices: PriceTable | None = None

    def spec(self, job_id: str) -> JobSpec:
        if job_id not in self.specs:
            self.specs[job_id] = self.store.spec(job_id)
        return self.specs[job_id]

    def shards_reachable(self, job: JobSpec) -> bool:
        if job.job_id not in self.reachable:
            self.reachable[job.job_id] = shards_reachable(job)
        return self.reachable[job.job_id]

    def ledger_model(self, job: JobSpec, usage: Usage) -> str:
        """The ledger's name for a request: its model, or `model@long` at the long-context rates."""
        if job.backend != "anthropic":
            return job.model
        if self.prices is None:
            self.prices = PriceTable.load(self.settings)
        return self.prices.ledger_model(job.model, usage.prompt_tokens)

    def run(self, work: Awaitable[T]) -> T:
        """Run a coroutine on the process's loop and wait for it from this (task) thread."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="promptmill-loop", daemon=True).start()
    return loop


def runtime() -> WorkerRuntime:
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            settings = get_settings()
            if not settings.redis_url:
                raise RuntimeError("a worker needs PROMPTMILL_REDIS_URL (the `promptmill worker` command sets it)")
            _runtime = WorkerRuntime(
                pid=os.getpid(),
                loop=_start_loop(),
                store=JobStore.from_url(settings.redis_url),
                settings=settings,
                specs={},
            )
        return _runtime
