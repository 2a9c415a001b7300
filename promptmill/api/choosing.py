"""Before a job: `pm.estimate` (what it would cost) and `pm.compare` (which model to run it on), on the
code `promptmill estimate` and `promptmill compare` run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from promptmill.api.comparing import compare_folder, plan_compare, run_compare
from promptmill.api.data import as_staged, need, stage
from promptmill.jobs.files import private_files
from promptmill.api.driving import check_model_built, open_store
from promptmill.api.estimating import ESTIMATED_BACKENDS, estimate_spec
from promptmill.api.jobs import JobError, progress_console
from promptmill.api.pipeline import Pipeline, as_pipeline
from promptmill.config.settings import get_settings
from promptmill.jobs.spec import InputFormat
from promptmill.jobs.submission import SubmitError, build_spec
from promptmill.pipelines.spec import RateLimits
from promptmill.reports.compare.plan import CompareError


@private_files()
def estimate(
    data: Any,
    pipeline: Pipeline | str | Path,
    *,
    backend: str = "anthropic",
    model: str | None = None,
    sample: int = 100,
    job: str | None = None,
    input_format: InputFormat | None = None,
    rpm: int | None = None,
    input_tpm: int | None = None,
    output_tpm: int | None = None,
) -> dict[str, Any]:
    """What running the pipeline over `data` would cost, as `promptmill estimate --json` prints it:
    rows, input tokens (counted by the API on `sample` rows, or offline by a local model's tokenizer),
    output tokens low and high, dollars, and minutes at the given limits. `job`, a job of this
    pipeline, projects output tokens (and a local engine's speed) from its answers.

    >>> pm.estimate(df, pipeline)["cost_usd_high"]      # doctest: +SKIP
    """
    if backend not in ESTIMATED_BACKENDS:
        raise JobError(f"backend: estimate counts tokens for {' or '.join(ESTIMATED_BACKENDS)}, not {backend!r}")
    settings = get_settings()
    chosen = as_pipeline(pipeline).with_model(model)
    staged = stage(data, chosen, settings.data_dir / "inputs", input_format)
    limits = RateLimits(rpm=rpm, input_tpm=input_tpm, output_tpm=output_tpm)
    try:
        spec = build_spec(settings, staged.path, chosen.file, backend, None, None, None, limits, staged.input_format)  # type: ignore[arg-type]
    except SubmitError as bad:
        raise JobError(str(bad)) from None
    spec = as_staged(spec, staged)
    check_model_built(spec, settings)
    observed = None
    if job is not None:
        with open_store(settings) as (store, _):
            if not store.exists(job):
                raise JobError(f"job: no job {job} in this Redis")
            observed = store.status(job)
        if not observed.requests_by_model.get(spec.model, 0):
            raise JobError(f"job: job {job} has no answers from {spec.model} yet")
    figures, speed = estimate_spec(settings, spec, sample, observed)
    return {**figures.as_dict(), **({"engine": speed} if speed else {})}


@private_files()
def compare(
    data: Any,
    pipeline: Pipeline | str | Path,
    against: list[str],
    *,
    sample: int = 200,
    label: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    input_format: InputFormat | None = None,
) -> Any:
    """The same seeded sample of `data` through every contender ("BACKEND:MODEL[,temperature=T,...]",
    the first the one the others' agreement is measured against), each a resumable job; returns the
    compare table as a pandas DataFrame, one row per contender (what `compare --json` prints for it).
    `compare.html` and `rows.jsonl` are written in its folder (`out`).

    >>> pm.compare(df, pipeline, against=["anthropic:claude-haiku-4-5", "vllm:smollm2-135m-instruct"],
    ...            sample=50, label="sentiment")                         # doctest: +SKIP
    """
    pandas = need("pandas", "pandas")
    settings = get_settings()
    chosen = as_pipeline(pipeline)
    staged = stage(data, chosen, settings.data_dir / "inputs", input_format)
    pipeline_path = Path(pipeline) if isinstance(pipeline, (str, Path)) else _pipeline_file(chosen, settings.data_dir)
    try:
        plan = plan_compare(staged.path, pipeline_path, list(against), sample, seed, label, staged.input_format)
        if staged.attachment_root is not None:  # the rows' relative file paths are the caller's
            plan = plan.model_copy(update={"attachment_root": str(staged.attachment_root)})
        folder = compare_folder(plan, Path(out) if out else None)
        compared = run_compare(settings, plan, folder, workers, progress_console(progress))
    except CompareError as bad:
        raise JobError(str(bad)) from None
    broken = compared.broken()
    if broken:
        raise JobError(f"{broken}; fix it, then run the same pm.compare again to resume")
    return pandas.DataFrame([score.as_dict() for score in compared.scores])


def _pipeline_file(pipeline: Pipeline, data_dir: Path) -> Path:
    """The pipeline's TOML in a file named by its content: a compare's contenders read it as a file."""
    text = pipeline.to_toml()
    path = data_dir / "pipelines" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return path
