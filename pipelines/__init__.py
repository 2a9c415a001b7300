"""What a job asks of each row: the prompt template, sampling settings and output parsing.

Knows no Redis, no Celery and no provider.
"""

from promptmill.pipelines.items import ErrorKind, ItemError, ItemOutcome, RenderedRequest, Usage
from promptmill.pipelines.parse import OutputParseError, parse_output
from promptmill.pipelines.render import RenderError, render_request
from promptmill.pipelines.spec import OutputSpec, Pipeline, PipelineError, load_pipeline

__all__ = [
    "ErrorKind",
    "ItemError",
    "ItemOutcome",
    "OutputParseError",
    "OutputSpec",
    "Pipeline",
    "PipelineError",
    "RenderError",
    "RenderedRequest",
    "Usage",
    "load_pipeline",
    "parse_output",
    "render_request",
]
