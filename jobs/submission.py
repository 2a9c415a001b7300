"""Turns what the user typed into a checked JobSpec: a bad option fails here, naming the field."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from promptmill.config.backends import BACKENDS, BackendName, backend_info
from promptmill.config.prices import PriceTable, UnknownModelError
from promptmill.config.settings import MAX_CHUNK_SIZE, Settings
from promptmill.jobs.batch_files import ID_COLUMN, BatchFile, BatchFileError, check_batch_file, default_pipeline
from promptmill.jobs.readers import InputFormat, detect_format, input_columns
from promptmill.jobs.spec import JobSpec, new_job_id
from promptmill.pipelines.spec import (
    BRACES_HINT,
    MAX_PRIORITY,
    Pipeline,
    PipelineError,
    RateLimits,
    duration_s,
    load_pipeline,
    nearest,
    validation_problems,
)


class SubmitError(ValueError):
    pass


def build_spec(
    settings: Settings,
    input_path: Path,
    pipeline_source: Path | Pipeline | None,
    backend: BackendName,
    model: str | None = None,
    out_dir: Path | None = None,
    chunk_size: int | None = None,
    limits: RateLimits | None = None,
    input_format: InputFormat | None = None,
    overrides: dict[str, Any] | None = None,
    pipeline_text: str | None = None,
    name: str | None = None,
    fingerprint: str | None = None,
    deadline: str | None = None,
    priority: int | None = None,
) -> JobSpec:
    """Limits come from the CLI, else the pipeline, else Settings. `overrides` set pipeline fields
    (a compare's contender: its temperature) over the file's. The pipeline is a file, or one built
    in Python (its `pipeline_text` then is its TOML, for the manifest); `name` and `fingerprint`
    let the Python API find the job again. An OpenAI batch file needs no pipeline: its lines are the
    requests (a pipeline given supplies defaults, limits, prices and the model)."""
    if not input_path.exists():
        raise SubmitError(f"INPUT: {input_path} does not exist")
    try:
        fmt = input_format or detect_format(input_path)
    except ValueError as bad:
        raise SubmitError(f"INPUT: {bad}") from None
    pipeline_path = pipeline_source if isinstance(pipeline_source, Path) else None
    batch_file = _batch_file(input_path, settings.max_row_bytes) if fmt == "openai-batch" else None
    if pipeline_source is None:
        if batch_file is None:
            raise SubmitError("--pipeline: a pipeline file is needed (only an OpenAI batch file runs without one)")
        if not (model or batch_file.model):
            raise SubmitError("model: the batch file's first request names no model; pass --model")
        pipeline = default_pipeline(model or batch_file.model, batch_file.max_tokens)  # type: ignore[arg-type]
    elif pipeline_path is not None:
        try:
            pipeline = load_pipeline(pipeline_path)
        except PipelineError as bad:
            raise SubmitError(str(bad)) from None
        pipeline_text = pipeline_path.read_text(encoding="utf-8")
    else:
        pipeline = pipeline_source
    if model or overrides:
        try:
            changed = {**({"model": model} if model else {}), **(overrides or {})}
            pipeline = Pipeline.model_validate({**pipeline.model_dump(), **changed})
        except ValidationError as bad:
            raise SubmitError(validation_problems(bad)) from None
    if batch_file is not None and pipeline.id_column is None:
        pipeline = pipeline.model_copy(update={"id_column": ID_COLUMN})  # results carry each line's custom_id
    if batch_file is None:  # a batch file's rows are its requests: the prompt names no column of theirs
        _check_columns(input_path, fmt, pipeline)
    prices = pipeline.price_table(settings)
    _check_model(settings, backend, pipeline, prices, "model")
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise SubmitError(f"--chunk-size must be from 1 to {MAX_CHUNK_SIZE:,}, not {chunk_size:,}")
    from_settings = RateLimits(rpm=settings.rpm, input_tpm=settings.input_tpm, output_tpm=settings.output_tpm)
    job_limits = (limits or RateLimits()).over(pipeline.limits.over(from_settings))
    deadline_at = _deadline_at(deadline or pipeline.deadline, backend)
    job_id = new_job_id()
    spec = JobSpec(
        job_id=job_id,
        pipeline=pipeline,
        backend=backend,
        input_path=str(input_path.resolve()),
        input_format=fmt,
        out_dir=str((out_dir or Path("promptmill-out") / job_id).resolve()),
        chunk_size=chunk_size or backend_info(backend).chunk_size(settings),
        limits=job_limits,
        max_in_flight=settings.max_in_flight,
        max_attempts=settings.max_attempts,
        max_row_bytes=settings.max_row_bytes,
        pipeline_path=None if pipeline_path is None else str(pipeline_path.resolve()),
        pipeline_text=pipeline_text,
        name=name,
        fingerprint=fingerprint,
        deadline_at=deadline_at,
        priority=_priority(priority, pipeline, settings.max_priority),
    )
    _check_attachments(spec)
    if pipeline.stream and not spec.info.streams:
        raise SubmitError(f"stream: the {spec.backend} backend does not stream (a batch's answers come as a file); drop `stream`")
    for i, link in enumerate(spec.links()[1:], start=1):
        name = f"fallback: {link.backend}:{link.model}" if i != spec.deadline_link else "deadline"
        if link.queue != spec.queue and (spec.info.batches or link.info.batches) and i != spec.deadline_link:
            # A row waits on a batch for up to a day: it cannot be handed between a batch and the rest.
            raise SubmitError(
                f"{name} runs on the {link.queue!r} queue and the job on {spec.queue!r}: a batch job's chain "
                "stays in batches, and a batch is no fallback for the other backends"
            )
        _check_model(settings, link.backend, link.pipeline, prices, name)
    return spec


def _priority(priority: int | None, pipeline: Pipeline, most: int = MAX_PRIORITY) -> int:
    """The job's weight in the fleet's fair shares: --priority, else the pipeline's, else 1; at most
    `most` (PROMPTMILL_MAX_PRIORITY)."""
    chosen = priority if priority is not None else pipeline.priority or 1
    if not 1 <= chosen <= most:
        limit = " (PROMPTMILL_MAX_PRIORITY)" if most < MAX_PRIORITY else ""
        raise SubmitError(f"--priority must be from 1 to {most:,}{limit}, not {chosen:,}")
    return chosen


def _deadline_at(deadline: str | None, backend: BackendName) -> float | None:
    """When a batch job's deadline falls (epoch seconds), from a duration after now."""
    if deadline is None:
        return None
    if backend_info(backend).realtime_twin is None:
        batch = ", ".join(name for name, info in BACKENDS.items() if info.realtime_twin)
        raise SubmitError(f"deadline: only a batch backend ({batch}) takes a deadline, not {backend}")
    try:
        return time.time() + duration_s(deadline)
    except ValueError as bad:
        raise SubmitError(f"deadline: {bad}") from None


def _batch_file(input_path: Path, max_row_bytes: int) -> BatchFile:
    try:
        return check_batch_file(input_path, max_row_bytes)
    except BatchFileError as bad:
        raise SubmitError(str(bad)) from None


def _check_attachments(spec: JobSpec) -> None:
    """Images and documents go only where a model reads them: the local models here read text."""
    if not spec.pipeline.attachments:
        return
    if spec.input_format == "openai-batch":
        raise SubmitError("attachments: an OpenAI batch file's requests carry their own content; drop [[attachments]]")
    for link in spec.links():
        if link.info.local:
            first = spec.pipeline.attachments[0]
            raise SubmitError(
                f"attachments: {first.column!r} ({first.kind}) cannot go to {link.model} on the local engine, which "
                f"takes text only here; use an API backend (anthropic, openai) for rows with images or documents"
            )


def _check_columns(input_path: Path, fmt: InputFormat, pipeline: Pipeline) -> None:
    """Every column the prompt names, and every column carried into the results, is in the input, as
    its start tells: a misspelt column fails here, not on every row after each was paid for."""
    try:
        found = input_columns(input_path, fmt)
    except Exception:  # noqa: BLE001 - an unreadable input is the producer's to report, where resume can go on
        return
    if found is None:
        return
    columns, where = found
    listed = ", ".join(columns[:20]) + (f" and {len(columns) - 20:,} more" if len(columns) > 20 else "")
    attached = [attachment.column for attachment in pipeline.attachments]
    prompt_columns = [name for name in pipeline.columns if name not in attached]
    for field, names in (("prompt", prompt_columns), ("id_column/keep_columns", pipeline.carried_columns), ("attachments", attached)):
        # The prompt names a column as {name}, the pipeline's other fields by its name.
        shown = (lambda name: f"{{{name}}}") if field == "prompt" else repr
        for name in names:
            if name in columns:
                continue
            message = f"{field}: {shown(name)} is not a column of the input ({where}: {listed})"
            near = nearest(name, columns)
            if near:
                message += f"; did you mean {shown(near)}?"
            raise SubmitError(message + (f"; {BRACES_HINT}" if field == "prompt" else ""))


def _check_model(settings: Settings, backend: BackendName, pipeline: Pipeline, prices: PriceTable, field: str) -> None:
    """A model billed per token has a price (never costed at $0), and its backend a key."""
    info = backend_info(backend)
    if info.billed_per_token:
        try:
            prices.price_for(pipeline.model + info.ledger_suffix)
        except UnknownModelError as unknown:
            raise SubmitError(f"{field}: {unknown}") from None
    if info.provider == "anthropic" and not settings.api_key():
        raise SubmitError("anthropic_api_key: no API key; set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY)")
    if info.provider == "openai" and (refused := settings.base_url_refused(pipeline.base_url)):
        raise SubmitError(refused)
    # A pipeline's own key (api_key_env) is read where the workers run, not here.
    if info.provider == "openai" and not pipeline.api_key_env and not settings.openai_key(settings.openai_url(pipeline.base_url)):
        raise SubmitError(
            "openai_api_key: no API key for OpenAI; set OPENAI_API_KEY (or PROMPTMILL_OPENAI_API_KEY), "
            "or point OPENAI_BASE_URL or the pipeline's base_url at a self-hosted server"
        )
