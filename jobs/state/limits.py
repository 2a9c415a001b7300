"""The fleet's rate-limit state as readers see it: which buckets a job draws on, and what they say.

The limiter itself (workers/rate_limit.py) writes these fields from its Lua script; their names are
in jobs/keys.py.
"""

from __future__ import annotations

import time

import redis

from promptmill.jobs.state.keys import (
    LIMIT_BREAKER_TRIPS,
    LIMIT_BUDGETS,
    LIMIT_EFFECTIVE,
    LIMIT_GRANTED,
    LIMIT_LEARNED,
    LIMIT_PAUSE,
    LIMIT_RATE_LIMITED,
    META_LIMIT_SCOPE,
    JobKeys,
    limiter_key,
)
from promptmill.pipelines.spec import RateLimits

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
