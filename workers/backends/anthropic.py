"""The Anthropic Messages API backend: the transport alone, one attempt per `send`.

One `AsyncAnthropic` client per worker process, on the process's persistent event loop, with the
SDK's own retries off (`max_retries=0`) so every attempt is counted by the retry layer. The limiter,
budget, concurrency, retries, ledger and audit fields around each attempt are the request path's
layers (workers/request_path.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Hashable

import anthropic
from anthropic.types import Message

from promptmill.config.settings import Settings, get_settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.attachments import anthropic_content, load_row
from promptmill.pipelines.items import RenderedRequest, Usage
from promptmill.workers.backends.base import Call, FatalJobError, RawOutcome, Reply
from promptmill.workers.limit_signals import LimitHeaders, account_scope
from promptmill.workers.retry import STREAM_ERRORS, classify, stream_ended_early

_RAW_RESPONSE = "X-Stainless-Raw-Response"  # the header `with_raw_response` sets: headers and body back


def message_params(job: JobSpec, request: RenderedRequest) -> dict[str, Any]:
    """The Messages API parameters of a row's request (a batch request's `params` too). A row with a
    body of its own (an OpenAI batch file's) is translated: its sampling, `stop` as `stop_sequences`
    and a `response_format` JSON schema as `output_config`'s format (`seed` has no match). A row's
    images and documents are read now and go as content blocks (AttachmentError: one cannot go)."""
    pipeline = request.over(job.pipeline)
    cache_control = {"type": "ephemeral", "ttl": pipeline.cache_ttl}
    content: str | list[dict[str, Any]] = request.prompt
    prefix = pipeline.shared_prefix
    if pipeline.cache_prefix and not request.messages and request.prompt.startswith(prefix):
        # A breakpoint after the shared prefix caches everything before it: system and prefix.
        content = [{"type": "text", "text": prefix, "cache_control": cache_control}]
        if rest := request.prompt[len(prefix) :]:
            content.append({"type": "text", "text": rest})
    if request.attachments:
        content = anthropic_content(request.prompt, load_row(request, pipeline, job.input_path, job.backend, job.attachment_access(get_settings())))
    turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
    system = pipeline.system
    if request.messages:  # a caller's conversation: its system turns join the system prompt
        turns = [m for m in request.messages if m["role"] != "system"]
        system = "\n\n".join([pipeline.system or "", *(m["content"] for m in request.messages if m["role"] == "system")]).strip() or None
    params: dict[str, Any] = {"model": pipeline.model, "max_tokens": pipeline.max_tokens, "messages": turns}
    if pipeline.cache_system and system:
        params["system"] = [{"type": "text", "text": system, "cache_control": cache_control}]
    elif system:
        params["system"] = system
    # The SDK no longer names sampling parameters; models that take them read them from the body.
    sampling = {name: getattr(pipeline, name) for name in ("temperature", "top_p")}
    sampling = {name: value for name, value in sampling.items() if value is not None}
    if sampling:
        params["extra_body"] = sampling
    if pipeline.stop:
        params["stop_sequences"] = pipeline.stop
    if request.json_schema is not None:
        params["output_config"] = {"format": {"type": "json_schema", "schema": request.json_schema}}
    return params


def message_usage(usage: Any) -> Usage:
    """A Messages API `usage` object as the fields every backend fills."""
    return Usage(
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
        cache_read_input_tokens=usage.cache_read_input_tokens or 0,
        cache_creation_1h_input_tokens=getattr(usage.cache_creation, "ephemeral_1h_input_tokens", 0) or 0,
    )


def message_outcome(row: int, message: Any, **fields: Any) -> RawOutcome:
    """A Messages API answer as the row's outcome: its text, usage and stop reason (a batch's too)."""
    return RawOutcome(
        row=row,
        text="".join(block.text for block in message.content if block.type == "text"),
        usage=message_usage(message.usage),
        finish_reason=message.stop_reason,
        **{"request_id": message.id, **fields},
    )


def _usage_so_far(stream: Any) -> Usage | None:
    """What a stream's `message_start` (and any `message_delta`) said of its usage; None before it."""
    try:
        snapshot = stream.current_message_snapshot
    except (AssertionError, AttributeError):  # the SDK asserts a snapshot exists: none came yet
        return None
    return message_usage(snapshot.usage) if snapshot is not None else None


