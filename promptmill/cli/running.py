"""Commands that run a job: `run` and `resume` here to the end, `submit` for workers anywhere."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from promptmill.cli.app import JobArg, app, err, expire_if_finished, fail, open_job, open_store, out
from promptmill.cli.new_job import JobRequest, job_command
from promptmill.config.settings import Settings, get_settings
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.state.embedded import embedded_redis
from promptmill.workers.local_workers import LocalWorkers
from promptmill.jobs.enqueue import enqueue
from promptmill.jobs.export import export_job
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.producer import ProducerFailed
from promptmill.reports.progress import JobProgress, WorkersExited, wait_for_job
from promptmill.jobs.retry_failed import requeue_failed
from promptmill.jobs.shards import ShardError, prepare_shards
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState, JobStatus
from promptmill.jobs.state.store import JobStore
from promptmill.workers.metrics_server import serving

def _sigterm_as_interrupt() -> None:
    """SIGTERM stops a run as Ctrl-C does: local workers are stopped, the job stays resumable."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def drive(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, workers: int, resuming: bool, go_on: str
) -> JobStatus:
    """Start local workers, feed them the job, show progress until it stops, stop what was started.
    `go_on` is the command that picks the job up again after a Ctrl-C."""
    _sigterm_as_interrupt()
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
            with JobProgress(store, spec, prices, err) as progress:
                enqueue(store, spec, sender, settings.max_pending_rows, resuming, progress.refresh, progress.refresh)
                # An embedded Redis that died is ours to bring back (on its port, with its data).
                embedded = None if settings.redis_url else embedded_redis(settings)
                return wait_for_job(progress, alive=local.keep_alive, on_redis_lost=embedded and embedded.start)
        except KeyboardInterrupt:
            err.print(f"\ninterrupted: stopping workers; go on with [bold]{go_on}[/]", soft_wrap=True)
            local.stop()
            raise typer.Exit(130)
        except WorkersExited as died:
            fail(f"{died}; see the logs in {Path(spec.out_dir) / 'logs'}", code=1)
        except ProducerFailed as stopped:
            fail(f"job {spec.job_id}: {stopped}\nfix the input, then: promptmill resume {spec.job_id}", code=1)
        finally:
            local.stop()
            sender.close()


def _run_to_end(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, workers: int, resuming: bool
) -> None:
    """Drive the job to its end here, then export it and print its totals."""
    started = time.monotonic()
    status = drive(settings, store, url, spec, workers, resuming, go_on=f"promptmill resume {spec.job_id}")
    elapsed = time.monotonic() - started
    if status.state is JobState.failed:
        fail(f"job {spec.job_id} stopped: {status.error}\nfix the cause, then: promptmill resume {spec.job_id}", code=1)
    if status.state is JobState.cancelled:
        fail(f"job {spec.job_id} was cancelled; promptmill resume {spec.job_id} picks it up again", code=1)
    if status.state is JobState.paused_budget:
        spent = store.budgets.get(spec.job_id)
        fail(
            f"job {spec.job_id} paused at its budget: ${spent.spent_usd:.6f} of ${spent.cap_usd:.6f} spent, "
            f"{status.terminal:,} of {status.total:,} rows done; promptmill resume {spec.job_id} --budget USD goes on",
            code=3,
        )
    written = export_job(store, spec, Path(spec.out_dir))
    expire_if_finished(store, spec.job_id, settings)
    report = cost_report(spec, status, spec.pipeline.price_table(settings))
    usage = status.usage
    err.print(
        f"[bold green]done[/] {status.ok:,} ok, {status.failed:,} failed of {status.total:,} rows "
        f"in {elapsed:.1f}s ({status.total / max(elapsed, 1e-9):,.1f} rows/s)\n"
        f"tokens: {usage.input_tokens:,} input, {usage.output_tokens:,} output, "
        f"{usage.cache_read_input_tokens:,} cache read, {usage.cache_creation_input_tokens:,} cache write; "
        f"cost ${report.cost_usd:.6f}\n"
        f"results: {written['results']}\nfailures: {written['failures']}",
        highlight=False,
    )


def check_model_built(spec: JobSpec, settings: Settings) -> None:
    """A local model of the job (its own, or one of its fallback chain) must be built here before
    workers start on it."""
    # The CLI sits above the workers: it may ask their model registry whether the model is built.
    from promptmill.workers.local_model import ModelNotBuiltError, resolve_model

    for i, link in enumerate(spec.links()):
        if link.info.local:
            try:
                resolve_model(link.model, settings)
            except ModelNotBuiltError as missing:
                fail(f"{'fallback: vllm:' + link.model if i else 'model'}: {missing}")


