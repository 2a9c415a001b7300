"""The request path: every layer a request passes through on its way to a backend, built in one place
(`build_path`); the layers themselves are workers/layers.py.

Read from the outside in, as a request travels (dramatiq's middleware is the model):

    Audit        the row's start and end times, its model, the attempts it took
    Retry        attempt after attempt: backoff, the attempts log, a job-fatal refusal stops the job, an
                 outage (no answer from anywhere for OUTAGE_PAUSE_S) pauses it
    Health       a fallback chain's model: each attempt's outcome told to the fleet
    Concurrency  a slot among the process's requests in flight, adapted to the provider's latency
    Budget       the request's most possible cost held against the job's cap, then settled
    Ledger       the name the answer is priced under (a long-context rate, a batch's discount)
    Limit        a grant from the fleet's rate limiter; the answer's headers and usage go back to it,
                 and each request sent is told to the job's pace (RequestSeen)
    OnWire       a fallback chain's model: marks the row while an attempt is on the wire
    Measure      the request counted for Prometheus (only with metrics on)
    Gate         shut when the chunk stops: nothing more is sent, what was sent finishes
    backend      the transport: one attempt, one reply

Every backend gets every layer that applies to it; one that does not (no fleet limit for a local
engine, no budget hold for a job without a cap, no Health outside a chain) is left out of its path,
so no request pays for it. `fan_out` sends a chunk's requests down the path at once and hands back
each outcome as it finishes: the one fan-out loop.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.budget import BudgetStore
from promptmill.jobs.state.outage import OutageClock
from promptmill.pipelines.items import RenderedRequest
from promptmill.workers.backends.base import AttachmentError, Backend, Call, RawOutcome, Reply, attachment_failed
from promptmill.workers.concurrency import AdaptiveConcurrency
from promptmill.workers.layers import (
    AttemptLog,
    Audit,
    Budget,
    Concurrency,
    Gate,
    Health,
    Layer,
    Ledger,
    Limit,
    Measure,
    OnWire,
    RequestSeen,
    Retry,
    Send,
)
from promptmill.workers.limit_signals import InputTokenEstimate
from promptmill.workers.metrics import Gathered
from promptmill.workers.rate_limit import FleetLimiter
from promptmill.workers.retry import Verdict


@dataclass
class PathParts:
    """What one model's path is built of: the backend and the process's state it shares."""

    job: JobSpec  # the model's job (a fallback chain's link is a job of its own)
    backend: Backend
    settings: Settings
    prices: PriceTable
    attempts: AttemptLog
    gate: Gate
    estimate: InputTokenEstimate  # the backend's input tokens per character, learned
    slots: AdaptiveConcurrency | None = None  # None: the backend schedules its own (an engine's batch)
    limiter: FleetLimiter | None = None  # None: no fleet limit (a local engine, a batch)
    budgets: BudgetStore | None = None  # the job has a cap
    health: Health | None = None  # a fallback chain's model
    seen: Callable[[RequestSeen], None] | None = None  # told of each request sent under the limiter
    gathered: Gathered | None = None  # metrics on
    outage: OutageClock | None = None  # connection failures with no answer pause the job (an API model)


def build_path(parts: PathParts) -> Send:
    """Every layer of the request path, in order (this module's docstring), around the backend."""
    info, backend = parts.job.info, parts.backend
    layers: list[Layer | None] = [
        Audit(),
        Retry(parts.attempts, parts.settings, backend.label, parts.outage),
        parts.health,
        Concurrency(parts.slots, parts.limiter) if parts.slots is not None else None,
        Budget(parts.budgets, parts.prices, parts.estimate, info.ledger_suffix)
        if parts.budgets is not None and info.billed_per_token else None,
        Ledger(parts.prices, info.billed_per_token, info.ledger_suffix),
        Limit(parts.limiter, parts.estimate, backend, parts.seen) if parts.limiter is not None else None,
        OnWire() if parts.health is not None else None,
        Measure(parts.gathered) if parts.gathered is not None else None,
        parts.gate,
    ]  # fmt: skip
    return compose([layer for layer in layers if layer is not None], backend)


def compose(layers: list[Layer], backend: Backend) -> Send:
    """The layers, outermost first, around the backend's `send`. A layer is bound to the next by
    `partial` (no frame of its own): every frame is paid on each of a request's awaits."""
    path: Send = functools.partial(_files_readable, send=backend.send)
    for layer in reversed(layers):
        path = functools.partial(layer, send=path)
    return path


async def _files_readable(call: Call, send: Send) -> Reply | None:
    """The backend's `send`, for every backend: a row whose image or document cannot be read as it is
    sent (missing, changed, over the provider's limit) fails alone, before anything reaches the model."""
    try:
        return await send(call)
    except AttachmentError as error:
        return attachment_failed(call.request.row, error)


async def fan_out(
    path: Send, job: JobSpec, chunk_id: str, requests: list[RenderedRequest]
) -> AsyncIterator[RawOutcome]:
    """Send every request down the path at once; yield each row's outcome as it finishes.

    Closing the aiter early (a dead engine, a chunk's hold ending) cancels what is still in flight:
    those rows stay pending for the next run. A chunk that stops sending closes its Gate instead.
    """

    async def one(request: RenderedRequest) -> RawOutcome | None:
        reply = await path(Call(job, request, chunk_id))
        assert not isinstance(reply, Verdict), "the retry layer turns every verdict into an outcome"
        return reply

    tasks = [asyncio.ensure_future(one(request)) for request in requests]
    try:
        for finished in asyncio.as_completed(tasks):
            outcome = await finished
            if outcome is not None:
                yield outcome
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
