"""How a worker process ends, whatever became of what it depends on.

A local worker (`run`'s) ends within seconds of the `run` that started it, however that run died (a
SIGKILL, a closed terminal): it stops sending, commits what is on the wire, and shuts down warmly; its
chunks' leases lapse and `resume` goes on exactly. A worker told to stop (SIGTERM) finishes its
chunks, but if its Redis is gone it cannot: it exits once Redis has been unreachable for a lease's
life (the sweeper sends its chunks again anyway), instead of hanging in its warm shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import redis
from celery.signals import worker_shutting_down

from promptmill.workers.local_workers import PARENT_PID
from promptmill.workers.runtime import current_runtime, runtime

__all__ = ["PARENT_PID", "watch_parent"]

log = logging.getLogger(__name__)

_LOOK_EVERY_S = 0.5
_EXIT_GRACE_S = 5.0  # past a lease's life with Redis unreachable: the exit, then


def watch_parent(parent_pid: int) -> None:
    """Stop this worker when the process that started it is gone (it is then re-parented)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_LOOK_EVERY_S)
        log.warning("the run that started this worker (pid %d) is gone: stopping", parent_pid)
        rt = current_runtime()
        if rt is not None:
            rt.stop_sending()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: the chunks in hand end, then the process

    threading.Thread(target=watch, daemon=True, name="promptmill-parent").start()


def _exit_when_redis_stays_gone(client: redis.Redis, patience_s: float) -> None:
    unreachable_since: float | None = None
    while True:
        try:
            client.ping()
            unreachable_since = None
        except redis.RedisError:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since >= patience_s:
                log.error("stopping: Redis has been unreachable for %.0fs; the sweeper sends this worker's chunks again",
                          patience_s)  # fmt: skip
                logging.shutdown()
                os._exit(1)
        time.sleep(_LOOK_EVERY_S)


@worker_shutting_down.connect
def _bounded_shutdown(**_: object) -> None:
    """A warm shutdown waits on the chunks in hand, which wait on Redis: with Redis gone, not forever."""
    rt = runtime()
    probe = redis.Redis.from_url(rt.settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    patience = rt.settings.lease_ttl_s + _EXIT_GRACE_S
    threading.Thread(target=_exit_when_redis_stays_gone, args=(probe, patience), daemon=True,
                     name="promptmill-shutdown").start()  # fmt: skip
