"""A worker's lease on the chunk it runs: taken once, kept alive by a heartbeat, lost or released.

While a chunk is leased a second delivery of it waits; when its worker dies the lease runs out and
the chunk's run count (kept while it runs) tells the sweeper, and the next run, that its worker died.
The heartbeat is a thread: a blocking engine call on the event loop cannot starve it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import redis

from promptmill.jobs.state.keys import JobKeys

log = logging.getLogger(__name__)

# Release or renew a lease only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class ChunkLease:
    def __init__(self, client: redis.Redis, job_id: str, chunk_id: str, ttl_s: float):
        self.redis, self.job_id, self.chunk_id = client, job_id, chunk_id
        self.keys = JobKeys(job_id)
        self.key = self.keys.lease(chunk_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()  # another worker may hold the chunk now: stop sending its rows
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lease and start its heartbeat; False when another worker holds it."""
        if not self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.chunk_id}")
        self._heartbeat.start()
        return True

    def remaining_s(self) -> float:
        """How long the current holder's lease still runs."""
        return max(0, int(self.redis.pttl(self.key))) / 1000

    def release(self) -> None:
        self._stopped.set()
        self._release(keys=[self.key], args=[self.token])

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def _beat(self) -> None:
        while not self._stopped.wait(self.ttl_ms / 3000):  # renewed every third of its life
            try:
                if not self.renew():
                    if self._stopped.is_set():
                        return  # released while this beat was on its way: the run ended, nothing was lost
                    log.warning("lost the lease on chunk %s of job %s; stopping it here", self.chunk_id, self.job_id)
                    self.lost.set()
                    return
            except redis.RedisError:
                continue  # Redis restarting: the next beat tries again

    # -- the run count: how many runs of the chunk started and did not end on their own ---------

    def count_run(self) -> int:
        """Count this run; returns the chunk's runs so far, this one included."""
        return int(self.redis.hincrby(self.keys.chunk_runs, self.chunk_id, 1))

    def forget_runs(self) -> None:
        """A run that ended on its own (not by its worker dying) does not count towards poison."""
        self.redis.hdel(self.keys.chunk_runs, self.chunk_id)
