"""A job's share of the fleet, as `status`, `jobs` and the metrics show it: its weight, the fair share
that weight gives it among the jobs waiting for the same workers, the worker slots it holds, and the
fraction of the rate limit its requests used over the last minute."""

from __future__ import annotations

import time

from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.pace import SLOT_S, JobPace
from promptmill.jobs.state.status import JobStatus
from promptmill.jobs.state.store import JobStore


def limit_fraction(pace: JobPace, now: float | None = None) -> float | None:
    """Requests sent over the last minute as a fraction of what the requests-per-minute limit in force
    allowed in that time (None: no limit applies, as on a local engine or before any request)."""
    now = time.time() if now is None else now
    since = (int(now) // SLOT_S - 60 // SLOT_S + 1) * SLOT_S
    recent = [(start, requests, rpm) for start, requests, _, _, _, rpm, _ in pace.requests_over_time if start >= since]
    rpms = [rpm for _, _, rpm in recent if rpm]
    if not rpms:
        return None
    window_s = max(now - max(since, min(start for start, _, _ in recent)), 1.0)
    return round(sum(requests for _, requests, _ in recent) / (max(rpms) / 60 * window_s), 4)


def job_share(store: JobStore, spec: JobSpec, status: JobStatus, pace: JobPace) -> dict:
    slots = store.running_chunks(spec.job_id)
    return {
        "weight": spec.priority,
        "fair_fraction": store.fair.fraction(spec.job_id, spec.queue, spec.priority, bool(slots))
        if status.state.runnable else 0.0,
        "slots": slots,
        "limit_fraction": limit_fraction(pace),
        "waiting_chunks": store.fair.waiting(spec.job_id),
    }
