"""What a new job is asked for with: the options `run` and `submit` share, defined once, and the job
they make (a checked spec, its budget, its shard folder)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from promptmill.cli.app import (
    BackendOption,
    BudgetOption,
    ChunkSizeOption,
    InputFormatOption,
    OldFormatOption,
    InputTpmOption,
    OutputTpmOption,
    RpmOption,
    app,
    fail,
    input_format_of,
)
from promptmill.api.driving import check_model_built, create_job
from promptmill.config.settings import Settings
from promptmill.workers.local_model import ModelNotBuiltError
from promptmill.jobs.readers import INPUT_FORMATS
from promptmill.config.backends import BackendName
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.pipelines.spec import RateLimits

# (name, type, typer default), in the order `--help` lists them.
_OPTIONS: list[tuple[str, Any, Any]] = [
    ("input_path", Path, typer.Argument(..., metavar="INPUT", help="A JSONL, JSON, CSV or Parquet file, or an OpenAI batch file.")),
    ("pipeline", Optional[Path], typer.Option(
        None, "--pipeline", "-p", help="The pipeline TOML file (optional for an OpenAI batch file: its lines are the requests)."
    )),
    ("backend", BackendName, BackendOption),
    ("model", Optional[str], typer.Option(None, help="Overrides the pipeline's model.")),
    ("out_dir", Optional[Path], typer.Option(None, "--out", help="Output folder (default: promptmill-out/JOB).")),
    ("chunk_size", Optional[int], ChunkSizeOption),
    ("rpm", Optional[int], RpmOption),
    ("input_tpm", Optional[int], InputTpmOption),
    ("output_tpm", Optional[int], OutputTpmOption),
    ("input_format", Optional[str], InputFormatOption),
    ("old_format", Optional[str], OldFormatOption),
    ("id_column", Optional[str], typer.Option(
        None, "--id-column", metavar="COLUMN", help="The input's id column, carried into every record under its own name."
    )),
    ("keep_columns", Optional[str], typer.Option(
        None, "--keep-columns", metavar="A,B", help="Input columns carried into every record, comma-separated."
    )),
    ("budget", Optional[float], BudgetOption),
    ("deadline", Optional[str], typer.Option(
        None, "--deadline", metavar="DURATION",
        help="A batch job's deadline from now (8h, 90m): once near, its unanswered rows go through the real-time API.",
    )),
    ("priority", Optional[int], typer.Option(
        None, "--priority", metavar="N", min=1,
        help="The job's weight in the fleet's fair shares (default: the pipeline's, else 1): while jobs wait for "
        "the same workers, each gets rows in proportion to its weight.",
    )),
]


@dataclass(frozen=True)
class JobRequest:
    input_path: Path
    pipeline: Path | None
    backend: BackendName
    model: str | None
    out_dir: Path | None
    chunk_size: int | None
    rpm: int | None
    input_tpm: int | None
    output_tpm: int | None
    input_format: str | None
    budget: float | None
    old_format: str | None = None
    id_column: str | None = None
    keep_columns: str | None = None
    deadline: str | None = None
    priority: int | None = None

    def spec(self, settings: Settings) -> JobSpec:
        """The checked spec; a bad option or pipeline fails here in one line naming the field."""
        input_format = input_format_of(self.input_format, self.old_format)
        if input_format not in (None, *INPUT_FORMATS):
            fail(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not {input_format!r}")
        limits = RateLimits(rpm=self.rpm, input_tpm=self.input_tpm, output_tpm=self.output_tpm)
        carried: dict[str, Any] = {}
        if self.id_column:
            carried["id_column"] = self.id_column
        if self.keep_columns:
            carried["keep_columns"] = [name.strip() for name in self.keep_columns.split(",") if name.strip()]
        try:
            spec = build_spec(
                settings, self.input_path, self.pipeline, self.backend, self.model, self.out_dir,
                self.chunk_size, limits, input_format, carried, deadline=self.deadline,  # type: ignore[arg-type]
                priority=self.priority,
            )  # fmt: skip
        except SubmitError as bad:
            fail(str(bad))
        try:
            check_model_built(spec, settings)
        except ModelNotBuiltError as missing:
            fail(str(missing))
        return spec

    def create(self, store: JobStore, spec: JobSpec) -> None:
        create_job(store, spec, self.budget)


def job_command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `func(request: JobRequest, **its_own_options)` as the command `name`, taking the
    shared options first and then its own."""

    def register(func: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "request"]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in _OPTIONS]

        @functools.wraps(func)
        def command(**values: Any) -> None:
            request = JobRequest(**{option: values.pop(option) for option, _, _ in _OPTIONS})
            func(request, **values)

        parameters = shared + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return app.command(name)(command)

    return register
