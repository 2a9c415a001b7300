"""The Anthropic Messages API backend: many requests in flight per process, under the fleet's limit.

One `AsyncAnthropic` client per worker process, on the process's persistent event loop, with the
SDK's own retries off (`max_retries=0`) so every attempt is counted by our retry policy. Every
request waits for a grant from the fleet's limiter (workers/rate_limit.py), and every response's
rate-limit headers, 429s and failures go back to it. A job with a budget holds each request's
most possible cost before sending it (jobs/store.py), so it pauses before it could pass its cap.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, AsyncIterator

import anthropic

from config.prices import PriceTable
from config.settings import Settings
from jobs.spec import JobSpec
from jobs.store import JobStore
from pipelines.items import AttemptError, ErrorKind, ItemError, RenderedRequest, Usage
from pipelines.spec import RateLimits
from workers.backends.base import AttemptLog, FatalJobError, RawOutcome
from workers.concurrency import AdaptiveConcurrency
from workers.rate_limit import FleetLimiter, InputTokenEstimate, account_scope
from workers.retry import Verdict, backoff_s, classify


class AnthropicBackend:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store
        self.api_key = settings.api_key()
        if not self.api_key:
            raise FatalJobError("no API key in this worker: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY)")
        self.client = anthropic.AsyncAnthropic(
            api_key=self.api_key,
            base_url=settings.anthropic_base_url,  # None: the SDK reads ANTHROPIC_BASE_URL
            max_retries=0,
            timeout=settings.request_timeout_s,
            # The SDK's aiohttp transport: its httpx pool scans every open connection on each request,
            # which capped 2 processes at 874 requests/s here; aiohttp reached 1,660 (bench/rate_limit.py).
            http_client=anthropic.DefaultAioHttpClient(timeout=settings.request_timeout_s),
        )
        self.concurrency = AdaptiveConcurrency(ceiling=settings.max_in_flight)
        self.input_estimate = InputTokenEstimate()
        self._limiters: dict[tuple[str, RateLimits], FleetLimiter] = {}
        self._scoped_jobs: set[str] = set()
        self.prices = PriceTable.load(settings)

    def _hold_budget(self, job: JobSpec, chars: int) -> int | None:
        """Hold the request's most possible cost (micro-USD) against the job's budget; None: over it.

        The input is estimated from characters (with a quarter's margin) at the dearer of the input
        and cache-write prices, the output at `max_tokens`.
        """
        input_tokens = math.ceil(self.input_estimate.estimate(chars) * 1.25)
        price = self.prices.price_for(self.prices.ledger_model(job.model, input_tokens))
        worst = max(price.input, price.cache_write_5m, price.cache_write_1h) * input_tokens
        worst += price.output * job.pipeline.max_tokens
        micro = math.ceil(worst)  # USD per million tokens x tokens = micro-USD
        return micro if self.store.hold_budget(job.job_id, micro) else None

    def _limiter(self, job: JobSpec) -> FleetLimiter:
        scope = account_scope(str(self.client.base_url), self.api_key, job.model)
        if job.job_id not in self._scoped_jobs:
            self.store.set_limit_scope(job.job_id, scope)
            self._scoped_jobs.add(job.job_id)
        key = (scope, job.limits)
        if key not in self._limiters:
            self._limiters[key] = FleetLimiter(self.store.redis, scope, job.limits)
        return self._limiters[key]

    def _params(self, job: JobSpec, request: RenderedRequest) -> dict[str, Any]:
        pipeline = job.pipeline
        cache_control = {"type": "ephemeral", "ttl": pipeline.cache_ttl}
        content: str | list[dict[str, Any]] = request.prompt
        prefix = pipeline.shared_prefix
        if pipeline.cache_prefix and request.prompt.startswith(prefix):
            # A breakpoint after the shared prefix caches everything before it: system and prefix.
            content = [{"type": "text", "text": prefix, "cache_control": cache_control}]
            if rest := request.prompt[len(prefix) :]:
                content.append({"type": "text", "text": rest})
        params: dict[str, Any] = {
            "model": pipeline.model,
            "max_tokens": pipeline.max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        if pipeline.cache_system:
            params["system"] = [{"type": "text", "text": pipeline.system, "cache_control": cache_control}]
        elif pipeline.system:
            params["system"] = pipeline.system
        # The SDK no longer names sampling parameters; models that take them read them from the body.
        sampling = {name: getattr(pipeline, name) for name in ("temperature", "top_p")}
        sampling = {name: value for name, value in sampling.items() if value is not None}
        if sampling:
            params["extra_body"] = sampling
        if pipeline.stop:
            params["stop_sequences"] = pipeline.stop
        return params

    async def _attempt(
        self, job: JobSpec, params: dict[str, Any], chars: int, limiter: FleetLimiter, budgeted: bool
    ) -> RawOutcome | Verdict | None:
        """One request in one of the worker's slots; None: not sent, as the job's budget could not hold
        it (the job is paused)."""
        async with self.concurrency:
            # Held inside a slot: what is held is then the requests in flight, not every row waiting.
            held = self._hold_budget(job, chars) if budgeted else 0
            if held is None:
                return None
            spent = 0
            try:
                result = await self._send(job, params, chars, limiter)
                if budgeted and isinstance(result, RawOutcome):
                    usage = result.usage
                    price = self.prices.price_for(self.prices.ledger_model(job.model, usage.prompt_tokens))
                    spent = round(price.cost_usd(**usage.token_counts()) * 1_000_000)
                return result
            finally:
                if budgeted:
                    self.store.settle_budget(job.job_id, held, spent)

    async def _send(
        self, job: JobSpec, params: dict[str, Any], chars: int, limiter: FleetLimiter
    ) -> RawOutcome | Verdict:
        """One request under a grant; every answer, good or bad, is reported to the limiter."""
        grant = await limiter.acquire(self.input_estimate.estimate(chars), job.pipeline.max_tokens)
        started = time.monotonic()
        try:
            raw = await self.client.messages.with_raw_response.create(**params)
            message = await raw.parse()
        except anthropic.APIError as error:
            verdict = classify(error)
            response = getattr(error, "response", None)
            if response is not None:
                limiter.observe(response.headers, time.monotonic() - started)
            if verdict.kind is ErrorKind.timeout:
                limiter.settle(grant, grant.input_tokens, grant.output_tokens)  # it may have been served
            else:
                limiter.settle(grant, None, None)
            if verdict.kind is ErrorKind.rate_limited:
                limiter.rate_limited(verdict.retry_after_s)
            else:
                limiter.record(server_failure=verdict.server_failure)
            return verdict
        latency = time.monotonic() - started
        limiter.observe(raw.headers, latency)
        usage = message.usage
        charged_input = (usage.input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
        limiter.settle(grant, charged_input, usage.output_tokens or 0)
        limiter.record(ok=True)
        self.concurrency.observe(latency, limiter.request_rate_per_s)
        self.input_estimate.learn(chars, charged_input)
        return RawOutcome(
            row=-1,
            request_id=raw.headers.get("request-id") or message.id,
            latency_ms=round(latency * 1000, 1),
            text="".join(block.text for block in message.content if block.type == "text"),
            usage=Usage(
                input_tokens=usage.input_tokens or 0,
                output_tokens=usage.output_tokens or 0,
                cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
                cache_read_input_tokens=usage.cache_read_input_tokens or 0,
                cache_creation_1h_input_tokens=getattr(usage.cache_creation, "ephemeral_1h_input_tokens", 0) or 0,
            ),
            finish_reason=message.stop_reason,
        )

    async def _one(
        self,
        job: JobSpec,
        request: RenderedRequest,
        limiter: FleetLimiter,
        attempts: AttemptLog,
        budgeted: bool,
    ) -> RawOutcome | None:
        params = self._params(job, request)
        chars = len(request.prompt) + len(job.pipeline.system or "")
        attempt = attempts.prior(request.row)
        started_at = time.time()
        errors: list[AttemptError] = []
        while True:
            attempt += 1
            result = await self._attempt(job, params, chars, limiter, budgeted)
            if result is None:
                return None  # the row stays pending: a resume with a higher budget sends it
            if isinstance(result, RawOutcome):
                result.row, result.attempts, result.errors = request.row, attempt, errors
                result.started_at, result.finished_at = started_at, time.time()
                return result
            verdict = result
            if verdict.fatal_for_job:
                raise FatalJobError(f"the Anthropic API refused the job: {verdict.message}")
            attempts.failed(request.row)
            errors.append(AttemptError(status=verdict.status, message=verdict.message))
            if not verdict.retryable or attempt >= job.max_attempts:
                error = ItemError(kind=verdict.kind, message=verdict.final_message(attempt))
                return RawOutcome(
                    row=request.row, error=error, attempts=attempt, errors=errors,
                    started_at=started_at, finished_at=time.time(),
                )  # fmt: skip
            wait = backoff_s(attempt, self.settings.backoff_base_s, self.settings.backoff_cap_s, verdict.retry_after_s)
            await asyncio.sleep(wait)

    async def run(
        self, job: JobSpec, requests: list[RenderedRequest], attempts: AttemptLog
    ) -> AsyncIterator[RawOutcome]:
        limiter = self._limiter(job)
        # Read once per chunk: a job without a cap pays no Redis round trips for one (a cap set by
        # `resume --budget` reaches the chunks started after it).
        budgeted = self.store.has_budget(job.job_id)
        tasks = [asyncio.ensure_future(self._one(job, request, limiter, attempts, budgeted)) for request in requests]
        try:
            for finished in asyncio.as_completed(tasks):
                outcome = await finished
                if outcome is not None:
                    yield outcome
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

