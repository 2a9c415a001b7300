"""Celery settings shared by the submitters and the workers.

Chunks are short tasks (one chunk of rows), acknowledged only when done (`acks_late`) and given back to
the queue when their worker process dies (`task_reject_on_worker_lost`); promptmill's own done marks
make a second run of a chunk skip its finished rows, and its row-start counts fail a row that kills
its worker every time. A worker reserves no more messages than it runs (prefetch 1 per slot) so a
slow chunk does not hold others hostage. Results travel through the job store, not Celery's result
backend (there is none). A chunk whose worker was killed does not wait for the visibility timeout: the workers'
sweeper (workers/sweeper.py) sends it again within seconds.
"""

from __future__ import annotations

from typing import Any

from promptmill.config.backends import QUEUES

TASK_RUN_CHUNK = "promptmill.run_chunk"  # run this chunk (a lost one sent again, a retry, rows handed on)
TASK_RUN_NEXT = "promptmill.run_next"  # pick the chunk next by the jobs' fair shares (jobs/state/fair.py)
# A queue on Redis serves its lower priority numbers first (kombu's steps 0, 3, 6, 9). Chunks sent by
# name go at the default, 0; "pick the next chunk" messages at 9, behind them: a slot that picked a
# chunk runs it before any slot makes another pick, so Celery's queue never stacks up picked chunks.
NEXT_PRIORITY = 9
# kombu re-delivers a message still unacknowledged this long after delivery: a last resort, long
# enough that a slow chunk is never delivered twice while it runs (its lease would hold the second
# one off anyway).
VISIBILITY_TIMEOUT_S = 3600
# Every Redis connection, ours and kombu's: no command we send blocks for long, so a connection silent
# this long is dead (a dropped network, a frozen server) and fails instead of hanging a worker or `run`.
REDIS_SOCKET_TIMEOUT_S = 30.0
REDIS_CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
    "socket_connect_timeout": 10.0,
    "socket_keepalive": True,
    "health_check_interval": 15,
}


def celery_config(redis_url: str) -> dict[str, Any]:
    # No result backend: outcomes travel through the job store, and a Redis result backend would open
    # a pubsub subscription per task sent.
    return {
        "broker_url": redis_url,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S, **REDIS_CONNECTION_OPTIONS},
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUES[0],
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        # Task events for Flower (and `celery events`): a few Redis publishes per chunk of rows.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }
