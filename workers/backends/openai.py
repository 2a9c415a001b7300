"""OpenAI-compatible chat completions (OpenAI, vLLM serve, SGLang, Ollama, llama.cpp, gateways): the
transport alone, one attempt per `send`.

One `AsyncOpenAI` client per worker process and server, with the SDK's own retries off so every
attempt is counted by the retry layer. `choice` and `json` outputs ask for a JSON schema through
`response_format` unless the pipeline turns `structured_output` off; the answer is read by the same
tolerant parsers either way. Usage is kept in the fields every backend fills: uncached prompt tokens
as `input_tokens`, `prompt_tokens_details.cached_tokens` as `cache_read_input_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Hashable

import openai
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from promptmill.config.settings import KeyRefused, Settings, get_settings, is_openai_url
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.attachments import load_row, openai_content
from promptmill.pipelines.items import RenderedRequest, Usage
from promptmill.pipelines.spec import OutputSpec, Pipeline
from promptmill.workers.backends.base import Call, FatalJobError, RawOutcome, Reply
from promptmill.workers.limit_signals import LimitHeaders, account_scope
from promptmill.workers.retry import STREAM_ERRORS, classify, stream_ended_early

_CHOICE_FIELD = "answer"
_RAW_RESPONSE = "X-Stainless-Raw-Response"  # the header `with_raw_response` sets: headers and body back


def response_format(output: OutputSpec, openai_strict: bool) -> dict[str, Any] | None:
    """The JSON schema a `choice` or `json` answer must follow; None for free text.

    A choice is the label as a JSON string: a few tokens. OpenAI's strict mode wants an object at
    the root, so there it is `{"answer": LABEL}`; a small model on vLLM pads that object with
    whitespace until `max_tokens` cuts it (seen with SmolLM2), while the bare string stays compact.
    """
    if output.type == "choice":
        label = {"type": "string", "enum": output.choices}
        if not openai_strict:
            return {"type": "json_schema", "json_schema": {"name": "choice", "schema": label}}
        schema = {
            "type": "object",
            "properties": {_CHOICE_FIELD: label},
            "required": [_CHOICE_FIELD],
            "additionalProperties": False,
        }
        return {"type": "json_schema", "json_schema": {"name": "choice", "schema": schema, "strict": True}}
    if output.type == "json":
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": output.json_schema}}
    return None


def chosen_label(text: str) -> str:
    """A structured `choice` answer (`"LABEL"` or `{"answer": LABEL}`): the label, else the text as it came."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict):
        value = value.get(_CHOICE_FIELD)
    return value if isinstance(value, str) else text


def _usage(usage: CompletionUsage | None) -> Usage | None:
    """OpenAI's usage in the fields every backend fills: uncached prompt tokens as input, cached ones
    as cache reads."""
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    return Usage(
        input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens, cache_read_input_tokens=cached
    )


def chat_params(job: JobSpec, request: RenderedRequest, base_url: str | None) -> dict[str, Any]:
    """The chat completions body of a row's request (a batch line's `body` too); a row with a body of
    its own (an OpenAI batch file's) keeps its parameters as they are. A row's images and documents
    are read now and go as content parts (AttachmentError: one cannot go)."""
    pipeline = request.over(job.pipeline)
    messages: list[dict[str, Any]] = request.chat(pipeline.system)
    if request.attachments:
        files = load_row(request, pipeline, job.input_path, "openai", job.attachment_access(get_settings()))
        messages[-1] = {"role": "user", "content": openai_content(request.prompt, files)}
    params: dict[str, Any] = {"model": pipeline.model, "messages": messages}
    # OpenAI's own models take max_completion_tokens (its reasoning models refuse max_tokens);
    # other servers know max_tokens best.
    params["max_completion_tokens" if is_openai_url(base_url) else "max_tokens"] = pipeline.max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(pipeline, name) is not None:
            params[name] = getattr(pipeline, name)
    if pipeline.stop:
        params["stop"] = pipeline.stop
    schema = response_format(pipeline.output, openai_strict=is_openai_url(base_url))
    if pipeline.structured_output and schema is not None:
        params["response_format"] = schema
    if request.body and "response_format" in request.body:
        params["response_format"] = request.body["response_format"]
    return params


def key_and_url(job: JobSpec, settings: Settings) -> tuple[str, str | None]:
    """The job's OpenAI-compatible server and the key it may be sent (FatalJobError: none here)."""
    base_url = settings.openai_url(job.pipeline.base_url)
    refused = settings.base_url_refused(job.pipeline.base_url)
    if refused:
        raise FatalJobError(refused)
    try:
        api_key = settings.openai_key(base_url, job.pipeline.api_key_env)
    except KeyRefused as refused:
        raise FatalJobError(str(refused)) from None
    if not api_key:
        raise FatalJobError("no OpenAI API key in this worker: set OPENAI_API_KEY (or PROMPTMILL_OPENAI_API_KEY)")
    return api_key, base_url


