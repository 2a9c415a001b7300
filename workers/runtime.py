"""What one worker process keeps between chunks: its event loop, its job store and settings.

Celery tasks are synchronous, and clients such as `AsyncAnthropic` are bound to the loop they were
made on, so each process runs every chunk on one persistent loop instead of `asyncio.run` per task.
Everything is keyed by process id: a prefork child builds its own after the fork.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from config.settings import Settings, get_settings
from jobs.spec import JobSpec
from jobs.store import JobStore


@dataclass
class WorkerRuntime:
    pid: int
    loop: asyncio.AbstractEventLoop
    store: JobStore
    settings: Settings
    specs: dict[str, JobSpec]

    def spec(self, job_id: str) -> JobSpec:
        if job_id not in self.specs:
            self.specs[job_id] = self.store.spec(job_id)
        return self.specs[job_id]


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        if not settings.redis_url:
            raise RuntimeError("a worker needs PROMPTMILL_REDIS_URL (the `promptmill worker` command sets it)")
        _runtime = WorkerRuntime(
            pid=os.getpid(),
            loop=asyncio.new_event_loop(),
            store=JobStore.from_url(settings.redis_url),
            settings=settings,
            specs={},
        )
    return _runtime
