"""A compare, for `promptmill compare` and `pm.compare`: one seeded sample of the input through every
contender, each a job of its own (resumable: the same compare again goes on), then their figures side
by side (`compare.html` and `rows.jsonl` in its folder). Errors are raised, never printed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape

from promptmill.api.driving import check_model_built, create_job, drive, expire_if_finished, open_store, reopen
from promptmill.config.settings import Settings
from promptmill.jobs.export import export_job
from promptmill.jobs.files import atomic_write
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.readers import INPUT_FORMATS, detect_format
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.pipelines.spec import Pipeline, load_pipeline
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
from promptmill.workers.local_model import ModelNotBuiltError


@dataclass
class Compared:
    """A compare's outcome: its folder, plan, sampled rows, each contender's score, and notes."""

    folder: Path
    plan: ComparePlan
    rows: list[dict[str, Any]]
    scores: list[Score]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        """What `compare --json` prints."""
        return {"contenders": [score.as_dict() for score in self.scores], "sample": len(self.rows),
                "input_rows": self.plan.input_rows, "out": str(self.folder)}  # fmt: skip

    def broken(self) -> str | None:
        """Why the compare did not happen for a contender (its job stopped, or it never answered)."""
        broken = [s for s in self.scores if s.state != JobState.complete.value or (s.failed and not s.ok)]
        if not broken:
            return None
        return "; ".join(
            f"{score.name}: " + (f"its job {score.state}" if score.state != JobState.complete.value else "every row failed")
            + (f" ({', '.join(f'{kind} {count}' for kind, count in score.failures.items())})" if score.failures else "")
            for score in broken
        )  # fmt: skip


def compare_folder(plan: ComparePlan, out_dir: Path | None) -> Path:
    """Where the compare keeps its jobs and pages: `out_dir`, else one named by what it asks."""
    return (out_dir or default_folder(plan)).resolve()


def run_compare(settings: Settings, plan: ComparePlan, folder: Path, workers: int | None, console: Console) -> Compared:
    """Draw the sample (or read the one drawn before, in `folder`), run or resume each contender's
    job here, and score them. KeyboardInterrupt leaves every job resumable."""
    saved = ComparePlan.load(folder)
    if saved is not None and not saved.asks_the_same(plan):
        raise CompareError(
            f"--out {folder} holds another compare ({', '.join(c.name for c in saved.contenders)} "
            f"on {saved.input_path}); choose another --out"
        )
    rows = read_sample(folder) if saved else draw_sample(plan, folder, settings.max_row_bytes)
    plan = saved or plan
    if not rows:
        raise CompareError(f"INPUT: {plan.input_path} has no readable row to sample")
    console.print(
        f"{'resuming the compare' if saved else 'compare'} in {folder}: {len(rows):,} of {plan.input_rows:,} rows "
        f"(seed {plan.seed}), {len(plan.contenders)} contenders",
        highlight=False,
        soft_wrap=True,
        markup=False,  # a folder's path, as it is
    )
    with open_store(settings) as (store, url):
        specs = [_contender_spec(settings, store, plan, folder, contender) for contender in plan.contenders]
        plan.save(folder)
        for i, (contender, spec) in enumerate(zip(plan.contenders, specs), start=1):
            if contender.state == "complete" and not store.exists(spec.job_id):
                continue  # done before, and its job has since expired from Redis: its records are on disk
            console.print(f"[{i}/{len(specs)}] {contender.name}: job {spec.job_id}", highlight=False, markup=False)
            try:
                _run_contender(settings, store, url, spec, contender, workers, console)
            finally:
                plan.save(folder)
            if contender.state != JobState.complete.value:
                # The error is the provider's or a worker's text: printed as it is, never read as markup.
                stopped = escape(f"{contender.name} stopped {contender.state}: {contender.error}")
                console.print(f"[yellow]{stopped}[/]", highlight=False, soft_wrap=True)
    try:
        scores = _scores(plan, specs[0].pipeline, folder, rows)
    except ValueError as bad:
        raise CompareError(f"scoring: {bad}") from None
    notes = _projection_lines(plan, scores, len(rows))
    title = f"{Path(plan.input_path).name}: {len(rows):,} rows through {len(scores)} contenders"
    write_compare_page(folder / "compare.html", title, scores, notes)
    return Compared(folder, plan, rows, scores, notes)


def read_compare(folder: Path) -> tuple[str, list[Score], list[str], list[dict[str, Any]]]:
    """A compare run before, from its folder (the live viewer's compare page): its title, scores and
    notes as `compare.html` shows them, and the sampled rows on which its contenders disagree."""
    plan = ComparePlan.load(folder)
    if plan is None:
        raise CompareError(f"{folder} holds no compare")
    rows = read_sample(folder)
    try:
        scores = _scores(plan, load_pipeline(plan.pipeline_path), folder, rows)
    except (OSError, ValueError) as bad:
        raise CompareError(f"scoring the compare in {folder}: {bad}") from None
    title = f"{Path(plan.input_path).name}: {len(rows):,} rows through {len(scores)} contenders"
    lines = (orjson.loads(line) for line in (folder / "rows.jsonl").read_bytes().splitlines() if line.strip())
    return title, scores, _projection_lines(plan, scores, len(rows)), [line for line in lines if not line["agree"]]


def plan_compare(
    input_path: Path, pipeline: Path, against: list[str], sample: int, seed: int, label: str | None, fmt: str | None
) -> ComparePlan:
    """The compare asked for, checked: the input, its format, each contender once (CompareError if not)."""
    if not input_path.exists():
        raise CompareError(f"INPUT: {input_path} does not exist")
    if fmt not in (None, *INPUT_FORMATS):
        raise CompareError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not {fmt!r}")
    try:
        contenders = [parse_contender(text) for text in against]
        input_format = fmt or detect_format(input_path)
    except ValueError as bad:
        raise CompareError(str(bad)) from None
    names = [contender.name for contender in contenders]
    if len(set(names)) < len(names):
        raise CompareError(f"--against: {next(n for n in names if names.count(n) > 1)} is given twice")
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
        raise CompareError(f"--against {contender.name}: {bad}") from None
    spec = spec.model_copy(update={"attachment_root": plan.attachment_root or str(Path(plan.input_path).resolve().parent)})
    try:
        check_model_built(spec, settings)
    except ModelNotBuiltError as missing:
        raise CompareError(f"--against {contender.name}: {missing}") from None
    return spec


def _run_contender(
    settings: Settings, store: JobStore, url: str, spec: JobSpec, contender: Contender, workers: int | None, console: Console
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
    drive(settings, store, url, spec, workers or spec.info.local_workers, resuming, console)
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


def usd(value: float) -> str:
    """Cents for dollars, four figures for fractions of a cent."""
    return f"{value:,.2f}" if value >= 1 else f"{value:.4g}"


def duration(hours: float) -> str:
    seconds = hours * 3600
    return f"{hours:,.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _projection_lines(plan: ComparePlan, scores: list[Score], rows: int) -> list[str]:
    return [
        f"projected for all {plan.input_rows:,} rows, from these {rows:,} (at this run's concurrency and limits): "
        + "; ".join(f"{s.name} ${usd(s.projection['cost_usd'])} in {duration(s.projection['hours'])}" for s in scores)
    ]
