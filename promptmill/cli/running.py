"""Commands that run a job: `run` and `resume` here to the end, `submit` for workers anywhere."""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import typer

from rich.markup import escape

from promptmill.api.driving import drive as api_drive
from promptmill.api.driving import hand_to_fleet, reopen
from promptmill.cli.app import JobArg, JsonFlag, app, budget_checked, err, expire_if_finished, fail, open_job, open_store, out
from promptmill.cli.new_job import JobRequest, job_command
from promptmill.config.settings import Settings, get_settings
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.enqueue import enqueue
from promptmill.jobs.export import export_job
from promptmill.jobs.failure_share import failures_by_kind, too_many_failed
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.producer import ProducerFailed
from promptmill.jobs.retry_failed import requeue_failed
from promptmill.jobs.shards import ShardError
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState, JobStatus
from promptmill.jobs.state.store import JobStore
from promptmill.reports.progress import WorkersExited


def sigterm_as_interrupt() -> None:
    """SIGTERM stops a run as Ctrl-C does: local workers are stopped, the job stays resumable."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def ways_out(what: str, go_on: str, logs: Path | str) -> Iterator[None]:
    """A job driven here, its ways out said as a command says them: Ctrl-C (or SIGTERM) leaves it to
    `go_on`, workers that keep dying point at their `logs`, an unreadable input names `what` stopped."""
    sigterm_as_interrupt()
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"\ninterrupted: workers stopped; go on with [bold]{escape(go_on)}[/]", soft_wrap=True)
        raise typer.Exit(130)
    except WorkersExited as died:
        fail(f"{died}; see the logs in {logs}", code=1)
    except ProducerFailed as stopped:
        fail(f"{what}: {stopped}\nfix the input, then: {go_on}", code=1)


def drive(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, workers: int, resuming: bool, go_on: str,
    max_failed_share: float | None = None,
) -> JobStatus:
    """The job driven here to its stop (promptmill.api.driving.drive); `go_on` is the command that
    picks it up again after a Ctrl-C."""
    with ways_out(f"job {spec.job_id}", go_on, Path(spec.out_dir) / "logs"):
        status = api_drive(settings, store, url, spec, workers, resuming, err, max_failed_share)
    return status


def _run_to_end(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, workers: int, resuming: bool, ending: RunEnding
) -> None:
    """Drive the job to its end here, then export it and print its totals (with --json, as JSON)."""
    started = time.monotonic()
    job_id = spec.job_id
    status = drive(settings, store, url, spec, workers, resuming, f"promptmill resume {job_id}", ending.max_failed_share)
    elapsed = time.monotonic() - started
    summary: dict[str, Any] = {"job_id": job_id, "state": status.state.value, "reason": status.error,
                               "ok": status.ok, "failed": status.failed, "total": status.total}  # fmt: skip
    if status.state is JobState.failed:
        if status.failed:
            _print_failures(store, spec)
        again = f"promptmill resume {job_id}" + (" --retry-failed" if status.failed else "")
        ending.stop(summary, f"job {job_id} stopped: {status.error}\nfix the cause, then: {again}", 1)
    if status.state is JobState.cancelled:
        ending.stop(summary, f"job {job_id} was cancelled; promptmill resume {job_id} picks it up again", 1)
    if status.state is JobState.paused:
        ending.stop(summary, f"job {job_id} paused: {status.error}", 4)
    if status.state is JobState.paused_budget:
        spent = store.budgets.get(job_id)
        summary["reason"] = "budget"
        ending.stop(
            summary,
            f"job {job_id} paused at its budget: ${spent.spent_usd:.6f} of ${spent.cap_usd:.6f} spent, "
            f"{status.terminal:,} of {status.total:,} rows done; promptmill resume {job_id} --budget USD goes on",
            3,
        )
    written = export_job(store, spec, Path(spec.out_dir))
    expire_if_finished(store, job_id, settings)
    report = cost_report(spec, status, spec.pipeline.price_table(settings))
    usage = status.usage
    summary |= {
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(status.total / max(elapsed, 1e-9), 3),
        "tokens": {"input": usage.input_tokens, "output": usage.output_tokens,
                   "cache_read": usage.cache_read_input_tokens, "cache_creation": usage.cache_creation_input_tokens},
        "cost_usd": float(report.cost_usd), "results": written["results"], "failures": written["failures"],
    }  # fmt: skip
    if not ending.as_json:
        err.print(
            f"[bold green]done[/] {status.ok:,} ok, {status.failed:,} failed of {status.total:,} rows "
            f"in {elapsed:.1f}s ({status.total / max(elapsed, 1e-9):,.1f} rows/s)\n"
            f"tokens: {usage.input_tokens:,} input, {usage.output_tokens:,} output, "
            f"{usage.cache_read_input_tokens:,} cache read, {usage.cache_creation_input_tokens:,} cache write; "
            f"cost ${report.cost_usd:.6f}\n"
            f"results: {escape(str(written['results']))}\nfailures: {escape(str(written['failures']))}",
            highlight=False,
        )
    too_many = too_many_failed(status, ending.max_failed_share, finished=True)
    if too_many is not None:
        _print_failures(store, spec)
        summary["reason"] = too_many
        ending.stop(summary, f"job {job_id}: {too_many}; see {written['failures']}", 1)
    ending.stop(summary, None, 0)


@dataclass(frozen=True)
class RunEnding:
    """How `run` and `resume` end: --max-failed-share, and --json's summary on stdout."""

    max_failed_share: float
    as_json: bool

    def stop(self, summary: dict[str, Any], message: str | None, code: int) -> NoReturn:
        if self.as_json:
            out.print_json(json.dumps({**summary, "exit_code": code}))
        if message is not None:
            fail(message, code)
        raise typer.Exit(code)


