"""The seam every provider plugs into: a backend is the transport alone.

`send(call)` makes one attempt at one request and returns what came back: a `RawOutcome` (the
model's text and usage, or an error that fails the row without a retry), or a `Verdict` (a
classified failure the retry layer decides on). `close()` lets go of clients and engines. All that
surrounds an attempt (the fleet's limiter, the budget, concurrency, retries, the ledger, the audit
fields) is a layer of workers/request_path.py, composed once for every backend.

A backend raises `FatalJobError` when nothing more of the job can succeed (a refused API key), and
`EngineDied` when the local engine died under a request. A `send` may also return None: the row was
not answered and stays pending (its batch was canceled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol

from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.attachments import AttachmentError, file_tokens_bound
from promptmill.pipelines.items import AttemptError, ErrorKind, ItemError, RenderedRequest, Usage
from promptmill.workers.limit_signals import LimitHeaders
from promptmill.workers.retry import Verdict


class FatalJobError(RuntimeError):
    pass


class EngineStartFailed(FatalJobError):
    """The local engine would not start after every try: the job stops with the reason (no row fails)."""


class EngineDied(RuntimeError):
    """The local engine died under a chunk: its unfinished rows are sent again, as if its worker died."""


@dataclass
class Call:
    """One row's request on its way through the layers to the backend."""

    job: JobSpec
    request: RenderedRequest
    chunk_id: str = ""
    attempt: int = 0  # the attempt under way, from 1 (the retry layer counts)
    probe: bool = False  # a fallback chain's probe of a model the fleet passed over: one attempt
    on_wire: bool = False  # an attempt is on its way to the provider (a chain must not take it back)
    wire_attempts: int = 0  # a chain's model: attempts sent so far, and their errors
    wire_errors: list[AttemptError] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return len(self.request.prompt) + len(self.job.pipeline.system or "")

    @property
    def max_tokens(self) -> int:
        """The most the row's answer may use: its own `max_tokens` (a batch file's row carries one), else
        the pipeline's. What the limiter and the budget reserve for its output."""
        return self.request.over(self.job.pipeline).max_tokens

    @property
    def file_tokens(self) -> int:
        """At most what the row's images and documents add to its input: what the limiter reserves
        and the budget's worst case counts for them before the answer says."""
        return sum(file_tokens_bound(ref) for ref in self.request.attachments or ())


@dataclass
class RawOutcome:
    row: int
    text: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    error: ItemError | None = None
    attempts: int | None = None  # None: the retry layer sets it; 0: refused before reaching the model
    request_id: str | None = None
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None  # to the first token: streamed answers and the local engine
    errors: list[AttemptError] = field(default_factory=list)
    limits: LimitHeaders | None = None  # what the response said of the account's limits
    ledger_model: str | None = None  # the name the ledger prices it under (the ledger layer sets it)
    model: str | None = None  # with a fallback chain: the model that answered (or failed it last)
    models_tried: list[str] | None = None  # with a fallback chain: where the row went, in order
    passed_over: bool = False  # not sent: the fleet moved past its model while it waited (a chain goes on)
    handed_to: int | None = None  # not answered here: gone on to this model of the chain, on another queue


Reply = RawOutcome | Verdict


def attachment_failed(row: int, error: AttachmentError) -> RawOutcome:
    """A row whose image or document cannot go fails alone, before it reaches the model."""
    return RawOutcome(row=row, error=ItemError(kind=ErrorKind.attachment_error, message=str(error)), attempts=0)


class Backend(Protocol):
    """A backend's transport; its identity (name, queue, pricing, batching) is its descriptor's
    (config/backends.py, `JobSpec.info`)."""

    label: str  # how messages name the provider: "the Anthropic API"
    # The most requests in flight per process, adapted to the provider's latency; None: the backend
    # schedules its own (an engine's batch), so every request goes in at once.
    max_in_flight: int | None
    # True: the provider counts the prompt plus `max_tokens` against one token budget (OpenAI), kept
    # in the limiter's input bucket; False: input and generated output are budgets of their own.
    one_token_budget: bool
    # None: a chunk runs until its rows are answered. Seconds: a chunk that waits on the provider
    # (a batch) gives its worker back after this long and is sent again (its rows stay where they are).
    hold_s: float | None

    def limit_scope(self, job: JobSpec) -> str | None:
        """The fleet limiter's buckets a request draws on (account and model), or None: unlimited."""
        ...

    def limited_input(self, usage: Usage) -> int:
        """The input tokens of an answer that the provider's rate limit counts."""
        ...

    async def send(self, call: Call) -> Reply: ...

    async def close(self) -> None: ...


class BackendFactory(Protocol):
    """What the runtime's registry holds: how to build a backend, and when one built may serve a job."""

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        """Equal for jobs one instance can serve; another value replaces the instance (an engine
        with other arguments)."""
        ...

    def __call__(self, job: JobSpec, settings: Settings, store: JobStore) -> Backend:
        """A transport for the job, on the worker's job store (a batch records its batches there)."""
        ...
