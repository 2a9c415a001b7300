"""`promptmill compare`: one sample of the input through every contender, each a job of its own, then
their figures side by side (a table, `--json`, `compare.html` and `rows.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from promptmill.api.comparing import compare_folder, plan_compare, run_compare, usd
from promptmill.cli.app import InputFormatOption, JsonFlag, OldFormatOption, app, err, fail, input_format_of, out
from promptmill.config.settings import get_settings
from promptmill.cli.running import ways_out
from promptmill.reports.compare.plan import CompareError
from promptmill.reports.compare.score import Score


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def _print_table(scores: list[Score]) -> None:
    table = Table(title="promptmill compare", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("contender", overflow="fold")
    for title in ("ok", "failed", "p50 ms", "p95 ms", "out tok/s", "cost $", "$ per 1k rows", "accuracy", "agree"):
        table.add_column(title, justify="right", no_wrap=title not in ("failed", "$ per 1k rows", "out tok/s"))
    for s in scores:
        failed = f"{s.failed}" + (f" ({', '.join(f'{k} {n}' for k, n in s.failures.items())})" if s.failures else "")
        per_1000 = "–" if s.cost_per_1000_rows_usd is None else usd(s.cost_per_1000_rows_usd)
        table.add_row(
            escape(s.name + ("" if s.state == "complete" else f" ({s.state})")), f"{s.ok}", failed,
            _fmt(s.latency_ms_p50, ",.0f"), _fmt(s.latency_ms_p95, ",.0f"), _fmt(s.output_tokens_per_s, ",.1f"),
            usd(s.cost_usd), per_1000, _fmt(s.accuracy, ".1%"), _fmt(s.agreement, ".1%"),
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
    try:
        plan = plan_compare(input_path, pipeline, against, sample, seed, label, input_format_of(input_format, old_format))
    except CompareError as bad:
        fail(str(bad))
    folder = compare_folder(plan, out_dir)
    go_on = f"the same promptmill compare command, with --out {folder}"
    with ways_out("compare", go_on, folder / "CONTENDER" / "logs"):
        try:
            compared = run_compare(settings, plan, folder, workers, err)
        except CompareError as bad:
            fail(str(bad), code=1 if str(bad).startswith("scoring:") else 2)
    if as_json:
        out.print_json(json.dumps(compared.as_dict()))
    else:
        _print_table(compared.scores)
        for note in compared.notes:
            out.print(note, highlight=False, soft_wrap=True, markup=False)
        out.print(
            f"report: {compared.folder / 'compare.html'}\nrows side by side: {compared.folder / 'rows.jsonl'}",
            highlight=False,
            soft_wrap=True,
        )
    # A contender that never answered is no 0% result: the compare did not happen for it.
    broken = compared.broken()
    if broken:
        fail(f"{broken}; fix it, then run the same command again (with --out {compared.folder}) to resume", code=1)