class AnthropicBackend:
    label = "the Anthropic API"
    hold_s = None

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        self.api_key = settings.api_key()
        if not self.api_key:
            raise FatalJobError("no API key in this worker: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY)")
        self.max_in_flight: int | None = settings.max_in_flight
        self.client = anthropic.AsyncAnthropic(
            api_key=self.api_key,
            base_url=settings.anthropic_base_url,  # None: the SDK reads ANTHROPIC_BASE_URL
            max_retries=0,
            timeout=settings.request_timeout_s,
            # The SDK's aiohttp transport: its httpx pool scans every open connection on each request,
            # which capped 2 processes at 874 requests/s here; aiohttp reached 1,660 (bench/rate_limit.py).
            http_client=anthropic.DefaultAioHttpClient(timeout=settings.request_timeout_s),
        )

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        return "anthropic"  # one client serves every job

    def limit_scope(self, job: JobSpec) -> str:
        return account_scope(str(self.client.base_url), self.api_key, job.model)

    one_token_budget = False

    @staticmethod
    def limited_input(usage: Usage) -> int:
        return usage.input_tokens + usage.cache_creation_input_tokens  # cache reads do not count

    async def send(self, call: Call) -> Reply:
        params = message_params(call.job, call.request)
        if call.job.pipeline.stream:
            return await self._stream(call, params)
        body = {**params, **params.pop("extra_body", {})}
        started = time.monotonic()
        try:
            # The client's own `post`, asking for the raw response as `with_raw_response` does:
            # `messages.create` first transforms its typed parameters (as OpenAI's `create` does, a
            # good part of a worker's CPU at the ceiling); ours are plain JSON already.
            raw = await self.client.post(
                "/v1/messages", body=body, cast_to=Message, options={"headers": {_RAW_RESPONSE: "true"}}
            )
            message = await raw.parse()  # the async client's response parses asynchronously
        except anthropic.APIError as error:
            response = getattr(error, "response", None)
            limits = LimitHeaders.from_anthropic(response.headers) if response is not None else None
            return dataclasses.replace(classify(error), limits=limits)
        return message_outcome(
            call.request.row,
            message,
            request_id=raw.headers.get("request-id") or message.id,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            limits=LimitHeaders.from_anthropic(raw.headers),
        )

    async def _stream(self, call: Call, params: dict[str, Any]) -> Reply:
        """A streamed answer: the SDK's `messages.stream` helper assembles the message from its events;
        the first text delta is the first token. One that breaks off (the connection drops, or it
        closes before `message_stop`) is a dropped connection to retry, billed for what it said so far."""
        started = time.monotonic()
        first: float | None = None
        stream = None
        ended = False
        try:
            async with self.client.messages.stream(**params) as stream:
                async for event in stream:
                    if first is None and event.type == "content_block_delta":
                        first = time.monotonic()
                    ended = ended or event.type == "message_stop"
                message = await stream.get_final_message() if ended else None
        except STREAM_ERRORS as error:
            response = getattr(error, "response", None)
            if response is None and stream is not None:
                response = stream.response  # broken off mid-answer: the headers came
            limits = LimitHeaders.from_anthropic(response.headers) if response is not None else None
            usage = _usage_so_far(stream) if stream is not None else None
            return dataclasses.replace(classify(error), limits=limits, usage=usage)
        headers = stream.response.headers
        if message is None:
            verdict = stream_ended_early("message_stop", _usage_so_far(stream))
            return dataclasses.replace(verdict, limits=LimitHeaders.from_anthropic(headers))
        return message_outcome(
            call.request.row,
            message,
            request_id=headers.get("request-id") or message.id,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            ttft_ms=round((first - started) * 1000, 1) if first is not None else None,
            limits=LimitHeaders.from_anthropic(headers),
        )

    async def close(self) -> None:
        await self.client.close()
