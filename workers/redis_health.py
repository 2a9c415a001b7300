"""At worker start: warn when the Redis under the fleet can lose a job's state.

With persistence off a Redis restart forgets every job (committed rows included), and with an
eviction policy other than `noeviction` a full Redis silently drops job keys. Managed Redis services
may refuse CONFIG: then nothing is said.
"""

from __future__ import annotations

import logging

import redis
from celery.signals import worker_ready

from promptmill.workers.runtime import runtime

log = logging.getLogger(__name__)


def redis_risks(client: redis.Redis) -> list[str]:
    try:
        config = client.config_get("appendonly") | client.config_get("save") | client.config_get("maxmemory-policy")
    except redis.ResponseError:
        return []  # CONFIG disabled (managed services): nothing to tell
    risks = []
    if config.get("appendonly") != "yes" and not config.get("save"):
        risks.append(
            "Redis has persistence off (appendonly no, no save points): a Redis restart loses every job's "
            "state; set appendonly yes"
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        risks.append(
            f"Redis maxmemory-policy is {policy}: a full Redis evicts job keys and loses rows; set noeviction"
        )
    return risks


@worker_ready.connect
def _warn_about_redis(**_: object) -> None:
    for risk in redis_risks(runtime().store.redis):
        log.warning("%s", risk)
