"""`promptmill compare`: one sample of the input through every contender, each a job of its own, then
their figures side by side (a table, `--json`, `compare.html` and `rows.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import orjson
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from promptmill.cli.app import (
    InputFormatOption, JsonFlag, OldFormatOption, app, err, expire_if_finished, fail, input_format_of, open_store, out,
)
from promptmill.api.driving import check_model_built, create_job, reopen
from promptmill.cli.running import drive
from promptmill.workers.local_model import ModelNotBuiltError
from promptmill.config.settings import Settings, get_settings
from promptmill.reports.compare.page import write_compare_page
from promptmill.reports.compare.plan import (
    SAMPLE_FILE,
    CompareError,
    ComparePlan,
    Contender,
    default_folder,
    draw_sample,
    parse_contender,
    read_sample,
)
from promptmill.reports.compare.score import Score, accuracy, agreement, answer_of, confusion, score_records
from promptmill.jobs.export import export_job
from promptmill.jobs.files import atomic_write
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.readers import INPUT_FORMATS, detect_format
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.pipelines.spec import Pipeline


def _plan(
    input_path: Path, pipeline: Path, against: list[str], sample: int, seed: int, label: str | None, fmt: str | None
) -> ComparePlan:
    if not input_path.exists():
        fail(f"INPUT: {input_path} does not exist")
    if fmt not in (None, *INPUT_FORMATS):
        fail(f"--format must be one of {', '.join(INPUT_FORMATS)}, not {fmt!r}")
    try:
        contenders = [parse_contender(text) for text in against]
        input_format = fmt or detect_format(input_path)
    except (CompareError, ValueError) as bad:
        fail(str(bad))
    names = [contender.name for contender in contenders]
    if len(set(names)) < len(names):
        fail(f"--against: {next(n for n in names if names.count(n) > 1)} is given twice")
    return ComparePlan(
        input_path=str(input_path.resolve()), input_format=input_format, pipeline_path=str(pipeline.resolve()),
        sample=sample, seed=seed, label=label, contenders=contenders,
    )  # fmt: skip


def _contender_spec(settings: Settings, store: JobStore, plan: ComparePlan, folder: Path, contender: Contender) -> JobSpec:
    """The contender's job: the one it ran as, or a new one (checked, not yet created)."""
    if contender.job_id is not None and store.exists(contender.job_id):
        return store.spec(contender.job_id)
    try:
        spec = build_spec(
            settings, folder / SAMPLE_FILE, Path(plan.pipeline_path), contender.backend, contender.model,
            folder / contender.folder, overrides=contender.settings,
        )  # fmt: skip
    except SubmitError as bad:
        fail(f"--against {contender.name}: {bad}")
    try:
        check_model_built(spec, settings)
    except ModelNotBuiltError as missing:
        fail(f"--against {contender.name}: {missing}")
    return spec


def _run_contender(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, contender: Contender, workers: int | None, go_on: str
) -> None:
    """Run (or resume) the contender's job to its end here, export its records, note how it ended."""
    if contender.job_id != spec.job_id:
        create_job(store, spec, budget=None)
        contender.job_id = spec.job_id
        resuming = False
    else:
        resuming = True
        if reopen(settings, store, spec).state is JobState.complete:
            return _finish(settings, store, spec, contender)
    drive(settings, store, url, spec, workers or spec.info.local_workers, resuming, go_on)
    _finish(settings, store, spec, contender)


def _finish(settings: Settings, store: JobStore, spec: JobSpec, contender: Contender) -> None:
    status = store.status(spec.job_id)
    export_job(store, spec, Path(spec.out_dir))
    contender.state, contender.error = status.state.value, status.error
    contender.cost_usd = float(cost_report(spec, status, spec.pipeline.price_table(settings)).cost_usd)
    expire_if_finished(store, spec.job_id, settings)


def _records(folder: Path, contender: Contender, rows: int) -> list[dict[str, Any]]:
    """One record per sampled row, in order; a row a stopped job never finished reads as failed."""
    path = folder / contender.folder / "results.jsonl"
    found = {}
    if path.exists():
        found = {r["row"]: r for r in map(orjson.loads, path.read_bytes().splitlines()) if r}
    missing = {"status": "failed", "output": None, "error": {"kind": "not_run"}, "usage": {"output_tokens": 0},
               "latency_ms": None, "started_at": None, "finished_at": None}  # fmt: skip
    return [found.get(row, {**missing, "row": row}) for row in range(rows)]


