"""Commands that read a job: `status`, `cost`, `verify`, `jobs`, and `estimate` before one runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich import box
from rich.table import Table

from promptmill.cli.app import (
    InputFormatOption,
    OldFormatOption,
    InputTpmOption,
    JobArg,
    JsonFlag,
    OutputTpmOption,
    RpmOption,
    app,
    err,
    fail,
    open_job,
    open_store,
    out,
    spec_or_fail,
)
from promptmill.cli.new_job import JobRequest
from promptmill.config.backends import DEFAULT_BACKEND
from promptmill.config.settings import get_settings
from promptmill.jobs.ledger import cost_report
from promptmill.reports.report import write_report
from promptmill.reports.status import job_status
from promptmill.jobs.verify import verify_job


@app.command()
def status(job_id: JobArg, as_json: JsonFlag = False) -> None:
    """Where a job stands: state, rows done, failed and pending, tokens and cost."""
    with open_job(job_id) as (settings, store, _, spec):
        info = job_status(spec, store.status(job_id), spec.pipeline.price_table(settings), store)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a path or an error folds, never cut
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
        elif key in ("latency_ms", "ttft_ms") and value is not None:
            value = ", ".join(f"{q} {ms:,.0f} ms" for q, ms in value.items() if ms is not None) or "none yet"
        elif key == "measured":
            value = "; ".join(f"{name}: {what}" for name, what in value.items())
        elif key in ("rows_per_s", "output_tokens_per_s"):
            value = f"{value['last_minute'] or 0:,.1f} over the last minute, {value['job'] or 0:,.1f} over the job"
        elif key == "eta_s" and value is not None:
            value = f"{value:,.0f}s"
        elif key == "share":
            value = _share_line(value)
        elif key == "fallback":
            value = f"on {value['on']} of {' -> '.join(value['chain'])}" + (f": {value['reason']}" if value["reason"] else "")
        elif key == "deadline":
            went = f"in real time since {value['realtime_since']}" if value["realtime_since"] else "in batches"
            value = (f"{value['at']}: rows go {went}; {value['rows_batch']:,} answered in batches, "
                     f"{value['rows_realtime']:,} in real time")  # fmt: skip
        elif key == "batches":
            value = "\n".join(_batch_line(batch) for batch in value) or "none yet"
        elif key == "budget":
            if value["cap_usd"] is None:
                value = "none"
            else:
                value = f"${value['spent_usd']:.6f} spent of ${value['cap_usd']:.6f}, ${value['held_usd']:.6f} held in flight"
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


def _share_line(share: dict) -> str:
    line = f"weight {share['weight']}, {share['fair_fraction']:.0%} of its workers' turns, {share['slots']} slots held"
    if share["limit_fraction"] is not None:
        line += f", {share['limit_fraction']:.0%} of the rate limit over the last minute"
    return line


def _batch_line(batch: dict) -> str:
    counts = ", ".join(f"{batch[name]:,} {name}" for name in ("processing", "succeeded", "errored", "canceled", "expired"))
    return f"{batch['id']} {batch['status']}: {batch['requests']:,} requests ({counts})"


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
def report(
    job_id: JobArg,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where report.html goes (default: the job's folder)."),
) -> None:
    """One self-contained report.html of the job's story in plots, from Redis and its shards (any machine)."""
    with open_job(job_id) as (settings, store, _, spec):
        folder = out_dir or Path(spec.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        shown = write_report(store, spec, spec.pipeline.price_table(settings), folder / "report.html")
    out.print(shown["report"], highlight=False, soft_wrap=True, markup=False)  # a path, never folded nor read as markup


@app.command()
def verify(job_id: JobArg, as_json: JsonFlag = False) -> None:
    """Recompute counters and the cost ledger from the committed outcomes; exit 1 if they disagree."""
    with open_job(job_id) as (settings, store, _, spec):
        result = verify_job(store, spec)
    if as_json:
        out.print_json(json.dumps({"job_id": job_id, "ok": result.ok, "rows": result.rows, "problems": result.problems}))
        raise typer.Exit(0 if result.ok else 1)
    if not result.ok:
        for problem in result.problems:
            err.print(f"[bold red]mismatch:[/] {escape(problem)}", highlight=False)
        raise typer.Exit(1)
    out.print(f"ok: {result.rows:,} committed rows; counters and ledger match them exactly", highlight=False)


@app.command()
def estimate(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file, or an OpenAI batch file."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="The pipeline TOML file (optional for a batch file)."),
    model: Optional[str] = typer.Option(None, help="Overrides the pipeline's model."),
    rpm: Optional[int] = RpmOption,
    input_tpm: Optional[int] = InputTpmOption,
    output_tpm: Optional[int] = OutputTpmOption,
    input_format: Optional[str] = InputFormatOption,
    old_format: Optional[str] = OldFormatOption,
    sample: int = typer.Option(100, min=1, help="Rows whose input tokens are counted; the rest are scaled."),
    job_id: Optional[str] = typer.Option(
        None, "--job", help="A running or finished job of this pipeline: project output (and engine speed) from it."
    ),
    backend: str = typer.Option(
        DEFAULT_BACKEND, "--backend", "-b", help="anthropic (tokens counted by the API) or vllm (offline, by the model's tokenizer)."
    ),
    as_json: JsonFlag = False,
) -> None:
    """What a job would cost before it runs: input tokens counted (by the API, or offline by a local
    model's own tokenizer), low and high dollars, time."""
    import anthropic

    from promptmill.api.estimating import estimate_spec, output_per_row

    settings = get_settings()
    if backend not in ("anthropic", "vllm"):
        fail(f"--backend: estimate counts tokens for anthropic or vllm, not {backend!r}")
    asked = JobRequest(input_path, pipeline, backend, model, None, None, rpm, input_tpm, output_tpm, input_format, None, old_format)  # type: ignore[arg-type]
    spec = asked.spec(settings)
    observed = None
    if job_id is not None:
        with open_store(settings) as (store, _):
            spec_or_fail(store, job_id)
            observed = store.status(job_id)
        if not observed.requests_by_model.get(spec.model, 0):
            fail(f"--job: job {job_id} has no answers from {spec.model} yet")
    per_row = output_per_row(spec, observed)
    prices = spec.pipeline.price_table(settings)
    try:
        figures, speed = estimate_spec(settings, spec, sample, observed)
    except anthropic.APIError as error:
        fail(f"the API could not count tokens: {error}")
    if as_json:
        out.print_json(json.dumps({**figures.as_dict(), **({"engine": speed} if speed else {})}))
        return
    if speed is not None:
        low, high = (figures.input_tokens / speed["input_tokens_per_s"] + tokens / speed["output_tokens_per_s"]
                     for tokens in (figures.output_tokens_low, figures.output_tokens_max))  # fmt: skip
        out.print(
            f"{figures.rows:,} rows ({figures.unusable_rows:,} unusable) for the local {spec.model}\n"
            f"input: {figures.input_tokens:,} tokens (counted offline by its tokenizer on {figures.rows_counted:,} rows)\n"
            f"output: {figures.output_tokens_low:,} to {figures.output_tokens_max:,} tokens (max_tokens {spec.pipeline.max_tokens})\n"
            f"device time: {low:,.0f} to {high:,.0f}s at {speed['input_tokens_per_s']:,.0f} input and "
            f"{speed['output_tokens_per_s']:,.0f} output tokens/s ({speed['measured_by']})\n"
            f"cost: ${figures.cost_usd_low:,.4f} to ${figures.cost_usd_high:,.4f} at ${prices.engine_hour_usd}/device-hour "
            "(PROMPTMILL_GPU_HOUR_USD)",
            highlight=False,
        )
        return
    expected = (
        f"; expected ${figures.cost_usd_expected:,.4f} at {per_row:.1f} output tokens a row (job {job_id})"
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
        f"input: {figures.input_tokens:,} tokens ({exact}; the API counted {figures.rows_counted:,} rows)"
        + (f", of them images {figures.image_tokens:,} (width x height / 750) and documents {figures.document_tokens:,}"
           if figures.image_tokens or figures.document_tokens else "")
        + "\n"
        f"output: {figures.output_tokens_low:,} to {figures.output_tokens_max:,} tokens (max_tokens {spec.pipeline.max_tokens})\n"
        f"cost: ${figures.cost_usd_low:,.4f} to ${figures.cost_usd_high:,.4f}{expected}"
        + (
            f"; through Message Batches (--backend anthropic-batch, x{figures.batch_discount}): "
            f"${figures.batch_cost_usd[0]:,.4f} to ${figures.batch_cost_usd[1]:,.4f}"
            if figures.batch_cost_usd
            else ""
        )
        + limits_note,
        highlight=False,
    )




@app.command()
def cost(job_id: JobArg, as_json: JsonFlag = False) -> None:
    """What the job has spent, by model: requests, tokens of each kind, US dollars."""
    with open_job(job_id) as (settings, store, _, spec):
        prices = spec.pipeline.price_table(settings)
        report = cost_report(spec, store.status(job_id), prices)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    local = report.comparison_model is not None
    rows = []
    for model in report.models:
        u = model.usage
        rows.append([model.model, f"{model.requests:,}", f"{model.failed_attempts:,}", f"{u.input_tokens:,}",
                     f"{u.output_tokens:,}", f"{u.cache_creation_input_tokens:,}", f"{u.cache_read_input_tokens:,}",
                     *([f"{u.engine_us / 1e6:,.1f}"] if local else []), f"${model.cost_usd:.6f}"])  # fmt: skip
    rows.append(["total", *[""] * (len(rows[0]) - 2 if rows else 6 + local), f"${report.cost_usd:.6f}"])
    titles = ["requests", "failed", "input", "output", "cache\nwrite", "cache\nread", *(["engine\ns"] if local else []), "USD"]
    # 80 columns hold it: short headers, no frame, figures never cut (the model's name folds instead).
    table = Table(title=f"cost of job {job_id} ({spec.backend})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold", min_width=min(24, max(len(row[0]) for row in rows)))
    for i, title in enumerate(titles, start=1):
        widest = max(len(row[i]) for row in rows)
        table.add_column(title, justify="right", no_wrap=True, min_width=max(widest, *map(len, title.split())))
    for i, row in enumerate(rows):
        table.add_row(*row, style="bold" if i == len(rows) - 1 else None)
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
