"""A job's spending cap in Redis: what is spent, what requests in flight hold, and the pause at the cap.

Amounts are micro-USD. A request holds its most possible cost before it is sent and settles to its
real cost when answered, so what is held and spent never passes the cap: the job pauses first.
"""

from __future__ import annotations

import redis

from promptmill.jobs.state.keys import BUDGET_HELD, BUDGET_SPENT, META_BUDGET_MICRO, META_STATE, JobKeys, lua
from promptmill.jobs.state.status import Budget, JobState

_NAMES = dict(
    CAP=META_BUDGET_MICRO, STATE=META_STATE, SPENT=BUDGET_SPENT, HELD=BUDGET_HELD,
    RUNNING=JobState.running, PRODUCING=JobState.producing, PAUSED=JobState.paused_budget,
)

# Hold a request's worst-case cost against the job's budget, or pause the job at its cap.
_HOLD = lua("""
local cap = redis.call('HGET', KEYS[1], $CAP)
if not cap then return 1 end
local spent = tonumber(redis.call('HGET', KEYS[2], $SPENT) or '0')
local held = tonumber(redis.call('HGET', KEYS[2], $HELD) or '0')
if spent + held + tonumber(ARGV[1]) > tonumber(cap) then
  local state = redis.call('HGET', KEYS[1], $STATE)
  if state == $RUNNING or state == $PRODUCING then redis.call('HSET', KEYS[1], $STATE, $PAUSED) end
  return 0
end
redis.call('HINCRBY', KEYS[2], $HELD, ARGV[1])
return 1
""", **_NAMES)

# A new cap. What is held for requests in flight is let go only on a stopped job (whose holders died
# or are settling): zeroing it under running workers would let them pass the cap.
_SET = lua("""
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], $CAP) else redis.call('HSET', KEYS[1], $CAP, ARGV[1]) end
local state = redis.call('HGET', KEYS[1], $STATE)
if state ~= $PRODUCING and state ~= $RUNNING then redis.call('HSET', KEYS[2], $HELD, 0) end
local spent = tonumber(redis.call('HGET', KEYS[2], $SPENT) or '0')
if tonumber(ARGV[2]) > spent then redis.call('HSET', KEYS[2], $SPENT, ARGV[2]) end
return 1
""", **_NAMES)

# Settle a request: what it held goes (never below zero: a resume may have let it go already), what
# it cost is spent; nothing, once the job was deleted.
_SETTLE = lua("""
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local held = tonumber(redis.call('HGET', KEYS[1], $HELD) or '0') - tonumber(ARGV[1])
redis.call('HSET', KEYS[1], $HELD, math.max(held, 0))
redis.call('HINCRBY', KEYS[1], $SPENT, ARGV[2])
return 1
""", **_NAMES)


class BudgetStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._hold, self._set, self._settle = (client.register_script(lua) for lua in (_HOLD, _SET, _SETTLE))

    def set(self, job_id: str, usd: float | None, spent_at_least_usd: float = 0.0) -> None:
        """A new cap (None: none); on a stopped job, what dead workers held is let go.

        Spending is counted only while a cap is set: a job given one late passes in the ledger's cost
        so far as `spent_at_least_usd`.
        """
        keys = JobKeys(job_id)
        cap = "" if usd is None else round(usd * 1_000_000)
        floor = round(spent_at_least_usd * 1_000_000)
        self._set(keys=[keys.meta, keys.budget], args=[cap, floor])

    def has_cap(self, job_id: str) -> bool:
        return bool(self.redis.hexists(JobKeys(job_id).meta, META_BUDGET_MICRO))

    def get(self, job_id: str) -> Budget:
        keys = JobKeys(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hget(keys.meta, META_BUDGET_MICRO)
            pipe.hgetall(keys.budget)
            cap, figures = pipe.execute()
        return Budget(
            cap_usd=None if cap is None else int(cap) / 1_000_000,
            spent_usd=int(figures.get(BUDGET_SPENT.encode(), 0)) / 1_000_000,
            held_usd=int(figures.get(BUDGET_HELD.encode(), 0)) / 1_000_000,
        )

    def hold(self, job_id: str, micro_usd: int) -> bool:
        """Hold a request's most possible cost; False (and the job paused) if that would pass the cap."""
        keys = JobKeys(job_id)
        return bool(self._hold(keys=[keys.meta, keys.budget], args=[micro_usd]))

    def settle(self, job_id: str, held_micro_usd: int, spent_micro_usd: int) -> None:
        self._settle(keys=[JobKeys(job_id).budget, JobKeys(job_id).meta], args=[held_micro_usd, spent_micro_usd])
