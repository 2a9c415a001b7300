"""Running a job here to its end, as `promptmill run` and `pm.run` both do: the job store (the
configured Redis or an embedded one), local workers fed the job's chunks, the progress display, and
what a stopped job needs to go on. Errors are raised, never printed: each face says them its way."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console

from promptmill.config.settings import Settings
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.enqueue import enqueue
from promptmill.jobs.failure_share import too_many_failed
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.shards import prepare_shards
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.embedded import embedded_redis, redis_url_for
from promptmill.jobs.state.outage import OutageClock
from promptmill.jobs.state.status import JobState, JobStatus
from promptmill.jobs.state.store import JobStore
from promptmill.reports.progress import JobProgress, wait_for_job
from promptmill.workers.local_workers import LocalWorkers
from promptmill.workers.metrics_server import serving


@contextmanager
def open_store(settings: Settings) -> Iterator[tuple[JobStore, str]]:
    """The job store on the configured Redis, or on an embedded one started (and stopped) for the call."""
    url, embedded = redis_url_for(settings)
    try:
        yield JobStore.from_url(url), url
    finally:
        if embedded is not None:
            embedded.stop()


def create_job(store: JobStore, spec: JobSpec, budget: float | None) -> None:
    """The job in Redis with its budget cap (None: none), and its shard folder."""
    checked_budget(budget)
    store.create_job(spec)
    store.budgets.set(spec.job_id, budget)
    prepare_shards(spec)


def check_model_built(spec: JobSpec, settings: Settings) -> None:
    """A local model of the job (its own, or one of its fallback chain) must be built here before
    workers start on it; raises ModelNotBuiltError naming which."""
    from promptmill.workers.local_model import ModelNotBuiltError, resolve_model

    for i, link in enumerate(spec.links()):
        if link.info.local:
            try:
                resolve_model(link.model, settings)
            except ModelNotBuiltError as missing:
                raise ModelNotBuiltError(f"{'fallback: vllm:' + link.model if i else 'model'}: {missing}") from None


def reopen(settings: Settings, store: JobStore, spec: JobSpec, budget: float | None = None) -> JobStatus:
    """Make a stopped job runnable again: its budget (a new cap, or the old one) counts what its ledger
    spent and lets go of what dead workers held; its state says where it goes on from."""
    status = store.status(spec.job_id)
    OutageClock(store.redis, spec.job_id).reset()
    set_budget(settings, store, spec, store.budgets.get(spec.job_id).cap_usd if budget is None else budget)
    if status.state is not JobState.complete:
        store.set_state(spec.job_id, JobState.running if status.produced else JobState.producing)
    prepare_shards(spec)
    return status


def checked_budget(usd: float | None, error: type[Exception] = ValueError) -> float | None:
    """A budget cap as given, or `error` saying what is wrong with it: below 0, or no finite amount
    (inf, nan: a cap that caps nothing, or nothing that compares)."""
    if usd is not None and not math.isfinite(usd):
        raise error(f"budget: {usd} is no amount in USD (give a finite number, or none for no cap)")
    if usd is not None and usd < 0:
        raise error(f"budget: {usd} is below 0")
    return usd


def set_budget(settings: Settings, store: JobStore, spec: JobSpec, usd: float | None) -> None:
    """A new cap for the job (None: none), counting what its ledger has spent so far; workers on it
    keep what they hold for the requests in flight. ValueError for a cap below 0, or not finite."""
    checked_budget(usd)
    ledger_usd = float(cost_report(spec, store.status(spec.job_id), spec.pipeline.price_table(settings)).cost_usd)
    store.budgets.set(spec.job_id, usd, ledger_usd)


def hand_to_fleet(settings: Settings, store: JobStore, spec: JobSpec) -> int:
    """Give a reopened job back to the fleet's workers on PROMPTMILL_REDIS_URL (no local worker): its
    chunks wait their turn again, and a producer that had not finished goes on here. Returns the rows
    the producer read."""
    sender = ChunkSender.for_url(settings.redis_url)  # type: ignore[arg-type]
    try:
        return enqueue(store, spec, sender, settings.max_pending_rows, resuming=True)
    finally:
        sender.close()


def drive(
    settings: Settings,
    store: JobStore,
    url: str,
    spec: JobSpec,
    workers: int,
    resuming: bool,
    console: Console,
    max_failed_share: float | None = None,
) -> JobStatus:
    """Start local workers, feed them the job, show progress on `console` until it stops, stop what
    was started (on any way out: KeyboardInterrupt, WorkersExited and ProducerFailed pass through).
    Past `max_failed_share` of failed rows (once enough are done) the job is stopped."""

    def failing(status: JobStatus) -> bool:
        reason = None if max_failed_share is None else too_many_failed(status, max_failed_share, finished=False)
        if reason is not None:
            store.fail_job(spec.job_id, reason)
        return reason is not None

    prices = spec.pipeline.price_table(settings)
    with serving(settings.metrics_port, settings.metrics_address) as metrics_dir:
        # The job's queue gets `workers` processes; a queue its fallback chain crosses to (a vLLM
        # engine behind an api model) gets one.
        crossed = dict.fromkeys(link.queue for link in spec.links() if link.queue != spec.queue)
        queues = [spec.queue] * workers + list(crossed)
        local = LocalWorkers(url, queues, Path(spec.out_dir) / "logs", spec.job_id, metrics_dir)
        sender = ChunkSender.for_url(url)
        try:
            local.start()
            with JobProgress(store, spec, prices, console) as progress:
                enqueue(store, spec, sender, settings.max_pending_rows, resuming, progress.refresh, progress.refresh)
                # An embedded Redis that died is ours to bring back (on its port, with its data).
                embedded = None if settings.redis_url else embedded_redis(settings)
                return wait_for_job(
                    progress, alive=local.keep_alive, on_redis_lost=embedded and embedded.start, stop_when=failing
                )
        finally:
            local.stop()
            sender.close()


def expire_if_finished(store: JobStore, job_id: str, settings: Settings) -> None:
    """A complete job whose results are all on disk keeps its Redis keys for JOB_TTL_DAYS only."""
    if store.status(job_id).state is JobState.complete and store.chunks.all_flushed(job_id):
        store.mark_finished(job_id, settings.job_ttl_days * 86_400)