def _print_failures(store: JobStore, spec: JobSpec) -> None:
    """The failures by kind, with one example each (stderr)."""
    kinds = failures_by_kind(store, spec)
    err.print("failures by kind:", highlight=False)
    for kind, seen in kinds.items():
        err.print(f"  {kind}: {seen.count:,} (row {seen.example_row}: {escape(seen.example[:300])})", highlight=False, soft_wrap=True)


MaxFailedShareOption = typer.Option(
    0.5, "--max-failed-share", min=0.0, max=1.0,
    help="Stop once more than this share of rows failed (judged after 100 rows; a run where every row failed exits 1 too).",
)  # fmt: skip


@job_command("run")
def run(
    request: JobRequest,
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes (default: 2 API, 1 vLLM)."),
    max_failed_share: float = MaxFailedShareOption,
    as_json: JsonFlag = False,
) -> None:
    """Run a job here to the end: embedded Redis (unless PROMPTMILL_REDIS_URL), local workers, progress,
    export. Exit 1: it failed or too many rows failed; 3: paused at its budget; 4: paused by an outage."""
    settings = get_settings()
    spec = request.spec(settings)
    (err if as_json else out).print(f"job {spec.job_id}", highlight=False)
    with open_store(settings) as (store, url):
        request.create(store, spec)
        ending = RunEnding(max_failed_share, as_json)
        _run_to_end(settings, store, url, spec, workers or spec.info.local_workers, False, ending)


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


@app.command()
def resume(
    job_id: JobArg,
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes."),
    budget: Optional[float] = typer.Option(
        None, "--budget", min=0.0, callback=budget_checked,
        help="A new cap in USD for the whole job (what it spent so far counts).",
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Send the failed rows again (their attempts keep counting); rows whose input is at fault stay failed."
    ),
    max_failed_share: float = MaxFailedShareOption,
    as_json: JsonFlag = False,
    detach: bool = typer.Option(
        False, "--detach",
        help="Hand the job back to the fleet's workers on PROMPTMILL_REDIS_URL and return at once (no local workers), "
        "as `submit` does.",
    ),
) -> None:
    """Pick a stopped, failed, cancelled or paused job up where it stopped, here, to the end (with
    --detach: on the fleet's workers)."""
    if detach and not get_settings().redis_url:
        fail("--detach hands the job to the workers on PROMPTMILL_REDIS_URL; without one, resume runs it here")
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
        shown = err if as_json else out
        if status.state is JobState.complete:
            shown.print(f"job {job_id} is already complete; exporting")
        shown.print(f"job {job_id}", highlight=False)
        total = f"{status.total:,}" if status.produced else f"{status.total:,} enqueued"
        err.print(
            f"resuming: {status.terminal:,} of {total} rows already done ({status.ok:,} ok, {status.failed:,} failed)",
            highlight=False,
            soft_wrap=True,
        )
        if detach:
            if status.state is not JobState.complete:
                hand_to_fleet(settings, store, spec)
                err.print(f"back with the fleet's workers on queue {spec.queue!r}")
            out.print(spec.job_id, highlight=False)
            return
        ending = RunEnding(max_failed_share, as_json)
        _run_to_end(settings, store, url, spec, workers or spec.info.local_workers, True, ending)