@job_command("run")
def run(
    request: JobRequest,
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes (default: 2 API, 1 vLLM)."),
) -> None:
    """Run a job here to the end: embedded Redis (unless PROMPTMILL_REDIS_URL), local workers, progress, export."""
    settings = get_settings()
    spec = request.spec(settings)
    check_model_built(spec, settings)
    out.print(f"job {spec.job_id}", highlight=False)
    with open_store(settings) as (store, url):
        request.create(store, spec)
        _run_to_end(settings, store, url, spec, workers or spec.info.local_workers, resuming=False)


@job_command("submit")
def submit(request: JobRequest) -> None:
    """Enqueue a job on the shared Redis (PROMPTMILL_REDIS_URL) for workers anywhere; prints the job id last."""
    settings = get_settings()
    if not settings.redis_url:
        fail("submit needs PROMPTMILL_REDIS_URL, the Redis your workers use; `promptmill run` runs a job here")
    spec = request.spec(settings)
    store = JobStore.from_url(settings.redis_url)
    request.create(store, spec)
    sender = ChunkSender.for_url(settings.redis_url)
    err.print(f"job {spec.job_id}", highlight=False)
    said_waiting = False

    def waiting() -> None:
        nonlocal said_waiting
        if not said_waiting:
            err.print(
                f"{settings.max_pending_rows:,} rows wait for workers; enqueuing the rest as they finish "
                "(PROMPTMILL_MAX_PENDING_ROWS bounds what Redis holds)"
            )
            said_waiting = True

    try:
        rows = enqueue(store, spec, sender, settings.max_pending_rows, on_wait=waiting)
    except ProducerFailed as stopped:
        fail(f"job {spec.job_id}: {stopped}\nfix the input, then: promptmill resume {spec.job_id}", code=1)
    finally:
        sender.close()
    err.print(f"queued {rows:,} rows on queue {spec.queue!r}")
    out.print(spec.job_id, highlight=False)


def reopen(settings: Settings, store: JobStore, spec: JobSpec, budget: float | None = None) -> JobStatus:
    """Make a stopped job runnable again: its budget (a new cap, or the old one) counts what its ledger
    spent and lets go of what dead workers held; its state says where it goes on from."""
    status = store.status(spec.job_id)
    cap = store.budgets.get(spec.job_id).cap_usd if budget is None else budget
    ledger_usd = float(cost_report(spec, status, spec.pipeline.price_table(settings)).cost_usd)
    store.budgets.set(spec.job_id, cap, ledger_usd)
    if status.state is not JobState.complete:
        store.set_state(spec.job_id, JobState.running if status.produced else JobState.producing)
    prepare_shards(spec)
    return status


@app.command()
def resume(
    job_id: JobArg,
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes."),
    budget: Optional[float] = typer.Option(
        None, "--budget", min=0.0, help="A new cap in USD for the whole job (what it spent so far counts)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Send the failed rows again (their attempts keep counting); rows whose input is at fault stay failed."
    ),
) -> None:
    """Pick a stopped, failed, cancelled or paused job up where it stopped, here, to the end."""
    with open_job(job_id) as (settings, store, url, spec):
        if retry_failed:
            try:
                requeued = requeue_failed(store, spec)
            except ShardError as missing:
                fail(str(missing), code=1)
            if requeued.rows:
                store.reopen(job_id)
            err.print(
                f"retrying {requeued.rows:,} failed rows"
                + (f"; {requeued.kept_failed:,} failed for their input and stay failed" if requeued.kept_failed else ""),
                highlight=False,
            )
        status = reopen(settings, store, spec, budget)
        if status.state is JobState.complete:
            out.print(f"job {job_id} is already complete; exporting")
        out.print(f"job {job_id}", highlight=False)
        total = f"{status.total:,}" if status.produced else f"{status.total:,} enqueued"
        err.print(
            f"resuming: {status.terminal:,} of {total} rows already done ({status.ok:,} ok, {status.failed:,} failed)",
            highlight=False,
            soft_wrap=True,
        )
        _run_to_end(settings, store, url, spec, workers or spec.info.local_workers, resuming=True)
