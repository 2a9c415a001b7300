"""The Anthropic Messages API backend: many requests in flight per process, paced, retried.

One `AsyncAnthropic` client per worker process, created on the process's persistent event loop, with
the SDK's own retries off (`max_retries=0`) so every attempt is counted by our retry policy.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import anthropic
from aiolimiter import AsyncLimiter

from config.settings import Settings
from jobs.spec import JobSpec
from pipelines.items import ItemError, RenderedRequest, Usage
from workers.backends.base import FatalJobError, RawOutcome
from workers.retry import backoff_s, classify


class AnthropicBackend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.api_key(),
            base_url=settings.anthropic_base_url,  # None: the SDK reads ANTHROPIC_BASE_URL
            max_retries=0,
            timeout=settings.request_timeout_s,
        )
        self._limiters: dict[float, AsyncLimiter] = {}

    def _limiter(self, job: JobSpec) -> AsyncLimiter | None:
        if job.rpm is None:
            return None
        # Until the fleet-wide limiter, a job's rpm is shared evenly by its worker processes.
        per_process_rpm = job.rpm / job.worker_processes
        if per_process_rpm not in self._limiters:
            self._limiters[per_process_rpm] = AsyncLimiter(1, 60.0 / per_process_rpm)
        return self._limiters[per_process_rpm]

    def _params(self, job: JobSpec, request: RenderedRequest) -> dict[str, Any]:
        pipeline = job.pipeline
        params: dict[str, Any] = {
            "model": pipeline.model,
            "max_tokens": pipeline.max_tokens,
            "messages": [{"role": "user", "content": request.prompt}],
        }
        if pipeline.system:
            params["system"] = pipeline.system
        # The SDK no longer names sampling parameters; models that take them read them from the body.
        sampling = {name: getattr(pipeline, name) for name in ("temperature", "top_p")}
        sampling = {name: value for name, value in sampling.items() if value is not None}
        if sampling:
            params["extra_body"] = sampling
        if pipeline.stop:
            params["stop_sequences"] = pipeline.stop
        return params

    async def _one(
        self, job: JobSpec, request: RenderedRequest, in_flight: asyncio.Semaphore, limiter: AsyncLimiter | None
    ) -> RawOutcome:
        params = self._params(job, request)
        attempt = 0
        while True:
            attempt += 1
            async with in_flight:
                if limiter is not None:
                    await limiter.acquire()
                try:
                    message = await self.client.messages.create(**params)
                except anthropic.APIError as error:
                    verdict = classify(error)
                else:
                    text = "".join(block.text for block in message.content if block.type == "text")
                    usage = message.usage
                    return RawOutcome(
                        row=request.row,
                        text=text,
                        usage=Usage(
                            input_tokens=usage.input_tokens or 0,
                            output_tokens=usage.output_tokens or 0,
                            cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
                            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
                        ),
                        finish_reason=message.stop_reason,
                        attempts=attempt,
                    )
            if verdict.fatal_for_job:
                raise FatalJobError(f"the Anthropic API refused the job: {verdict.message}")
            if not verdict.retryable or attempt >= job.max_attempts:
                suffix = f" (after {attempt} attempts)" if verdict.retryable else ""
                return RawOutcome(
                    row=request.row, error=ItemError(kind=verdict.kind, message=verdict.message + suffix), attempts=attempt
                )
            await asyncio.sleep(
                backoff_s(attempt, self.settings.backoff_base_s, self.settings.backoff_cap_s, verdict.retry_after_s)
            )

    async def run(self, job: JobSpec, requests: list[RenderedRequest]) -> AsyncIterator[RawOutcome]:
        in_flight = asyncio.Semaphore(job.max_in_flight)
        limiter = self._limiter(job)
        tasks = [asyncio.ensure_future(self._one(job, request, in_flight, limiter)) for request in requests]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
