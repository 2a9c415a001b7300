"""Commands that change a job's life: `cancel`, `export`, `delete`, `gc`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from promptmill.cli.app import JobArg, app, err, expire_if_finished, fail, open_job, open_store, out
from promptmill.api.driving import set_budget
from promptmill.config.settings import Settings, get_settings
from promptmill.jobs.export import EXPORT_FORMATS, FilesKept, export_job, own_folder, remove_job_files
from promptmill.jobs.shards import ShardError
from promptmill.jobs.state.status import JobState
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.spec import duration_s


@app.command()
def cancel(job_id: JobArg) -> None:
    """Stop a job: workers finish the rows in flight and leave the rest; `resume` restarts it."""
    with open_job(job_id) as (settings, store, _, spec):
        if store.status(job_id).state is JobState.complete:
            fail(f"job {job_id} is already complete")
        store.set_state(job_id, JobState.cancelled)
        if spec.info.batches:
            _cancel_batches(settings, store, spec)
    out.print(f"job {job_id} cancelled")


@app.command()
def pause(job_id: JobArg) -> None:
    """Pause a running job: workers commit the answers on the wire and take no more of its rows;
    `resume JOB` goes on where it stopped."""
    with open_job(job_id) as (_, store, _, _):
        if not store.pause(job_id):
            fail(f"job {job_id} is {store.status(job_id).state.value}: only a running job pauses")
    out.print(f"job {job_id} paused; `promptmill resume {job_id}` goes on")


@app.command()
def budget(
    job_id: JobArg,
    usd: str = typer.Argument(..., metavar="USD", help="The new cap in USD for the whole job, or `none`."),
) -> None:
    """Give a job a new budget (what it spent so far counts); a job paused at its old one goes on with
    `resume JOB`."""
    try:
        cap = None if usd.lower() == "none" else float(usd)
    except ValueError:
        fail(f"USD: {usd!r} is no amount (a number, or none)")
    with open_job(job_id) as (settings, store, _, spec):
        try:
            set_budget(settings, store, spec, cap)
        except ValueError as bad:  # below 0, or no finite amount
            fail(f"USD: {str(bad).removeprefix('budget: ')}")
        state = store.status(job_id).state
    out.print(f"job {job_id}: budget {'none' if cap is None else f'${cap:,.2f}'}"
              + (f"; `promptmill resume {job_id}` goes on" if state is JobState.paused_budget else ""), highlight=False)  # fmt: skip


def _cancel_batches(settings: Settings, store: JobStore, spec: JobSpec) -> None:
    """Cancel the provider's batches now (the workers waiting on them would too, at their next poll);
    what they answered before the cancel is kept, the rest stays pending for a resume."""
    open_batches = [record.batch_id for record in store.batches.all(spec.job_id) if record.open]
    if not open_batches:
        return
    from promptmill.workers.backends.base import FatalJobError
    from promptmill.workers.runtime import transport

    module = sys.modules[transport(spec).__module__]
    try:
        failed = module.cancel_now(settings, spec, open_batches)
    except FatalJobError:
        err.print(f"no API key here: the job's workers cancel its {len(open_batches):,} open batches at their next poll")
        return
    for batch_id, error in failed.items():
        if error is None:
            out.print(f"batch {batch_id} cancelled at the provider")
        else:
            err.print(f"could not cancel batch {batch_id}: {error}", markup=False)


@app.command()
def export(
    job_id: JobArg,
    fmt: str = typer.Option("jsonl", "--format", help=", ".join(EXPORT_FORMATS) + "."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the job's)."),
) -> None:
    """Write the job's results (one record per input row, in input order) and failures."""
    if fmt not in EXPORT_FORMATS:
        fail(f"--format must be {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    with open_job(job_id) as (settings, store, _, spec):
        try:
            written = export_job(store, spec, out_dir or Path(spec.out_dir), fmt)  # type: ignore[arg-type]
            expire_if_finished(store, job_id, settings)
        except ShardError as missing:
            fail(str(missing), code=1)
    out.print(f"{written['records']:,} records ({written['failed']:,} failed) to {written['results']}", markup=False)


def _delete(store: JobStore, job_id: str, files: bool) -> str:
    """Delete the job: its files first (a removal that fails can be run again while the job is still
    known), then its Redis keys. Raises `FilesKept` before deleting anything where its folder is not
    its own here."""
    spec = store.spec(job_id)
    if files:
        own_folder(spec)
    store.set_state(job_id, JobState.cancelled)  # workers on it stop sending before its keys go
    _let_running_chunks_end(store, job_id)
    removed = remove_job_files(spec) if files else []
    keys = store.delete_job(job_id) + store.forget_names(job_id)
    return f"deleted job {job_id}: {keys:,} Redis keys" + (f", {len(removed):,} files and folders" if files else "")


_STOP_WAIT_S = 10.0


def _let_running_chunks_end(store: JobStore, job_id: str) -> None:
    """The cancelled job's running chunks commit the answers on the wire and let go (a second or
    so): wait for them, a while at most. An answer that lands after the job's keys are gone is
    dropped by the worker, never written back."""
    deadline = time.monotonic() + _STOP_WAIT_S
    running = store.running_chunks(job_id)
    if running:
        err.print(f"waiting for {running:,} running chunks of job {job_id} to stop", highlight=False)
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = store.running_chunks(job_id)


@app.command()
def delete(
    job_id: JobArg,
    files: bool = typer.Option(False, "--files", help="Also remove its shards, results, failures, manifest and logs."),
) -> None:
    """Remove every Redis key of a job (and with --files what it wrote); workers still on it stop."""
    with open_job(job_id) as (settings, store, _, spec):
        try:
            out.print(_delete(store, job_id, files), highlight=False)
        except FilesKept as kept:
            fail(f"kept job {job_id} and its files: {kept}; `promptmill delete {job_id}` deletes its Redis keys alone",
                 code=1)  # fmt: skip


def _duration_s(text: str) -> float:
    try:
        return duration_s(text)
    except ValueError as bad:
        fail(f"--older-than: {bad}")


@app.command()
def gc(
    older_than: str = typer.Option("7d", "--older-than", help="Age since the job finished (s, m, h, d, w)."),
    files: bool = typer.Option(False, "--files", help="Also remove what each job wrote."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
) -> None:
    """Delete the complete jobs that finished longer ago than --older-than."""
    age_s = _duration_s(older_than)
    settings = get_settings()
    cutoff = time.time() - age_s
    deleted = 0
    with open_store(settings) as (store, _):
        for job_id in store.job_ids():
            try:
                status = store.status(job_id)
            except KeyError:
                continue
            ended = status.finished_at or status.created_at or time.time()
            if status.state is not JobState.complete or ended > cutoff:
                continue
            if not store.chunks.all_flushed(job_id):  # some results are only in Redis: export them first
                err.print(f"kept job {job_id}: its results are not all on disk; `promptmill export {job_id}` first")
                continue
            try:
                out.print(f"would delete job {job_id}" if dry_run else _delete(store, job_id, files), highlight=False, markup=False)
            except FilesKept as kept:
                err.print(f"kept job {job_id}: {kept}", highlight=False, markup=False)
                continue
            deleted += 1
    err.print(f"{deleted:,} complete jobs older than {older_than}" + (" (dry run)" if dry_run else " deleted"))