def _scores(plan: ComparePlan, pipeline: Pipeline, folder: Path, sample: list[dict[str, Any]]) -> list[Score]:
    fieldwise = pipeline.output.type == "json"
    labels = [row.get(plan.label) for row in sample] if plan.label else None
    records = [_records(folder, contender, len(sample)) for contender in plan.contenders]
    scores = []
    for contender, mine in zip(plan.contenders, records):
        score = score_records(contender.name, contender.backend, contender.model, mine, contender.cost_usd or 0.0)
        score.state, score.error = contender.state or "not_run", contender.error
        score.accuracy = None if labels is None else accuracy(mine, labels, fieldwise)
        score.agreement = agreement(mine, records[0], fieldwise)
        if pipeline.output.type == "choice":
            score.confusion = confusion(mine, records[0])
        scale = plan.input_rows / len(sample)
        score.projection = {"rows": plan.input_rows, "cost_usd": round(score.cost_usd * scale, 6),
                            "hours": round(score.span_s * scale / 3600, 3)}  # fmt: skip
        scores.append(score)
    _write_rows(folder, plan, pipeline, sample, labels, records)
    return scores


def _write_rows(
    folder: Path, plan: ComparePlan, pipeline: Pipeline, sample: list[dict], labels: list | None, records: list[list[dict]]
) -> None:
    """rows.jsonl: each sampled row's input, label and every contender's answer, side by side."""
    with atomic_write(folder / "rows.jsonl") as handle:
        for i, row in enumerate(sample):
            answers = {c.name: answer_of(mine[i]) for c, mine in zip(plan.contenders, records)}
            line = {"row": plan.rows[i], "input": {column: row.get(column) for column in pipeline.columns}}
            if labels is not None:
                line["label"] = labels[i]
            line["answers"] = answers
            line["agree"] = len({orjson.dumps(a, option=orjson.OPT_SORT_KEYS) for a in answers.values()}) == 1
            handle.write(orjson.dumps(line, default=str) + b"\n")


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def _print_table(scores: list[Score]) -> None:
    table = Table(title="promptmill compare", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("contender", overflow="fold")
    for title in ("ok", "failed", "p50 ms", "p95 ms", "out tok/s", "cost $", "$ per 1k rows", "accuracy", "agree"):
        table.add_column(title, justify="right", no_wrap=title not in ("failed", "$ per 1k rows", "out tok/s"))
    for s in scores:
        failed = f"{s.failed}" + (f" ({', '.join(f'{k} {n}' for k, n in s.failures.items())})" if s.failures else "")
        per_1000 = "–" if s.cost_per_1000_rows_usd is None else _usd(s.cost_per_1000_rows_usd)
        table.add_row(
            escape(s.name + ("" if s.state == "complete" else f" ({s.state})")), f"{s.ok}", failed,
            _fmt(s.latency_ms_p50, ",.0f"), _fmt(s.latency_ms_p95, ",.0f"), _fmt(s.output_tokens_per_s, ",.1f"),
            _usd(s.cost_usd), per_1000, _fmt(s.accuracy, ".1%"), _fmt(s.agreement, ".1%"),
        )  # fmt: skip
    # Piped into a file or a log, the table keeps its rows whole rather than folding them at 80 columns.
    printer = out if out.is_terminal else Console(width=160)
    printer.print(table)
    for s in scores[1:]:
        if s.confusion:
            printer.print(f"\n{scores[0].name} (rows) against {s.name} (columns):", highlight=False, markup=False)
            confusions = Table(box=box.SIMPLE_HEAD, pad_edge=False)
            answers = sorted({answer for counts in s.confusion.values() for answer in counts})
            for title in ("", *answers):
                confusions.add_column(escape(title), justify="right")
            for first, counts in s.confusion.items():
                confusions.add_row(escape(first), *(str(counts.get(answer, 0)) for answer in answers))
            printer.print(confusions)


def _usd(value: float) -> str:
    """Cents for dollars, four figures for fractions of a cent."""
    return f"{value:,.2f}" if value >= 1 else f"{value:.4g}"


def _duration(hours: float) -> str:
    seconds = hours * 3600
    return f"{hours:,.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _projection_lines(plan: ComparePlan, scores: list[Score], rows: int) -> list[str]:
    return [
        f"projected for all {plan.input_rows:,} rows, from these {rows:,} (at this run's concurrency and limits): "
        + "; ".join(f"{s.name} ${_usd(s.projection['cost_usd'])} in {_duration(s.projection['hours'])}" for s in scores)
    ]


@app.command()
def compare(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file."),
    pipeline: Path = typer.Option(..., "--pipeline", "-p", help="The pipeline TOML file every contender runs."),
    against: list[str] = typer.Option(
        ..., "--against", "-a", metavar="BACKEND:MODEL",
        help="A contender, as BACKEND:MODEL[,temperature=T,top_p=P,max_tokens=N,seed=S]; give it twice or more. "
        "The first is the one the others' agreement is measured against.",
    ),  # fmt: skip
    sample: int = typer.Option(200, "--sample", min=1, help="Rows drawn at random (seeded) for every contender."),
    label: Optional[str] = typer.Option(None, "--label", help="The column holding each row's right answer."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Where the compare keeps its jobs and writes compare.html and rows.jsonl "
        "(default: promptmill-out/compare-INPUT-HASH, the same for the same command, so running it again resumes).",
    ),  # fmt: skip
    seed: int = typer.Option(0, "--seed", help="The sample's seed."),
    input_format: Optional[str] = InputFormatOption,
    old_format: Optional[str] = OldFormatOption,
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes per contender."),
    as_json: JsonFlag = False,
) -> None:
    """Run the same sample of rows through every contender (each a job, resumable: run the same command
    again after a stop), then compare failures, latency, speed, cost, accuracy and agreement."""
    settings = get_settings()
    plan = _plan(input_path, pipeline, against, sample, seed, label, input_format_of(input_format, old_format))
    folder = (out_dir or default_folder(plan)).resolve()
    saved = ComparePlan.load(folder)
    if saved is not None and not saved.asks_the_same(plan):
        fail(
            f"--out {folder} holds another compare ({', '.join(c.name for c in saved.contenders)} "
            f"on {saved.input_path}); choose another --out"
        )
    try:
        rows = read_sample(folder) if saved else draw_sample(plan, folder, settings.max_row_bytes)
    except CompareError as bad:
        fail(str(bad))
    plan = saved or plan
    if not rows:
        fail(f"INPUT: {input_path} has no readable row to sample")
    err.print(
        f"{'resuming the compare' if saved else 'compare'} in {folder}: {len(rows):,} of {plan.input_rows:,} rows "
        f"(seed {plan.seed}), {len(plan.contenders)} contenders",
        highlight=False,
        soft_wrap=True,
    )
    go_on = f"the same promptmill compare command, with --out {folder}"
    with open_store(settings) as (store, url):
        specs = [_contender_spec(settings, store, plan, folder, contender) for contender in plan.contenders]
        plan.save(folder)
        for i, (contender, spec) in enumerate(zip(plan.contenders, specs), start=1):
            if contender.state == "complete" and not store.exists(spec.job_id):
                continue  # done before, and its job has since expired from Redis: its records are on disk
            err.print(f"[{i}/{len(specs)}] {contender.name}: job {spec.job_id}", highlight=False, markup=False)
            try:
                _run_contender(settings, store, url, spec, contender, workers, go_on)
            finally:
                plan.save(folder)
            if contender.state != JobState.complete.value:
                # The error is the provider's or a worker's text: printed as it is, never read as markup.
                stopped = escape(f"{contender.name} stopped {contender.state}: {contender.error}")
                err.print(f"[yellow]{stopped}[/]", highlight=False, soft_wrap=True)
    try:
        compared = _scores(plan, specs[0].pipeline, folder, rows)
    except ValueError as bad:
        fail(f"scoring: {bad}", code=1)
    notes = _projection_lines(plan, compared, len(rows))
    title = f"{Path(plan.input_path).name}: {len(rows):,} rows through {len(compared)} contenders"
    write_compare_page(folder / "compare.html", title, compared, notes)
    if as_json:
        figures = {"contenders": [score.as_dict() for score in compared], "sample": len(rows),
                   "input_rows": plan.input_rows, "out": str(folder)}  # fmt: skip
        out.print_json(json.dumps(figures))
    else:
        _print_table(compared)
        for note in notes:
            out.print(note, highlight=False, soft_wrap=True, markup=False)
        out.print(
            f"report: {folder / 'compare.html'}\nrows side by side: {folder / 'rows.jsonl'}", highlight=False, soft_wrap=True
        )
    # A contender that never answered is no 0% result: the compare did not happen for it.
    broken = [score for score in compared if score.state != JobState.complete.value or (score.failed and not score.ok)]
    if broken:
        fail("; ".join(
            f"{score.name}: " + (f"its job {score.state}" if score.state != JobState.complete.value else "every row failed")
            + (f" ({', '.join(f'{kind} {count}' for kind, count in score.failures.items())})" if score.failures else "")
            for score in broken
        ) + f"; fix it, then run the same command again (with --out {folder}) to resume", code=1)  # fmt: skip
