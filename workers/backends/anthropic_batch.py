"""Anthropic's Message Batches API: the batch transport (provider_batches.py) on `messages.batches`.

A batch is made in one call with its requests inline (at most 100,000 requests and 256 MB); its
results stream as JSONL once it has ended. A create whose answer was lost is found among the
provider's recent batches by its size and time (the API keeps no metadata of ours).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Hashable

import anthropic

from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.batches import BatchCounts, BatchIntent
from promptmill.jobs.state.store import JobStore
from promptmill.workers.backends.anthropic import AnthropicBackend, message_outcome, message_params
from promptmill.workers.backends.base import Call, FatalJobError, Reply
from promptmill.workers.backends.batch_rows import Made, WaitedBatch
from promptmill.workers.backends.provider_batches import (
    CANCELED,
    CLOCK_MARGIN_S,
    EXPIRED,
    BatchGone,
    BatchState,
    ProviderBatchBackend,
)
from promptmill.workers.retry import status_verdict

# A batch request's error comes with its type alone: the status the real-time endpoint answers it with.
_STATUS_OF_ERROR = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicBatchBackend(ProviderBatchBackend):
    label = "the Anthropic Message Batches API"
    api_error = anthropic.APIError
    max_requests = 100_000
    max_bytes = 250 * 1024 * 1024  # the API's 256 MB, less room for the envelope
    max_in_flight = None  # every row of a chunk goes in at once: the provider schedules the batch
    one_token_budget = False
    limited_input = staticmethod(AnthropicBackend.limited_input)

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        api_key = settings.api_key()
        if not api_key:
            raise FatalJobError("no API key in this worker: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY)")
        super().__init__(job, settings, store)
        # Polling and reading a batch are not a row's attempts: the SDK's own retries (with backoff)
        # are the right ones for them. Creating one is done once: a retry after a lost answer would
        # make a second batch, billed and never read.
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=settings.anthropic_base_url, max_retries=4, timeout=settings.request_timeout_s
        )
        self._create_once = self.client.with_options(max_retries=0)

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        return "anthropic-batch"

    def request_line(self, call: Call) -> dict[str, Any]:
        params = message_params(call.job, call.request)
        params.update(params.pop("extra_body", {}))  # a batch request's params are the plain body
        return {"custom_id": "", "params": params}

    async def create_batch(self, job: JobSpec, intent: BatchIntent, requests: list[dict[str, Any]]) -> Made:
        batch = await self._create_once.messages.batches.create(requests=requests)
        return Made(batch.id, batch.created_at.timestamp())

    async def find_batch(self, intent: BatchIntent) -> Made | None:
        """Of the intent's size, created from its time on (a few minutes' margin for clocks), and no
        job's of this fleet; the earliest such."""
        candidates = []
        async for batch in self.client.messages.batches.list(limit=100):  # newest first
            if batch.created_at.timestamp() < intent.at - CLOCK_MARGIN_S:
                break
            counts = batch.request_counts
            size = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if size == intent.requests:
                candidates.append(batch)
        owned = self.store.batches.owned([batch.id for batch in candidates])
        candidates = [batch for batch in candidates if batch.id not in owned]
        if not candidates:
            return None
        found = min(candidates, key=lambda batch: batch.created_at)
        return Made(found.id, found.created_at.timestamp())

    async def batch_state(self, batch_id: str) -> BatchState:
        try:
            state = await self.client.messages.batches.retrieve(batch_id)
        except anthropic.NotFoundError:
            raise BatchGone(batch_id) from None
        return BatchState(
            status=state.processing_status,
            counts=BatchCounts.model_validate(state.request_counts.model_dump()),
            ended=state.processing_status == "ended",
            created_at=state.created_at.timestamp(),
            cancellable=state.processing_status == "in_progress",
        )

    async def batch_results(self, batch: WaitedBatch) -> AsyncIterator[tuple[str, Reply | object]]:
        results = await self.client.messages.batches.results(batch.batch_id)
        async for entry in results:
            result = entry.result
            if result.type == "succeeded":
                yield entry.custom_id, message_outcome(0, result.message, started_at=batch.created_at)
            elif result.type == "errored":
                error = result.error.error
                status = _STATUS_OF_ERROR.get(error.type, 500)
                yield entry.custom_id, status_verdict(status, f"{status} {error.type}: {error.message}", error.type)
            elif result.type == "expired":
                yield entry.custom_id, EXPIRED
            else:
                yield entry.custom_id, CANCELED

    async def cancel_batch(self, batch_id: str) -> None:
        await self.client.messages.batches.cancel(batch_id)

    async def close_client(self) -> None:
        await self.client.close()


def cancel_now(settings: Settings, spec: JobSpec, batch_ids: list[str]) -> dict[str, str | None]:
    """Cancel these batches at the provider now, from the CLI: batch id -> None, or why it failed."""
    if not settings.api_key():
        raise FatalJobError("no API key here")
    failed: dict[str, str | None] = {}
    with anthropic.Anthropic(api_key=settings.api_key(), base_url=settings.anthropic_base_url) as client:
        for batch_id in batch_ids:
            try:
                client.messages.batches.cancel(batch_id)
                failed[batch_id] = None
            except anthropic.APIError as error:
                failed[batch_id] = str(error)
    return failed
