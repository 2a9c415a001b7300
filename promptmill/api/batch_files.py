"""`pm.run_batch`: an OpenAI batch file run as `vllm run-batch` runs it (the same output file), on
any backend, resumable; `promptmill run-batch` is its command line.

The job is named by the input's sha256 and the output's path: the same call after a kill finds it
and sends only what is left; after its end, the output is written again without sending anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from promptmill.api.data import file_sha256
from promptmill.api.driving import check_model_built, create_job, drive, expire_if_finished, open_store, reopen
from promptmill.jobs.files import private_files
from promptmill.jobs.state.keys import NAMES_KEY
from promptmill.api.jobs import JobError, JobStopped, progress_console
from promptmill.config.settings import get_settings
from promptmill.jobs.export import write_run_batch_output
from promptmill.jobs.state.status import JobState
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.workers.local_model import ModelNotBuiltError


@dataclass(frozen=True)
class BatchRun:
    """What `run_batch` wrote: the output file, its lines and how many of them failed."""

    job_id: str
    output: Path
    requests: int
    failed: int
    resumed: bool


@private_files()
def run_batch(
    input_file: str | Path,
    output_file: str | Path,
    *,
    model: str | None = None,
    backend: str = "vllm",
    pipeline: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> BatchRun:
    """Run an OpenAI batch file (one `{"custom_id", "method", "url", "body"}` a line) to its end and
    write `output_file` as `vllm run-batch` does: one line per request, answers and failures together,
    in input order. `model` is the first request's unless given; `pipeline` (a TOML file) supplies
    defaults, limits and prices. Run again after an interruption, it goes on where it stopped.

    >>> pm.run_batch("requests.jsonl", "results.jsonl", model="smollm2-135m-instruct")  # doctest: +SKIP
    """
    source, output = Path(input_file), Path(output_file).resolve()
    if not source.is_file():
        raise JobError(f"input_file: {source} does not exist")
    settings = get_settings()
    digest = file_sha256(source)
    name = f"run-batch {digest[:16]} {output}"
    console = progress_console(progress)
    with open_store(settings) as (store, url):
        found = store.redis.hget(NAMES_KEY, name)
        job_id = orjson.loads(found)["job_id"] if found is not None else None
        resumed = job_id is not None and store.exists(job_id)
        if resumed:
            spec = store.spec(job_id)
            status = reopen(settings, store, spec, None)
            console.print(f"job {job_id}: resuming, {status.terminal:,} of {status.total:,} requests already done",
                          highlight=False)  # fmt: skip
        elif job_id is not None and output.exists():
            lines = sum(1 for _ in output.open("rb"))
            return BatchRun(job_id, output, lines, 0, resumed=False)  # ran to its end before; its keys have expired
        else:
            folder = settings.data_dir / "run-batch" / f"{digest[:16]}-{hashlib.sha256(str(output).encode()).hexdigest()[:8]}"
            try:
                spec = build_spec(settings, source, Path(pipeline) if pipeline else None, backend, model, folder,  # type: ignore[arg-type]
                                  input_format="openai-batch", name=name, fingerprint=f"data={digest[:16]} output={output}")  # fmt: skip
                check_model_built(spec, settings)
            except (SubmitError, ModelNotBuiltError) as bad:
                raise JobError(str(bad)) from None
            create_job(store, spec, None)
            store.redis.hset(NAMES_KEY, name, orjson.dumps({"job_id": spec.job_id, "out": spec.out_dir}))
            console.print(f"job {spec.job_id}", highlight=False)
        status = drive(settings, store, url, spec, workers or spec.info.local_workers, resumed, console, None)
        if status.state is not JobState.complete:
            raise JobStopped(spec.job_id, status.state.value, status.error)
        written = write_run_batch_output(store, spec, output)
        expire_if_finished(store, spec.job_id, settings)
    return BatchRun(spec.job_id, output, written["records"], written["failed"], resumed)
