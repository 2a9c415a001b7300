"""What `status` and `jobs` print and the live viewer shows: a job's figures as one dict, and the list
of every job in a Redis, all read from committed state."""

from __future__ import annotations

from typing import Callable

from promptmill.config.prices import BATCH, PriceTable, UnknownModelError
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.fallback import fallback_status, switched_at
from promptmill.jobs.state.pace import JobPace, job_pace
from promptmill.jobs.state.status import JobState, JobStatus
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import iso_utc
from promptmill.reports.share import job_share


def job_status(spec: JobSpec, status: JobStatus, prices: PriceTable, store: JobStore) -> dict:
    """`status --json`: state, counts, tokens, cost, budget, limits, pace, share (and a batch job's
    batches and deadline, a fallback chain's position, a local engine's state)."""
    usage = status.usage
    pace = pace_of(store, spec, status)
    report = cost_report(spec, status, prices)
    return {
        "job_id": spec.job_id,
        "state": status.state.value,
        "error": status.error,
        "reason": pause_reason(status),
        "backend": spec.backend,
        "model": spec.model,
        "produced": status.produced,
        "total": status.total,
        "done": status.ok,
        "failed": status.failed,
        "pending": status.pending,
        "tokens": {
            "input": usage.input_tokens,
            "output": usage.output_tokens,
            "cache_read": usage.cache_read_input_tokens,
            "cache_creation": usage.cache_creation_input_tokens,
        },
        "cost_usd": float(report.cost_usd),
        "paid_twice": {"models": report.paid_twice, "cost_usd": float(report.paid_twice_usd)},
        "budget": vars(store.budgets.get(spec.job_id)),
        "limits": None if status.limit_scope is None else store.limits.summary(status.limit_scope, spec.limits),
        **({"batches": _batches(store, spec.job_id)} if spec.info.batches else {}),
        **({"deadline": _deadline(store, spec, status)} if spec.deadline_at is not None else {}),
        **({"fallback": chain} if (chain := fallback_status(store.redis, spec)) is not None else {}),
        **pace.as_dict(),
        "share": job_share(store, spec, status, pace),
        **({"engine": status.engine} if spec.info.local else {}),
        "out_dir": spec.out_dir,
    }


def pace_of(store: JobStore, spec: JobSpec, status: JobStatus) -> JobPace:
    return job_pace(store.redis, spec.job_id, status.pending if status.produced else max(status.pending, 1))


def pause_reason(status: JobStatus) -> str | None:
    """Why a paused job waits (None: it is not paused)."""
    if status.state is JobState.paused:
        return status.error
    if status.state is JobState.paused_budget:
        return "budget: the next request would pass it; `promptmill resume JOB --budget USD` goes on"
    return None


def _deadline(store: JobStore, spec: JobSpec, status: JobStatus) -> dict:
    """A batch job's deadline, whether its rows went over to the real-time API, and the rows each way."""
    went_over = switched_at(store.redis, spec.job_id)
    batch = sum(count for model, count in status.requests_by_model.items() if model.endswith(BATCH))
    return {
        "at": iso_utc(spec.deadline_at), "realtime_since": iso_utc(went_over),
        "rows_batch": batch, "rows_realtime": sum(status.requests_by_model.values()) - batch,
    }  # fmt: skip


def _batches(store: JobStore, job_id: str) -> list[dict]:
    """Each provider batch of the job, as its workers last saw it (an OpenAI batch's files too)."""
    return [
        {"id": record.batch_id, "status": record.processing_status, "requests": record.requests,
         **record.counts.model_dump(), **({"files": record.files} if record.files else {})}
        for record in store.batches.all(job_id)
    ]


def eta_text(seconds: float) -> str:
    """A time left as `jobs` and the viewer show it: 1h05m, 4m09s."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def job_list(store: JobStore, prices_of: Callable[[JobSpec], PriceTable] | None = None) -> list[dict]:
    """`jobs --json`: every job in this Redis (newest last), with a running one's share of the fleet,
    pace and ETA; with `prices_of(spec)`, each one's cost so far and budget too."""
    listed = []
    for job_id in store.job_ids():
        try:
            status = store.status(job_id)
            spec = store.spec(job_id)
        except KeyError:
            continue  # expired as we listed it
        job = {
            "job_id": job_id, "state": status.state.value, "ok": status.ok, "failed": status.failed,
            "total": status.total, "backend": spec.backend, "model": spec.model, "reason": pause_reason(status),
            "weight": spec.priority, "share": None, "rows_per_s": None, "eta_s": None,
        }  # fmt: skip
        if prices_of is not None:
            try:
                cost_usd: float | None = float(cost_report(spec, status, prices_of(spec)).cost_usd)
            except UnknownModelError:  # its ledger names a model this machine's table has no price for
                cost_usd = None  # (one job's cost unknown here never hides the others)
            job.update(produced=status.produced, created_at=status.created_at, cost_usd=cost_usd,
                       budget_usd=store.budgets.get(job_id).cap_usd)  # fmt: skip
        if status.state.runnable:
            pace = pace_of(store, spec, status)
            share = job_share(store, spec, status, pace)
            job.update(share=share["fair_fraction"], slots=share["slots"], limit_fraction=share["limit_fraction"],
                       rows_per_s=pace.rows_per_s["last_minute"], eta_s=pace.eta_s)  # fmt: skip
        listed.append(job)
    return listed
