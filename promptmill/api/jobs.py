"""`pm.run`, `pm.run_async`, `pm.submit` and `pm.Job`: a job from Python, on the engine `promptmill
run` and `submit` drive (promptmill.api.driving), found again by its name.

A job's name (by default a fingerprint of its data, pipeline, backend and model) is kept in Redis:
`pm.run` of a complete job returns its results and sends nothing; of an interrupted one, it resumes
and sends only what is left; of another pipeline or other data under a name in use, it refuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from promptmill.api.data import StagedInput, stage, as_staged
from promptmill.api.driving import (
    check_model_built,
    checked_budget,
    create_job,
    drive,
    expire_if_finished,
    open_store,
    hand_to_fleet,
    reopen,
    set_budget,
)
from promptmill.api.pipeline import Pipeline, as_pipeline
from promptmill.api.results import Results
from promptmill.config.backends import BACKENDS
from promptmill.config.settings import Settings, get_settings
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.enqueue import enqueue
from promptmill.jobs.export import KEPT_FILE, export_job
from promptmill.jobs.files import atomic_write, private_files
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.spec import InputFormat, JobSpec
from promptmill.jobs.state.keys import NAMES_KEY
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.submission import SubmitError, build_spec



class JobError(RuntimeError):
    """A job that cannot be made or run: a name in use by other work, no such job, a bad option."""


class JobStopped(JobError):
    """The job stopped before its end (failed, cancelled, paused at its budget or by an outage);
    `pm.run` again, or `pm.Job(job_id).resume()`, goes on from where it stopped."""

    def __init__(self, job_id: str, state: str, reason: str | None):
        super().__init__(f"job {job_id} {state}: {reason or 'stopped'}; pm.run(...) again (or pm.Job({job_id!r}).resume()) goes on")
        self.job_id, self.state, self.reason = job_id, state, reason


def fingerprint(staged: StagedInput, pipeline: Pipeline, backend: str) -> str:
    """What a named job ran, readable part by part: the data's and the pipeline's sha256 (short), the
    backend and the model."""
    file = orjson.dumps(pipeline.file.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    data = staged.identity(with_root=bool(pipeline.file.attachments))
    return f"data={data} pipeline={hashlib.sha256(file).hexdigest()[:16]} backend={backend} model={pipeline.model}"


def _differs(old: str, new: str) -> str:
    """The parts of two fingerprints that differ: data, pipeline, backend, model."""

    def parts(text: str) -> dict[str, str]:
        return dict(part.split("=", 1) for part in text.split(" ") if "=" in part)

    was, now = parts(old), parts(new)
    return ", ".join(key for key in now if was.get(key) != now[key]) or "what it ran"


def progress_console(progress: bool) -> Console:
    """The progress display: a notebook's output area, a terminal's stderr, or nothing."""
    if not progress:
        return Console(quiet=True)
    return Console(stderr="ipykernel" not in sys.modules)




class _Prepared:
    """A job made (or found again) for the data and pipeline: its spec, whether it resumes, and the
    results of one that finished and has since expired from Redis (`kept`)."""

    def __init__(self, spec: JobSpec, resuming: bool, done: bool, kept: Results | None = None):
        self.spec, self.resuming, self.done, self.kept = spec, resuming, done, kept


def _refuse_other_work(name: str, job_id: str, was: str | None, now: str) -> None:
    if was != now:
        raise JobError(
            f"name {name!r} is job {job_id}, which ran other work ({_differs(was or '', now)} differ); give this "
            "work another name, or delete that job (promptmill delete)"
        )


def _kept(named: dict[str, str], pipeline: Pipeline) -> tuple[JobSpec, Results] | None:
    """A complete job's results as kept on disk (its keys in Redis expire after JOB_TTL_DAYS); None
    where they are not all there (removed, or another job's): the work runs anew."""
    kept, results = Path(named["out"]) / KEPT_FILE, Path(named["out"]) / "results.jsonl"
    if not kept.is_file() or not results.is_file():
        return None
    try:
        saved = orjson.loads(kept.read_bytes())
        spec = JobSpec.model_validate(saved["spec"])
    except (KeyError, ValueError):  # (orjson's JSONDecodeError and pydantic's ValidationError are ValueErrors)
        return None
    ours = spec.job_id == named["job_id"]
    return (spec, Results(spec, saved["status"], saved["cost"], results, pipeline.output_model)) if ours else None


def _prepare(
    settings: Settings, store: JobStore, data: Any, pipeline: Pipeline, backend: str, out: str | Path | None,
    budget: float | None, name: str | None, input_format: InputFormat | None, chunk_size: int | None,
    priority: int | None = None,
) -> _Prepared:  # fmt: skip
    if backend not in BACKENDS:
        raise JobError(f"backend: {backend!r} is none of {', '.join(BACKENDS)}")
    checked_budget(budget, JobError)
    staged = stage(data, pipeline, settings.data_dir / "inputs", input_format)
    asked = fingerprint(staged, pipeline, backend)
    name = name or "job-" + hashlib.sha256(asked.encode()).hexdigest()[:16]
    found = store.redis.hget(NAMES_KEY, name)
    named = orjson.loads(found) if found is not None else None
    if named is not None and store.exists(named["job_id"]):
        spec = store.spec(named["job_id"])
        _refuse_other_work(name, spec.job_id, spec.fingerprint, asked)
        status = reopen(settings, store, spec, budget)
        return _Prepared(spec, resuming=True, done=status.state is JobState.complete)
    kept = _kept(named, pipeline) if named is not None else None
    if kept is not None:
        spec, results = kept
        _refuse_other_work(name, spec.job_id, spec.fingerprint, asked)
        return _Prepared(spec, resuming=False, done=True, kept=results)
    try:
        spec = build_spec(
            settings, staged.path, pipeline.file, backend, None, Path(out) if out else None, chunk_size, None,  # type: ignore[arg-type]
            staged.input_format, None, pipeline_text=None if pipeline.prompt_function else pipeline.to_toml(),
            name=name, fingerprint=asked, priority=priority,
        )  # fmt: skip
    except SubmitError as bad:
        raise JobError(str(bad)) from None
    spec = as_staged(spec, staged)
    check_model_built(spec, settings)
    create_job(store, spec, budget)
    # Kept for good (a name outlives its job's keys): where its results are, with their spec and cost.
    store.redis.hset(NAMES_KEY, name, orjson.dumps({"job_id": spec.job_id, "out": spec.out_dir}))
    return _Prepared(spec, resuming=False, done=False)


def _drive(settings: Settings, store: JobStore, url: str, spec: JobSpec, workers: int | None, resuming: bool,
           console: Console, max_failed_share: float | None) -> None:  # fmt: skip
    """Drive the job here to its end; a stop short of it raises JobStopped, Ctrl-C stops the local
    workers and passes on, the job left to resume."""
    try:
        status = drive(settings, store, url, spec, workers or spec.info.local_workers, resuming, console, max_failed_share)
    except KeyboardInterrupt:
        Console(stderr=True).print(
            f"interrupted: workers stopped; job {spec.job_id} goes on with the same pm.run(...) again "
            f"or pm.Job({spec.job_id!r}).resume()",
            highlight=False,
            soft_wrap=True,
        )
        raise
    if status.state is not JobState.complete:
        raise JobStopped(spec.job_id, status.state.value, status.error)


def _results(settings: Settings, store: JobStore, spec: JobSpec, pipeline: Pipeline | None) -> Results:
    status = store.status(spec.job_id)
    written = export_job(store, spec, Path(spec.out_dir))
    cost = cost_report(spec, status, spec.pipeline.price_table(settings)).as_dict()
    if status.state is JobState.complete and spec.name is not None:
        kept = {"spec": spec.model_dump(mode="json"), "status": status.state.value, "cost": cost}
        with atomic_write(Path(spec.out_dir) / KEPT_FILE) as handle:
            handle.write(orjson.dumps(kept))
    expire_if_finished(store, spec.job_id, settings)
    model = pipeline.output_model if pipeline is not None else None
    return Results(spec, status.state.value, cost, Path(written["results"]), model)


@private_files()
def run(
    data: Any,
    pipeline: Pipeline | str | Path,
    *,
    backend: str = "anthropic",
    model: str | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    budget: float | None = None,
    name: str | None = None,
    progress: bool = True,
    input_format: InputFormat | None = None,
    chunk_size: int | None = None,
    max_failed_share: float | None = 0.5,
    priority: int | None = None,
) -> Results:
    """Run the pipeline over every row of `data` here, to the end, and return the results.

    `data` is a file's path (JSONL, JSON, CSV, Parquet), a pandas or polars DataFrame, a pyarrow
    Table, a `datasets.Dataset`, or any iterable of dicts (streamed to disk, never held whole). The
    job runs as `promptmill run` runs one: on the embedded Redis with local workers, or on
    PROMPTMILL_REDIS_URL. Run again with the same data and pipeline (or the same `name`), it returns
    the finished job's results without sending anything, or resumes an interrupted one.

    >>> import promptmill as pm
    >>> reviews = [{"text": "Great kettle, boils fast."}, {"text": "Broke in a week."}]
    >>> pipeline = pm.Pipeline(prompt="Sentiment of: {text}", output=["positive", "negative"],
    ...                        model="smollm2-135m-instruct", max_tokens=4)
    >>> results = pm.run(reviews, pipeline, backend="vllm")      # doctest: +SKIP
    >>> results.to_pandas()[["text", "output"]]                   # doctest: +SKIP

    `priority` is the job's weight in the fleet's fair shares (default: the pipeline's, else 1).

    Raises `JobStopped` when the job stops before its end (its rows failing past
    `max_failed_share`, a budget, an outage, a cancel); Ctrl-C stops the workers and leaves the job
    to resume.
    """
    settings = get_settings()
    chosen = as_pipeline(pipeline).with_model(model)
    with open_store(settings) as (store, url):
        prepared = _prepare(settings, store, data, chosen, backend, out, budget, name, input_format, chunk_size, priority)
        spec = prepared.spec
        if prepared.kept is not None:
            return prepared.kept
        if not prepared.done:
            console = progress_console(progress)
            console.print(f"job {spec.job_id}" + (" (resuming)" if prepared.resuming else ""), highlight=False)
            _drive(settings, store, url, spec, workers, prepared.resuming, console, max_failed_share)
        return _results(settings, store, spec, chosen)


async def run_async(data: Any, pipeline: Pipeline | str | Path, **options: Any) -> Results:
    """`run`, awaitable: the job runs in a thread while the event loop goes on.

    >>> results = await pm.run_async(df, pipeline, backend="vllm")   # doctest: +SKIP
    """
    return await asyncio.to_thread(run, data, pipeline, **options)


@private_files()
def submit(
    data: Any,
    pipeline: Pipeline | str | Path,
    *,
    backend: str = "anthropic",
    model: str | None = None,
    out: str | Path | None = None,
    budget: float | None = None,
    name: str | None = None,
    input_format: InputFormat | None = None,
    chunk_size: int | None = None,
    priority: int | None = None,
) -> "Job":
    """Send the job to the fleet on PROMPTMILL_REDIS_URL (workers anywhere) and return at once.
    `priority` is its weight in the fleet's fair shares with the other jobs (default 1).

    >>> job = pm.submit("tickets.jsonl", "triage.toml", backend="anthropic")   # doctest: +SKIP
    >>> job.wait().to_pandas()                                                 # doctest: +SKIP
    """
    settings = get_settings()
    if not settings.redis_url:
        raise JobError("submit needs PROMPTMILL_REDIS_URL, the Redis your workers use; pm.run runs a job here")
    chosen = as_pipeline(pipeline).with_model(model)
    store = JobStore.from_url(settings.redis_url)
    prepared = _prepare(settings, store, data, chosen, backend, out, budget, name, input_format, chunk_size, priority)
    if prepared.kept is not None:
        raise JobError(
            f"job {prepared.spec.job_id} did this work and is complete (its results are in {prepared.spec.out_dir}; "
            "Redis has let it go): pm.run(...) returns them"
        )
    if not prepared.done:
        sender = ChunkSender.for_url(settings.redis_url)
        try:
            enqueue(store, prepared.spec, sender, settings.max_pending_rows, prepared.resuming)
        finally:
            sender.close()
    return Job(prepared.spec.job_id, _pipeline=chosen)


class Job:
    """A job in the configured Redis, by id: `pm.Job("20261203-101500-a1b2c3")` reattaches to one.

    >>> job = pm.Job(job_id)            # doctest: +SKIP
    >>> job.status()["state"], job.wait(timeout=600).to_pandas()   # doctest: +SKIP
    """

    def __init__(self, job_id: str, *, _pipeline: Pipeline | None = None):
        self.job_id = job_id
        self._pipeline = _pipeline
        with self._store() as (store, _):
            if not store.exists(job_id):
                raise JobError(f"no job {job_id} in this Redis (promptmill jobs lists them)")

    def __repr__(self) -> str:
        return f"<Job {self.job_id}>"

    def _store(self) -> Any:
        return open_store(get_settings())

    def _spec(self, store: JobStore) -> JobSpec:
        return store.spec(self.job_id)

    def status(self) -> dict[str, Any]:
        """The job's state and counts: state, reason, ok, failed, total, produced."""
        with self._store() as (store, _):
            status = store.status(self.job_id)
        return {"job_id": self.job_id, "state": status.state.value, "reason": status.error, "ok": status.ok,
                "failed": status.failed, "total": status.total, "produced": status.produced}  # fmt: skip

    @private_files()
    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> Results:
        """Wait for the job to stop; its results when complete, else `JobStopped` (TimeoutError past `timeout`)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if not JobState(status["state"]).runnable:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} is still {status['state']} after {timeout}s")
            time.sleep(poll_s)
        if status["state"] != JobState.complete.value:
            raise JobStopped(self.job_id, status["state"], status["reason"])
        return self.results()

    @private_files()
    def results(self) -> Results:
        """The job's records so far (all of them once it is complete), exported to its folder."""
        settings = get_settings()
        with self._store() as (store, _):
            return _results(settings, store, self._spec(store), self._pipeline)

    def cost(self) -> dict[str, Any]:
        """What the job has spent, as `promptmill cost JOB --json` prints it."""
        settings = get_settings()
        with self._store() as (store, _):
            spec = self._spec(store)
            return cost_report(spec, store.status(self.job_id), spec.pipeline.price_table(settings)).as_dict()

    def cancel(self) -> None:
        """Stop the job: workers finish the requests they hold and take no more of its rows."""
        with self._store() as (store, _):
            if store.status(self.job_id).state.runnable:
                store.set_state(self.job_id, JobState.cancelled)

    def pause(self) -> bool:
        """Pause the running job (as `promptmill pause`): the answers on the wire are committed, nothing
        more is sent; `resume()` goes on. False: it was not running."""
        with self._store() as (store, _):
            return store.pause(self.job_id)

    def set_budget(self, usd: float | None) -> None:
        """A new cap in USD for the whole job (what it spent so far counts; None: no cap), as
        `promptmill budget JOB USD`. A job paused at its budget goes on with `resume()`."""
        settings = get_settings()
        with self._store() as (store, _):
            checked_budget(usd, JobError)  # below 0, or no finite amount
            set_budget(settings, store, self._spec(store), usd)

    @private_files()
    def resume(self, *, workers: int | None = None, budget: float | None = None, progress: bool = True,
               max_failed_share: float | None = 0.5, detach: bool = False) -> "Results | Job":  # fmt: skip
        """Go on from where the job stopped, here, to its end (as `promptmill resume`), and return its
        results. With `detach=True` (`resume --detach`): hand it back to the fleet's workers on
        PROMPTMILL_REDIS_URL and return this Job at once; `wait()` follows it."""
        settings = get_settings()
        if detach and not settings.redis_url:
            raise JobError("detach hands the job to the workers on PROMPTMILL_REDIS_URL; without one, resume() runs it here")
        with open_store(settings) as (store, url):
            spec = self._spec(store)
            if reopen(settings, store, spec, budget).state is not JobState.complete:
                if detach:
                    hand_to_fleet(settings, store, spec)
                    return self
                _drive(settings, store, url, spec, workers, True, progress_console(progress), max_failed_share)
            return self if detach else _results(settings, store, spec, self._pipeline)

    @private_files()
    def report(self, out: str | Path | None = None) -> Path:
        """Write the job's report.html (as `promptmill report`); returns its path."""
        from promptmill.reports.report import write_report

        settings = get_settings()
        with self._store() as (store, _):
            spec = self._spec(store)
            folder = Path(out) if out else Path(spec.out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            return Path(write_report(store, spec, spec.pipeline.price_table(settings), folder / "report.html")["report"])

