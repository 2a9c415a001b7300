"""OpenAI's Batch API (and any server speaking `/v1/files` and `/v1/batches`): the batch transport
(provider_batches.py) on `files` and `batches`.

A batch is made of an uploaded JSONL file (`purpose="batch"`, at most 50,000 requests and 200 MB),
each line `{"custom_id", "method", "url", "body"}`. The file's id is recorded in the intent as soon as
the upload answers, the batch's the moment it is created; the intent's id rides in the batch's
`metadata`, so a create whose answer was lost is found exactly. An ended batch's answers are read
from its output file, and what failed or never ran from its error file, matched by `custom_id`:
a 5xx, `batch_expired` or (when we did not cancel it) `batch_cancelled` is a retryable attempt that
goes into a later batch; a 4xx fails its row with the provider's message.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Hashable

import openai
import orjson
from openai.types.chat import ChatCompletion

from promptmill.config.settings import Settings, is_openai_url
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.batches import BatchCounts, BatchIntent
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind
from promptmill.workers.backends.base import Call, Reply
from promptmill.workers.backends.batch_rows import Made, WaitedBatch
from promptmill.workers.backends.openai import OpenAIBackend, chat_params, completion_outcome, key_and_url
from promptmill.workers.backends.provider_batches import (
    CANCELED,
    CLOCK_MARGIN_S,
    EXPIRED,
    BatchGone,
    BatchState,
    ProviderBatchBackend,
)
from promptmill.workers.retry import Verdict, status_verdict

ENDPOINT = "/v1/chat/completions"
INTENT_KEY = "promptmill_intent"  # the batch's metadata: the intent it was made of
_OVER = ("completed", "failed", "expired", "cancelled")
log = logging.getLogger(__name__)
_CANCELLABLE = ("validating", "in_progress", "finalizing")


def batch_counts(status: str, counts: Any) -> BatchCounts:
    """OpenAI's `request_counts` (total, completed, failed) in the counts every batch shows: what an
    ended batch never ran is expired or canceled, by how it ended."""
    total, completed, failed = (counts.total, counts.completed, counts.failed) if counts is not None else (0, 0, 0)
    rest = max(0, total - completed - failed)
    left = {"expired": rest} if status == "expired" else {"canceled": rest} if status == "cancelled" else {"processing": rest}
    return BatchCounts(succeeded=completed, errored=failed, **left)


class OpenAIBatchBackend(ProviderBatchBackend):
    label = "the OpenAI Batch API"
    api_error = openai.APIError
    max_requests = 50_000
    max_bytes = 190 * 1024 * 1024  # the API's 200 MB, less room for the custom_ids
    max_in_flight = None  # every row of a chunk goes in at once: the provider schedules the batch
    one_token_budget = True
    limited_input = staticmethod(OpenAIBackend.limited_input)

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        api_key, self.base_url = key_and_url(job, settings)
        super().__init__(job, settings, store)
        if not is_openai_url(self.base_url):
            self.label = f"the batch API at {self.base_url}"
        # Uploading, polling and reading are not a row's attempts: the SDK's retries serve them (an
        # upload sent twice leaves a file nobody reads, never a second bill). The create is sent once.
        self.client = openai.AsyncOpenAI(
            api_key=api_key, base_url=self.base_url, max_retries=4, timeout=settings.request_timeout_s
        )
        self._create_once = self.client.with_options(max_retries=0)

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        return "openai-batch", settings.openai_url(job.pipeline.base_url), job.pipeline.api_key_env

    def request_line(self, call: Call) -> dict[str, Any]:
        body = chat_params(call.job, call.request, self.base_url)
        return {"custom_id": "", "method": "POST", "url": ENDPOINT, "body": body}

    async def create_batch(self, job: JobSpec, intent: BatchIntent, requests: list[dict[str, Any]]) -> Made:
        content = b"".join(orjson.dumps(request) + b"\n" for request in requests)
        uploaded = await self.client.files.create(file=(f"promptmill-{intent.intent_id}.jsonl", content), purpose="batch")
        intent = self.store.batches.note_file(job.job_id, intent, uploaded.id)
        batch = await self._create_once.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
            metadata={INTENT_KEY: intent.intent_id, "promptmill_job": job.job_id},
        )  # fmt: skip
        return Made(batch.id, float(batch.created_at))

    async def find_batch(self, intent: BatchIntent) -> Made | None:
        """The batch whose metadata names the intent, created from its time on."""
        async for batch in self.client.batches.list(limit=100):  # newest first
            if batch.created_at < intent.at - CLOCK_MARGIN_S:
                break
            if (batch.metadata or {}).get(INTENT_KEY) == intent.intent_id:
                return Made(batch.id, float(batch.created_at))
        return None

    async def batch_state(self, batch_id: str) -> BatchState:
        try:
            state = await self.client.batches.retrieve(batch_id)
        except openai.NotFoundError:
            raise BatchGone(batch_id) from None
        files = {name: getattr(state, f"{name}_file_id") for name in ("input", "output", "error")}
        return BatchState(
            status=state.status,
            counts=batch_counts(state.status, state.request_counts),
            ended=state.status in _OVER,
            created_at=float(state.created_at),
            cancellable=state.status in _CANCELLABLE,
            files={name: file_id for name, file_id in files.items() if file_id},
        )

    async def batch_results(self, batch: WaitedBatch) -> AsyncIterator[tuple[str, Reply | object]]:
        state = await self.client.batches.retrieve(batch.batch_id)
        for file_id in (state.output_file_id, state.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for line in content.content.splitlines():
                if line.strip():
                    entry = orjson.loads(line)
                    yield entry.get("custom_id", ""), self._reply(batch, entry)
        if state.status == "failed":  # refused whole at validation: no request ran
            reasons = "; ".join(error.message or "" for error in (state.errors.data or [])) if state.errors else ""
            failed = Verdict(ErrorKind.server_error, f"batch {batch.batch_id} failed: {reasons}".rstrip(": "),
                             retryable=True, status=500)  # fmt: skip
            for row in batch.waiters:
                yield f"{batch.intent}-{row}", failed
        # Every result read: the input file (every row's prompt) goes, unless `keep_batch_files = true`.
        if state.input_file_id and not batch.job.pipeline.keep_batch_files:
            try:
                await self.client.files.delete(state.input_file_id)
            except openai.APIError as error:  # gone already (another run read it too), or refused: no row's loss
                log.warning("job %s: deleting batch %s's input file failed: %s", batch.job.job_id, batch.batch_id, error)

    def _reply(self, batch: WaitedBatch, entry: dict[str, Any]) -> Reply | object:
        response = entry.get("response")
        error = entry.get("error") or {}
        if response is None:
            code = error.get("code") or "server_error"
            if code == "batch_expired":
                return EXPIRED
            if code == "batch_cancelled" and (batch.cancel_sent or not self.store.is_runnable(batch.job.job_id)):
                return CANCELED  # the job's cancel: the row stays pending for a resume
            return status_verdict(500, f"{code}: {error.get('message') or 'no answer'}", code)
        status = int(response.get("status_code") or 500)
        body = response.get("body") or {}
        if status == 200:
            completion = ChatCompletion.model_validate(body)
            request_id = response.get("request_id") or completion.id
            return completion_outcome(0, completion, batch.job.pipeline, request_id=request_id, started_at=batch.created_at)
        said = body.get("error") or {}
        kind = said.get("code") or said.get("type") or ""
        return status_verdict(status, f"{status} {kind}: {said.get('message') or ''}".strip(), kind)

    async def cancel_batch(self, batch_id: str) -> None:
        await self.client.batches.cancel(batch_id)

    async def close_client(self) -> None:
        await self.client.close()


def cancel_now(settings: Settings, spec: JobSpec, batch_ids: list[str]) -> dict[str, str | None]:
    """Cancel these batches at the provider now, from the CLI: batch id -> None, or why it failed."""
    api_key, base_url = key_and_url(spec, settings)
    failed: dict[str, str | None] = {}
    with openai.OpenAI(api_key=api_key, base_url=base_url) as client:
        for batch_id in batch_ids:
            try:
                client.batches.cancel(batch_id)
                failed[batch_id] = None
            except openai.APIError as error:
                failed[batch_id] = str(error)
    return failed
