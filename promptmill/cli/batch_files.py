"""`promptmill run-batch`: `vllm run-batch`'s command line, on promptmill's engine.

The same flags (`-i`, `-o`, `--model`), the same output file (one line per request, answers and
failures together), on any backend (the local engine by default), resumable: the job is found again
by its input's sha256 and its output path, so the same command after a kill sends only what is left.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import orjson
import typer

from promptmill.api.driving import check_model_built, create_job, reopen
from promptmill.api.jobs import NAMES_KEY
from promptmill.cli.app import app, err, expire_if_finished, fail, open_store, out
from promptmill.cli.running import drive
from promptmill.config.backends import BackendName
from promptmill.config.settings import get_settings
from promptmill.jobs.export import write_run_batch_output
from promptmill.jobs.state.status import JobState
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.workers.local_model import ModelNotBuiltError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@app.command(
    "run-batch",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Example: promptmill run-batch -i requests.jsonl -o results.jsonl --model smollm2-135m-instruct",
)
def run_batch(
    ctx: typer.Context,
    input_file: Path = typer.Option(..., "-i", "--input-file", help="An OpenAI batch file: one request a line."),
    output_file: Path = typer.Option(..., "-o", "--output-file", help="Where to write one result line per request."),
    model: Optional[str] = typer.Option(None, "--model", help="The model (default: the first request's)."),
    backend: BackendName = typer.Option("vllm", "--backend", help="Where the requests go (default: the local engine)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="Defaults, limits and prices for the requests."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local worker processes."),
) -> None:
    """Run an OpenAI batch file as `vllm run-batch` does, on any backend, resumable: the same command
    after a kill goes on where it stopped."""
    if ctx.args:
        err.print(f"note: ignoring {' '.join(ctx.args)} (vLLM engine flags go in a pipeline's [engine] table)",
                  highlight=False)  # fmt: skip
    if not input_file.is_file():
        fail(f"-i: {input_file} does not exist")
    settings = get_settings()
    output = output_file.resolve()
    digest = file_sha256(input_file)
    name = f"run-batch {digest[:16]} {output}"
    again = f"promptmill run-batch -i {input_file} -o {output_file}"
    with open_store(settings) as (store, url):
        found = store.redis.hget(NAMES_KEY, name)
        job_id = orjson.loads(found)["job_id"] if found is not None else None
        if job_id is not None and store.exists(job_id):
            spec = store.spec(job_id)
            status = reopen(settings, store, spec, None)
            err.print(f"job {job_id}: resuming, {status.terminal:,} of {status.total:,} requests already done", highlight=False)
            resuming = True
        elif job_id is not None and output.exists():
            out.print(f"job {job_id} ran this file to its end: {output}", highlight=False)
            return
        else:
            folder = settings.data_dir / "run-batch" / f"{digest[:16]}-{hashlib.sha256(str(output).encode()).hexdigest()[:8]}"
            try:
                spec = build_spec(settings, input_file, pipeline, backend, model, folder, input_format="openai-batch",
                                  name=name, fingerprint=f"data={digest[:16]} output={output}")  # fmt: skip
                check_model_built(spec, settings)
            except (SubmitError, ModelNotBuiltError) as bad:
                fail(str(bad))
            create_job(store, spec, None)
            store.redis.hset(NAMES_KEY, name, orjson.dumps({"job_id": spec.job_id, "out": spec.out_dir}))
            err.print(f"job {spec.job_id}", highlight=False)
            resuming = False
        status = drive(settings, store, url, spec, workers or spec.info.local_workers, resuming, again)
        if status.state is not JobState.complete:
            fail(f"job {spec.job_id} {status.state.value}: {status.error or 'stopped'}; the same command goes on: {again}")
        written = write_run_batch_output(store, spec, output)
        expire_if_finished(store, spec.job_id, settings)
    err.print(f"[bold green]done[/] {written['records'] - written['failed']:,} answered, {written['failed']:,} failed "
              f"of {written['records']:,} requests", highlight=False)  # fmt: skip
    out.print(str(output), highlight=False)