def completion_outcome(row: int, completion: ChatCompletion, pipeline: Pipeline, **fields: Any) -> RawOutcome:
    """A chat completion as the row's outcome: its text (a structured choice's label), usage and finish reason."""
    choice = completion.choices[0] if completion.choices else None
    text = (choice.message.content or "") if choice is not None else ""
    if pipeline.structured_output and pipeline.output.type == "choice":
        text = chosen_label(text)
    return RawOutcome(
        row=row,
        text=text,
        usage=_usage(completion.usage) or Usage(),
        finish_reason=choice.finish_reason if choice is not None else None,
        **{"request_id": completion.id, **fields},
    )


class OpenAIBackend:
    label = "the OpenAI-compatible server"
    hold_s = None
    one_token_budget = True  # OpenAI counts the prompt plus max_tokens against one budget

    def __init__(self, job: JobSpec, settings: Settings, store: JobStore | None = None):
        self.api_key, self.base_url = key_and_url(job, settings)
        self.label = "the OpenAI API" if is_openai_url(self.base_url) else f"the server at {self.base_url}"
        self.max_in_flight: int | None = settings.max_in_flight
        self.client = openai.AsyncOpenAI(
            api_key=self.api_key,
            base_url=self.base_url,  # None: the SDK's default, OpenAI's own
            max_retries=0,
            timeout=settings.request_timeout_s,
            http_client=openai.DefaultAioHttpClient(timeout=settings.request_timeout_s),
        )

    @staticmethod
    def identity(job: JobSpec, settings: Settings) -> Hashable:
        return settings.openai_url(job.pipeline.base_url), job.pipeline.api_key_env  # one client per server and key

    def limit_scope(self, job: JobSpec) -> str:
        return account_scope(str(self.client.base_url), self.api_key, job.model, provider="openai")

    @staticmethod
    def limited_input(usage: Usage) -> int:
        return usage.prompt_tokens  # cached prompt tokens count against the limit too

    async def send(self, call: Call) -> Reply:
        pipeline = call.job.pipeline
        body = chat_params(call.job, call.request, self.base_url)
        started = time.monotonic()
        first: float | None = None
        raw = None
        seen_usage: CompletionUsage | None = None  # a stream's usage comes in its last chunk
        try:
            # The client's own `post` (its way to any endpoint), asking for the raw response as
            # `with_raw_response` does: `chat.completions.create` first transforms its ~40 typed
            # parameters, which took a fifth of a worker's CPU at the ceiling; ours are plain JSON.
            if not pipeline.stream:
                raw = await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion,
                                             options={"headers": {_RAW_RESPONSE: "true"}})  # fmt: skip
                completion = raw.parse()
            else:
                # Streamed, usage in its last chunk; the SDK's stream state assembles the completion.
                body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                raw = await self.client.post(
                    "/chat/completions", body=body, cast_to=ChatCompletion, stream=True,
                    stream_cls=openai.AsyncStream[ChatCompletionChunk], options={"headers": {_RAW_RESPONSE: "true"}},
                )  # fmt: skip
                state = ChatCompletionStreamState()
                finished = False
                async for chunk in raw.parse():
                    if first is None and any(choice.delta.content for choice in chunk.choices):
                        first = time.monotonic()
                    finished = finished or any(choice.finish_reason for choice in chunk.choices)
                    seen_usage = chunk.usage or seen_usage
                    state.handle_chunk(chunk)
                if not finished:  # closed before the answer's end: not an answer
                    verdict = stream_ended_early("finish_reason", _usage(seen_usage))
                    return dataclasses.replace(verdict, limits=LimitHeaders.from_openai(raw.headers))
                completion = state.get_final_completion()
        except STREAM_ERRORS as error:
            response = getattr(error, "response", None)
            if response is None:
                response = raw  # broken off mid-answer: the headers came
            limits = LimitHeaders.from_openai(response.headers) if response is not None else None
            return dataclasses.replace(classify(error), limits=limits, usage=_usage(seen_usage))
        latency = time.monotonic() - started
        return completion_outcome(
            call.request.row,
            completion,
            pipeline,
            request_id=raw.headers.get("x-request-id") or completion.id,
            latency_ms=round(latency * 1000, 1),
            ttft_ms=round((first - started) * 1000, 1) if first is not None else None,
            limits=LimitHeaders.from_openai(raw.headers),
        )

    async def close(self) -> None:
        await self.client.close()
