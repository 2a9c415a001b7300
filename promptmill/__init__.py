"""promptmill: one LLM call per row of a dataset, through Redis and Celery workers.

From Python::

    import promptmill as pm

    pipeline = pm.Pipeline(prompt="Is this review positive or negative? {text}",
                           output=["positive", "negative"], model="claude-haiku-4-5", max_tokens=5)
    results = pm.run(dataframe, pipeline)      # resumable: run it again and it goes on
    results.to_pandas()

The layers live in the repo's top folders and install under this name; each imports only the ones
before it: `config` <- `pipelines` <- `jobs` <- `workers` <- `api` <- `cli`.
"""

from promptmill.api.batch_files import BatchRun, run_batch
from promptmill.api.choosing import compare, estimate
from promptmill.api.data import MissingExtra
from promptmill.api.jobs import Job, JobError, JobStopped, run, run_async, submit
from promptmill.api.pipeline import Pipeline, PipelineError
from promptmill.api.results import Results
from promptmill.api.viewer import ui

__all__ = [
    "BatchRun", "Job", "JobError", "JobStopped", "MissingExtra", "Pipeline", "PipelineError", "Results",
    "compare", "estimate", "run", "run_async", "run_batch", "submit", "ui",
]  # fmt: skip
