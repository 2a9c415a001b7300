"""The fleet's rate-limit buckets in Redis: the limiter's one Lua script (each worker process's
`FleetLimiter`, workers/rate_limit.py, calls it) and what readers see of the buckets: which ones a job
draws on, and what they say. Their field names are in jobs/state/keys.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from promptmill.jobs.state.keys import (
    LIMIT_BREAKER_TRIPS,
    LIMIT_BUDGETS,
    LIMIT_COOL,
    LIMIT_EFFECTIVE,
    LIMIT_FAIL_WEIGHT,
    LIMIT_GRANTED,
    LIMIT_LEARNED,
    LIMIT_LEVEL,
    LIMIT_OK_WEIGHT,
    LIMIT_PAUSE,
    LIMIT_RATE_LIMITED,
    LIMIT_SEEN,
    LIMIT_TS,
    META_LIMIT_SCOPE,
    JobKeys,
    limiter_key,
    lua,
)
from promptmill.pipelines.spec import RateLimits

@dataclass(frozen=True)
class LimitCall:
    """One call of the limiter's script: its arguments, in the order the script reads them (ARGV).

    | ARGV      | field              | what                                                                  |
    |-----------|--------------------|-----------------------------------------------------------------------|
    | 1-3       | configured         | the limits given: requests, input, output per minute (0: none)        |
    | 4         | burst_ms           | each bucket's size, in ms of its limit                                |
    | 5         | unknown_rpm        | the pace before any response told the limits                          |
    | 6-8       | refund             | given back: requests, input, output (negative: a further charge)      |
    | 9-11      | ok, failed, rate_limited | outcomes since the last call: ok, server failures, 429s          |
    | 12        | pause_ms           | the pause a 429's retry-after asks (0: none)                          |
    | 13        | observed           | 1 when 14-20 hold a response's headers                                |
    | 14-16     | named              | the limits a response named (0: not named)                            |
    | 17-19     | remaining          | what it said remained (-1: not named)                                 |
    | 20        | observed_age_ms    | how long that response's request took                                 |
    | 21        | now_ms             | now (0: Redis's own clock; a test passes its own)                     |
    | 22, then  | costs              | how many grants are asked, then each one's input and output cost      |

    The script returns {granted, ms to wait, the limits in force r, i, o (-1: none)}.
    """

    configured: tuple[int, int, int]
    burst_ms: int
    unknown_rpm: int
    refund: tuple[float, float, float]
    ok: int
    failed: int
    rate_limited: int
    pause_ms: int
    observed: bool
    named: tuple[int, int, int]
    remaining: tuple[int, int, int]
    observed_age_ms: int
    now_ms: int
    costs: list[tuple[int, int]]

    def args(self) -> list[object]:
        return [
            *self.configured, self.burst_ms, self.unknown_rpm, *(round(value, 3) for value in self.refund),
            self.ok, self.failed, self.rate_limited, self.pause_ms, int(self.observed), *self.named, *self.remaining,
            self.observed_age_ms, self.now_ms, len(self.costs), *(cost for pair in self.costs for cost in pair),
        ]  # fmt: skip


LIMIT = lua(
    """
local now = tonumber(ARGV[21])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local h = KEYS[1]
local names = {$R, $I, $O}
local raw = redis.call('HMGET', h, $TS, $LEVEL .. names[1], $LEVEL .. names[2], $LEVEL .. names[3],
  $LEARNED .. names[1], $LEARNED .. names[2], $LEARNED .. names[3], $SEEN, $PAUSE, $OKW, $FAILW, $COOL)
local ts = tonumber(raw[1]) or now
local level = {tonumber(raw[2]), tonumber(raw[3]), tonumber(raw[4])}
local learned = {tonumber(raw[5]) or 0, tonumber(raw[6]) or 0, tonumber(raw[7]) or 0}
local seen = tonumber(raw[8]) or 0
local pause = tonumber(raw[9]) or 0
local okw, failw = tonumber(raw[10]) or 0, tonumber(raw[11]) or 0
local cool = tonumber(raw[12]) or 2000
local burst_ms = tonumber(ARGV[4])

if tonumber(ARGV[13]) == 1 then
  seen = 1
  for b = 1, 3 do
    local named = tonumber(ARGV[13 + b])
    if named > 0 then learned[b] = named end
  end
end

local limit, rate, cap = {}, {}, {}
for b = 1, 3 do
  local cfg = tonumber(ARGV[b])
  local l = 0
  if cfg > 0 and learned[b] > 0 then l = math.min(cfg, learned[b])
  elseif cfg > 0 then l = cfg
  elseif learned[b] > 0 then l = learned[b]
  elseif b == 1 and seen == 0 then l = tonumber(ARGV[5]) end
  limit[b] = l
  if l > 0 then
    rate[b] = l / 60000
    cap[b] = math.max(1, l * burst_ms / 60000)
    local lv = level[b] or cap[b]
    level[b] = math.min(cap[b], lv + rate[b] * math.max(0, now - ts))
  end
end

for b = 1, 3 do
  if limit[b] > 0 then
    level[b] = math.min(cap[b], level[b] + tonumber(ARGV[5 + b]))
    if tonumber(ARGV[13]) == 1 then
      local remaining = tonumber(ARGV[16 + b])
      if remaining >= 0 then
        level[b] = math.min(level[b], remaining + rate[b] * tonumber(ARGV[20]))
      end
    end
  end
end

-- circuit breaker over the last ~10 s of outcomes
local decay = 0.5 ^ (math.max(0, now - ts) / 10000)
okw = okw * decay + tonumber(ARGV[9])
failw = failw * decay + tonumber(ARGV[10])
if failw >= 8 and failw >= okw then
  pause = math.max(pause, now + cool)
  redis.call('HINCRBY', h, $TRIPS, 1)
  cool = math.min(cool * 2, 60000)
  okw, failw = 0, 0
elseif tonumber(ARGV[9]) > 0 and failw * 4 < okw then
  cool = 2000
end
local n429 = tonumber(ARGV[11])
if n429 > 0 then redis.call('HINCRBY', h, $RATE_LIMITED, n429) end
if tonumber(ARGV[12]) > 0 then pause = math.max(pause, now + tonumber(ARGV[12])) end

local granted, wait = 0, 0
local asked = tonumber(ARGV[22])
if now < pause then
  wait = pause - now
else
  for g = 0, asked - 1 do
    local cost = {1, tonumber(ARGV[23 + 2 * g]), tonumber(ARGV[24 + 2 * g])}
    local fits = true
    for b = 1, 3 do
      if limit[b] > 0 then
        local need = math.min(cost[b], cap[b])
        if level[b] < need then
          fits = false
          wait = math.max(wait, (need - level[b]) / rate[b])
        end
      end
    end
    if not fits then break end
    for b = 1, 3 do
      if limit[b] > 0 then level[b] = level[b] - cost[b] end
    end
    granted = granted + 1
  end
end
if granted > 0 then redis.call('HINCRBY', h, $GRANTED, granted) end

redis.call('HSET', h, $TS, now, $SEEN, seen, $PAUSE, pause, $OKW, okw, $FAILW, failw, $COOL, cool)
for b = 1, 3 do
  redis.call('HSET', h, $LEARNED .. names[b], learned[b], $EFFECTIVE .. names[b], limit[b])
  if limit[b] > 0 then redis.call('HSET', h, $LEVEL .. names[b], level[b]) end
end
redis.call('PEXPIRE', h, 86400000)
local function eff(b) if limit[b] > 0 then return tostring(limit[b]) end return '-1' end
return {granted, tostring(math.ceil(wait)), eff(1), eff(2), eff(3)}
""",
    R=LIMIT_BUDGETS[0], I=LIMIT_BUDGETS[1], O=LIMIT_BUDGETS[2], TS=LIMIT_TS, LEVEL=LIMIT_LEVEL, LEARNED=LIMIT_LEARNED,
    EFFECTIVE=LIMIT_EFFECTIVE, SEEN=LIMIT_SEEN, PAUSE=LIMIT_PAUSE, OKW=LIMIT_OK_WEIGHT, FAILW=LIMIT_FAIL_WEIGHT,
    COOL=LIMIT_COOL, TRIPS=LIMIT_BREAKER_TRIPS, RATE_LIMITED=LIMIT_RATE_LIMITED, GRANTED=LIMIT_GRANTED,
)  # fmt: skip


_BUDGET_NAMES = dict(zip(LIMIT_BUDGETS, ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute")))


class LimitStore:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def set_scope(self, job_id: str, scope: str) -> None:
        """Record which limiter buckets the job draws on, so `status` can show them."""
        self.redis.hset(JobKeys(job_id).meta, META_LIMIT_SCOPE, scope)

    def state(self, scope: str) -> dict[str, float]:
        raw = self.redis.hgetall(limiter_key(scope))
        return {name.decode(): float(value) for name, value in raw.items()}

    def summary(self, scope: str, given: RateLimits) -> dict:
        """The fleet's limits for one account and model: in force, given, learned from headers."""
        state = self.state(scope)

        def per_minute(field: str) -> int | None:
            value = state.get(field, 0)
            return int(value) if value > 0 else None

        paused_s = max(0.0, state.get(LIMIT_PAUSE, 0) / 1000 - time.time())
        return {
            **{name: per_minute(LIMIT_EFFECTIVE + b) for b, name in _BUDGET_NAMES.items()},
            "given": {name: getattr(given, attr) for name, attr in zip(_BUDGET_NAMES.values(), RateLimits.model_fields)},
            "learned": {name: per_minute(LIMIT_LEARNED + b) for b, name in _BUDGET_NAMES.items()},
            "granted": int(state.get(LIMIT_GRANTED, 0)),
            "rate_limited": int(state.get(LIMIT_RATE_LIMITED, 0)),
            "breaker_trips": int(state.get(LIMIT_BREAKER_TRIPS, 0)),
            "paused_s": round(paused_s, 1),
        }
