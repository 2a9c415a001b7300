"""The job spec: everything a worker anywhere needs to run a job's chunks, and nothing secret."""

from __future__ import annotations

import secrets
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, Literal, Mapping, get_args

from pydantic import BaseModel, Field

from promptmill.config.backends import BACKENDS, BackendInfo, BackendName
from promptmill.config.settings import MAX_CHUNK_SIZE, Settings, is_openai_url
from promptmill.pipelines.file_access import Access
from promptmill.pipelines.items import RenderedRequest
from promptmill.pipelines.render import BODY_COLUMN, STAGED_COLUMNS, render_request
from promptmill.pipelines.spec import MAX_PRIORITY, Pipeline, RateLimits

InputFormat = Literal["jsonl", "json", "csv", "parquet", "openai-batch"]
INPUT_FORMATS: tuple[InputFormat, ...] = get_args(InputFormat)


def new_job_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


class JobSpec(BaseModel):
    job_id: str
    pipeline: Pipeline
    backend: BackendName
    input_path: str
    input_format: InputFormat
    out_dir: str
    chunk_size: int = Field(ge=1, le=MAX_CHUNK_SIZE)
    limits: RateLimits = Field(default_factory=RateLimits, description="The account's limits, fleet-wide.")
    max_in_flight: int = Field(ge=1, description="The most requests in flight per worker process.")
    max_attempts: int = Field(ge=1)
    max_row_bytes: int = Field(default=4 * 1024 * 1024, ge=1, description="A bigger row fails alone.")
    pipeline_path: str | None = None
    pipeline_text: str | None = Field(default=None, description="The pipeline file as submitted, for the manifest.")
    name: str | None = Field(default=None, description="The Python API's name for the job, that finds it again.")
    fingerprint: str | None = Field(default=None, description="What the named job ran: data, pipeline, backend, model.")
    deadline_at: float | None = Field(default=None, description="A batch job's deadline (epoch seconds).")
    priority: int = Field(
        default=1, ge=1, le=MAX_PRIORITY, description="Its weight in the fleet's fair shares: 3 gets three times 1's rows."
    )
    staged: bool = Field(
        default=False, description="The input is promptmill's staging of the caller's rows: its reserved columns are ours."
    )
    attachment_root: str | None = Field(
        default=None, description="The folder a row's relative file paths are in; None: the input file's."
    )
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def info(self) -> BackendInfo:
        """Its backend's descriptor: queue, pricing, batching (config/backends.py)."""
        return BACKENDS[self.backend]

    def attachment_access(self, settings: Settings) -> Access:
        """Where this job's rows may take their files from: its data's folder and what the operator
        allows (Settings), read from the process's own settings, never from the spec alone."""
        folder = self.attachment_root or str(Path(self.input_path).parent)
        self_hosted = self.info.provider == "openai" and not is_openai_url(settings.openai_url(self.pipeline.base_url))
        return Access.of(folder, settings, self_hosted)

    def render(self, row_number: int, row: Mapping[str, Any], line: int, settings: Settings) -> RenderedRequest:
        """A row's request as this job makes it: its reserved columns read only where they are ours,
        its files only where `settings` let the job take them from (RenderError, AttachmentError)."""
        access = self.attachment_access(settings) if self.pipeline.attachments else None
        return render_request(self.pipeline, row_number, row, line, access, self.own_columns)

    @property
    def own_columns(self) -> frozenset[str]:
        """The reserved `_promptmill_*` columns that promptmill itself wrote into this job's input (an
        OpenAI batch file's bodies, as its reader gives them; a staging's prompts): only these are read
        as ours, never a user's column of the same name."""
        return (frozenset({BODY_COLUMN}) if self.input_format == "openai-batch" else frozenset()) | (
            STAGED_COLUMNS if self.staged else frozenset()
        )

    @property
    def queue(self) -> str:
        return self.info.queue

    @property
    def model(self) -> str:
        return self.pipeline.model

    def links(self) -> list["JobSpec"]:
        """The job's fallback chain: the job itself, then the job as each fallback model would run it
        ("MODEL" on the job's backend, "BACKEND:MODEL" on another), each model once."""
        chain = [self]
        seen = {(self.backend, self.model)}
        for entry in self.pipeline.fallback:
            backend, colon, model = entry.partition(":")
            if not colon or backend not in BACKENDS:
                backend, model = self.backend, entry  # a bare model (an Ollama "llama3:8b" too)
            if (backend, model) in seen:
                continue
            seen.add((backend, model))
            # The pipeline's own [price] is its model's: a fallback model is priced by the table.
            pipeline = self.pipeline.model_copy(update={"model": model, "fallback": [], "price": None})
            chain.append(self.model_copy(update={"backend": backend, "pipeline": pipeline}))
        if self.deadline_at is not None and self.info.realtime_twin is not None:
            # Near its deadline a batch job's rows go through the provider's real-time API: its last link.
            pipeline = self.pipeline.model_copy(update={"fallback": []})
            chain.append(self.model_copy(update={"backend": self.info.realtime_twin, "pipeline": pipeline, "deadline_at": None}))
        return chain

    @property
    def deadline_link(self) -> int | None:
        """The link of the chain a batch job's rows go to near its deadline (None: no deadline)."""
        return len(self.links()) - 1 if self.deadline_at is not None and self.info.realtime_twin else None
