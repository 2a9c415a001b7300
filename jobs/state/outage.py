"""A job's outage clock, fleet-wide: how long its requests have failed to connect with no answer from
anywhere, so that an outage (a dead network, a wrong address) pauses the job instead of failing rows.

A connection failure starts the clock unless it runs already; any answer (an HTTP status counts: the
provider was reached) stops it. Answers are told at most once a second per process, so a healthy job
pays one Redis write a second for it, and a failure one round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from promptmill.jobs.state.keys import META_ERROR, META_STATE, OUTAGE_ANSWERED, OUTAGE_SINCE, JobKeys, lua
from promptmill.jobs.state.status import JobState

_NAMES = dict(
    SINCE=OUTAGE_SINCE, ANSWERED=OUTAGE_ANSWERED, STATE=META_STATE, ERROR=META_ERROR,
    RUNNING=JobState.running, PRODUCING=JobState.producing, PAUSED=JobState.paused,
)  # fmt: skip

# A connection failure at ARGV[1]: the clock starts unless it runs (no answer since it started).
# Returns {seconds it has run, when the last answer came (0: none)} as strings; a deleted job's
# (no spec) writes nothing.
_FAILED = lua("""
if redis.call('EXISTS', KEYS[2]) == 0 then return {'0', '0'} end
local since = tonumber(redis.call('HGET', KEYS[1], $SINCE) or '0')
local answered = tonumber(redis.call('HGET', KEYS[1], $ANSWERED) or '0')
local now = tonumber(ARGV[1])
if since == 0 or answered >= since then
  since = now
  redis.call('HSET', KEYS[1], $SINCE, ARGV[1])
end
return {tostring(now - since), tostring(answered)}
""", **_NAMES)

# An answer at ARGV[1] stops the clock (a deleted job's is not written back).
_ANSWERED = lua("""
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[1], $ANSWERED, ARGV[1]) end
return 1
""", **_NAMES)

# Pause a running job for the outage, with its reason; a job stopped otherwise stays as it is.
_PAUSE = lua("""
local state = redis.call('HGET', KEYS[1], $STATE)
if state == $RUNNING or state == $PRODUCING then
  redis.call('HSET', KEYS[1], $STATE, $PAUSED, $ERROR, ARGV[1])
  return 1
end
return 0
""", **_NAMES)

ANSWER_TOLD_EVERY_S = 1.0


@dataclass(frozen=True)
class Outage:
    lasted_s: float  # since the fleet's connection failures began, with no answer since
    answered_at: float  # when the last answer came (0: none yet)


class OutageClock:
    """One job's clock, as one worker process sees and moves it."""

    def __init__(self, client: redis.Redis, job_id: str):
        self.client = client
        self.keys = JobKeys(job_id)
        self._failed = client.register_script(_FAILED)
        self._pause = client.register_script(_PAUSE)
        self._answered = client.register_script(_ANSWERED)
        self._told_at = float("-inf")

    def failed(self, now: float | None = None) -> Outage:
        keys = [self.keys.outage, self.keys.spec]
        lasted, answered = self._failed(keys=keys, args=[time.time() if now is None else now])
        return Outage(float(lasted), float(answered))

    def answered(self) -> None:
        """An answer came: the clock stops (told at most once a second by this process)."""
        if time.monotonic() - self._told_at >= ANSWER_TOLD_EVERY_S:
            self._told_at = time.monotonic()
            self._answered(keys=[self.keys.outage, self.keys.spec], args=[time.time()])

    def pause(self, reason: str) -> None:
        self._pause(keys=[self.keys.meta], args=[reason])

    def reset(self) -> None:
        """A resumed job starts its clock afresh."""
        self.client.delete(self.keys.outage)
