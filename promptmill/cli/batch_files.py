"""`promptmill run-batch`: `vllm run-batch`'s command line on promptmill's engine (promptmill.api.batch_files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from promptmill.api.batch_files import run_batch as api_run_batch
from promptmill.api.jobs import JobError, JobStopped
from promptmill.cli.app import app, err, fail, out
from promptmill.cli.running import ways_out
from promptmill.config.backends import BackendName
from promptmill.config.settings import get_settings


@app.command("run-batch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_batch(
    ctx: typer.Context,
    input_file: Path = typer.Option(..., "-i", "--input-file", help="An OpenAI batch file: one request a line."),
    output_file: Path = typer.Option(..., "-o", "--output-file", help="Where to write one result line per request."),
    model: Optional[str] = typer.Option(None, "--model", help="The model (default: the first request's)."),
    backend: BackendName = typer.Option("vllm", "--backend", help="Where the requests go (default: the local engine)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="Defaults, limits and prices for the requests."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes."),
) -> None:
    """Run an OpenAI batch file as `vllm run-batch` does (its flags, its output file), on any backend,
    resumable: the same command after a kill goes on where it stopped."""
    if ctx.args:
        err.print(f"note: ignoring {' '.join(ctx.args)} (vLLM engine flags go in a pipeline's [engine] table)",
                  highlight=False, markup=False)  # fmt: skip
    again = f"promptmill run-batch -i {input_file} -o {output_file}"
    logs = get_settings().data_dir / "run-batch"
    try:
        with ways_out(str(input_file), again, logs):
            ran = api_run_batch(input_file, output_file, model=model, backend=backend, pipeline=pipeline, workers=workers)
    except JobStopped as stopped:
        fail(f"job {stopped.job_id} {stopped.state}: {stopped.reason or 'stopped'}; the same command goes on: {again}")
    except JobError as bad:
        fail(str(bad))
    err.print(f"[bold green]done[/] {ran.requests - ran.failed:,} answered, {ran.failed:,} failed of {ran.requests:,} "
              f"requests", highlight=False)  # fmt: skip
    out.print(str(ran.output), highlight=False, soft_wrap=True, markup=False)  # a path, as it is
