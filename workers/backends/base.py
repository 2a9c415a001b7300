"""The backend interface: rendered requests in, one raw outcome per request out, as each finishes.

A raw outcome is the model's text and token usage, or a classified error; the worker parses the text,
commits and accounts. A backend raises `FatalJobError` when nothing more of the job can succeed
(a refused API key), so the worker stops the whole job instead of failing row after row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from config.settings import Settings
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import AttemptError, ItemError, RenderedRequest, Usage


class FatalJobError(RuntimeError):
    pass


class EngineDied(RuntimeError):
    """The local engine died under a chunk: its unfinished rows are sent again, as if its worker died."""


@dataclass
class RawOutcome:
    row: int
    text: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    error: ItemError | None = None
    attempts: int = 1
    request_id: str | None = None
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    latency_ms: float | None = None
    errors: list[AttemptError] = field(default_factory=list)


class AttemptLog(Protocol):
    """Failed attempts per row, kept outside the process so a resumed row does not start afresh."""

    def prior(self, row: int) -> int: ...

    def failed(self, row: int) -> None: ...


class Backend(Protocol):
    def run(self, job: JobSpec, requests: list[RenderedRequest], attempts: AttemptLog) -> AsyncIterator[RawOutcome]: ...


_BACKENDS: dict[str, Backend] = {}


def get_backend(job: JobSpec, settings: Settings, store: JobStore) -> Backend:
    """One backend per process: clients and engines outlive a chunk.

    There is one engine per process, since it holds the device: a job that asks for another model or
    other engine options stops the engine and starts its own.
    """
    if job.backend == "anthropic":
        if "anthropic" not in _BACKENDS:
            from workers.backends.anthropic import AnthropicBackend

            _BACKENDS["anthropic"] = AnthropicBackend(settings, store)
        return _BACKENDS["anthropic"]
    from workers.backends.vllm import VLLMBackend, engine_args

    args = engine_args(job.model, job.pipeline.engine, settings)
    current = _BACKENDS.get("vllm")
    if not isinstance(current, VLLMBackend) or current.args != args:
        if isinstance(current, VLLMBackend):
            current.shutdown()
        _BACKENDS["vllm"] = VLLMBackend(args)
    return _BACKENDS["vllm"]


def shutdown_backends() -> None:
    """Stop the local engine, if any, when the worker stops: its processes must not outlive it."""
    engine = _BACKENDS.pop("vllm", None)
    if engine is not None:
        engine.shutdown()  # type: ignore[attr-defined]
