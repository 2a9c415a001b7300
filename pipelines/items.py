"""The values that cross every seam: a rendered request, its token usage and its outcome."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


def iso_utc(epoch_s: float | None) -> str | None:
    """An audit time: ISO 8601 in UTC, to the millisecond."""
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


class ErrorKind(StrEnum):
    invalid_row = "invalid_row"  #: the input row could not be read (bad JSON, bad encoding, bad CSV)
    render_error = "render_error"  #: the row lacks a column the prompt names
    invalid_request = "invalid_request"  #: the provider refused the request (HTTP 400 / 413)
    unparseable_output = "unparseable_output"  #: the model's text is not a valid output value
    rate_limited = "rate_limited"  #: 429 after every allowed attempt
    server_error = "server_error"  #: 5xx / 529 after every allowed attempt
    timeout = "timeout"  #: no answer in time after every allowed attempt
    expired = "expired"  #: a batch request the provider left unprocessed for 24 h, after every allowed attempt
    connection_error = "connection_error"  #: connection failures after every allowed attempt
    model_not_found = "model_not_found"  #: 404: the model is retired or never was (a fallback takes the row)
    auth_error = "auth_error"  #: 401 / 403: fatal for the whole job
    prompt_too_long = "prompt_too_long"  #: the prompt does not fit the model's context
    engine_error = "engine_error"  #: the local engine failed on this request
    attachment_error = "attachment_error"  #: the row's image or document is missing, unreadable, changed or too big
    worker_lost = "worker_lost"  #: the chunk killed its worker too many times


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0  # of cache_creation_input_tokens, those written for 1 hour
    # The local engine's busy time charged to this request, in device-microseconds: each moment of it
    # is shared evenly among the requests in the engine then, so a job's shares add up to its time.
    engine_us: int = 0

    @property
    def answered(self) -> bool:
        """Did a provider answer (and bill) the request? The ledger counts it as a request then."""
        return bool(self.input_tokens or self.output_tokens)

    @property
    def prompt_tokens(self) -> int:
        """The whole prompt, however billed: what a long-context price band is judged by."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def token_counts(self) -> dict[str, int]:
        """The four kinds of tokens a provider bills, as keyword arguments for a price."""
        return self.model_dump(exclude={"engine_us"})

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(**{name: getattr(self, name) + getattr(other, name) for name in Usage.model_fields})


class ItemError(BaseModel):
    kind: ErrorKind
    message: str


class AttemptError(BaseModel):
    """One failed attempt of a row, for its audit record."""

    status: int | str  #: the HTTP status, or timeout, dropped or engine_error
    message: str


class AttachmentRef(BaseModel):
    """A row's image or document, by reference: never its bytes (pipelines/attachments.py)."""

    column: str
    kind: Literal["image", "document"]
    source: str  #: an absolute path, a file/s3/gs/https URL, or "input": bytes in the input row itself
    at: int = 0  #: where in the prompt's text it goes (0: before the text)
    media_type: str | None = None
    size: int | None = None  #: bytes, as the producer read them (None: a URL the provider fetches)
    sha256: str | None = None  #: of those bytes: the worker sends the same file or fails the row
    pages: int | None = None  #: a document's

    def audit(self) -> dict[str, Any]:
        """What a row's record keeps of it: enough to prove later which file went, none of its bytes."""
        return {"column": self.column, "sha256": self.sha256, "size": self.size, "media_type": self.media_type}


class RenderedRequest(BaseModel):
    """One row turned into the user turn of a chat; the system prompt is the pipeline's."""

    row: int
    prompt: str  #: the user turn; with `messages`, their text one after another (what sizes the request)
    line: int = 0  #: where the row starts in the input file (its position, for Parquet and JSON arrays)
    #: A conversation the caller's prompt function made (the Python API): its turns, system turns
    #: among them, stand for the user turn after the pipeline's system prompt.
    messages: list[dict[str, str]] | None = None
    #: The row's own request parameters (an OpenAI batch line's body): max_tokens, temperature,
    #: top_p, stop, seed and response_format, over the pipeline's.
    body: dict[str, Any] | None = None
    #: The row's images and documents (a pipeline's `[[attachments]]`), by reference.
    attachments: list[AttachmentRef] | None = None

    def over(self, pipeline: Any) -> Any:
        """The pipeline with this row's own parameters over its own (the pipeline itself if none)."""
        if not self.body:
            return pipeline
        changed = {name: value for name, value in self.body.items() if name in _PIPELINE_FIELDS}
        return pipeline.model_copy(update=changed)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the row's own `response_format` asks the answer to follow, if any."""
        response_format = (self.body or {}).get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            return (response_format.get("json_schema") or {}).get("schema") or None
        return None

    def chat(self, system: str | None) -> list[dict[str, str]]:
        """The chat's messages in the OpenAI shape: the system prompt, then the row's turns."""
        turns = self.messages or [{"role": "user", "content": self.prompt}]
        return ([{"role": "system", "content": system}] if system else []) + turns


_PIPELINE_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed")


class ItemOutcome(BaseModel):
    """The terminal state of one row: what the results file holds for it, with its audit fields."""

    row: int
    status: Literal["ok", "failed"]
    output: Any = None
    text: str | None = None
    error: ItemError | None = None
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    attempts: int = 0
    model: str | None = None  #: who answered (None: no model saw the row)
    #: The ledger's name for what answered, as it was priced: MODEL, MODEL@batch, MODEL@long.
    priced_as: str | None = None
    models_tried: list[str] | None = None  #: with a fallback chain: every model the row went to, in order
    request_id: str | None = None  #: the provider's id of the answering request
    started_at: str | None = None  #: ISO 8601 UTC: the row's first attempt of its last run
    finished_at: str | None = None  #: ISO 8601 UTC: when its outcome was known
    latency_ms: float | None = None  #: the answering (or last) request, start to end
    ttft_ms: float | None = None  #: its first token (a streamed answer, or the local engine's)
    errors: list[AttemptError] = Field(default_factory=list)  #: every failed attempt, in order
    line: int = 0  #: where the row starts in the input file (its position, for Parquet and JSON arrays)
    #: Each attachment's column, sha256, size and media type: the row's input, provable later.
    attachments: list[dict[str, Any]] | None = None

    @classmethod
    def failure(cls, row: int, kind: ErrorKind, message: str, **extra: Any) -> "ItemOutcome":
        return cls(row=row, status="failed", error=ItemError(kind=kind, message=message), **extra)
