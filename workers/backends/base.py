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
from pipelines.items import ItemError, RenderedRequest, Usage


class FatalJobError(RuntimeError):
    pass


@dataclass
class RawOutcome:
    row: int
    text: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    error: ItemError | None = None
    attempts: int = 1


class AttemptLog(Protocol):
    """Failed attempts per row, kept outside the process so a resumed row does not start afresh."""

    def prior(self, row: int) -> int: ...

    def failed(self, row: int) -> None: ...


class Backend(Protocol):
    def run(self, job: JobSpec, requests: list[RenderedRequest], attempts: AttemptLog) -> AsyncIterator[RawOutcome]: ...


_BACKENDS: dict[tuple[str, str], Backend] = {}


def get_backend(job: JobSpec, settings: Settings, store: JobStore) -> Backend:
    """One backend per process and (backend, model): clients and engines outlive a chunk."""
    key = (job.backend, job.model if job.backend == "vllm" else "")
    if key not in _BACKENDS:
        if job.backend == "anthropic":
            from workers.backends.anthropic import AnthropicBackend

            _BACKENDS[key] = AnthropicBackend(settings, store)
        else:
            from workers.backends.vllm import VLLMBackend

            for other in [k for k in _BACKENDS if k[0] == "vllm"]:
                _BACKENDS.pop(other).shutdown()  # one engine per process
            _BACKENDS[key] = VLLMBackend(job.model, settings)
    return _BACKENDS[key]
