"""Prometheus metrics of a worker process (prometheus-client), on when a port is given.

`promptmill worker --metrics-port P` (or PROMPTMILL_METRICS_PORT) serves one process's metrics;
`promptmill run` serves its local workers' together on one port (prometheus-client's multiprocess
mode: each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which `run` reads). With no
port, no layer measures anything and no request pays for it.

Every request a provider answers is counted once, as the provider counts it: by its HTTP status (or
timeout, dropped, engine_error), with its tokens and its cost at the ledger's prices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from promptmill.config.prices import PriceTable
from promptmill.workers.backends.base import Call, Reply
from promptmill.workers.request_path import Send
from promptmill.workers.retry import Verdict

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable: set, a process writes there

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

REQUESTS = Counter(
    "promptmill_requests",
    "Requests sent to a model, by outcome: the HTTP status, or timeout, dropped or engine_error.",
    ["job", "model", "backend", "status"],
)
TOKENS = Counter(
    "promptmill_tokens", "Tokens of answered requests, by kind: input, output, cache_read, cache_write.",
    ["job", "model", "kind"],
)  # fmt: skip
COST = Counter("promptmill_cost_usd", "What answered requests cost, at the ledger's prices.", ["job", "model"])
REQUEST_DURATION = Histogram(
    "promptmill_request_duration_seconds", "Answered requests, from sending to the whole answer.",
    ["model", "backend"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
ROWS = Counter("promptmill_rows", "Rows committed, by status: ok or failed.", ["job", "status"])
IN_FLIGHT = Gauge("promptmill_in_flight", "Requests on their way to a model.", ["model"], multiprocess_mode="livesum")

_TOKEN_KINDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_write": "cache_creation_input_tokens",
}


def metrics_on(port: int | None) -> bool:
    return port is not None or bool(os.environ.get(MULTIPROC_DIR))


@dataclass
class Measure:
    """The innermost layer but the Gate: each request sent, counted when its reply comes. Its labels
    are the path's (one job and model), so a request looks up only its status's counter."""

    job_id: str
    model: str
    backend: str
    prices: PriceTable
    per_token: bool
    suffix: str = ""
    _by_status: dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._in_flight = IN_FLIGHT.labels(self.model)
        self._tokens = {kind: TOKENS.labels(self.job_id, self.model, kind) for kind in _TOKEN_KINDS}
        self._cost = COST.labels(self.job_id, self.model)
        self._duration = REQUEST_DURATION.labels(self.model, self.backend)

    def _requests(self, status: str) -> Counter:
        if status not in self._by_status:
            self._by_status[status] = REQUESTS.labels(self.job_id, self.model, self.backend, status)
        return self._by_status[status]

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        self._in_flight.inc()
        try:
            reply = await send(call)
        finally:
            self._in_flight.dec()
        if reply is None:
            return None  # not sent (the gate closed)
        if isinstance(reply, Verdict):
            self._requests(str(reply.status)).inc()
            return reply
        if reply.error is not None:  # refused by the engine, or a batch request's error
            self._requests(str(reply.errors[-1].status) if reply.errors else "engine_error").inc()
            return reply
        self._requests("200").inc()
        usage = reply.usage
        for kind, name in _TOKEN_KINDS.items():
            self._tokens[kind].inc(getattr(usage, name))
        if self.per_token:
            price = self.prices.price_for(self.prices.ledger_model(self.model, usage.prompt_tokens) + self.suffix)
            self._cost.inc(float(price.cost_usd(**usage.token_counts())))
        else:
            self._cost.inc(float(self.prices.engine_cost_usd(usage.engine_us)))
        if reply.latency_ms is not None:
            self._duration.observe(reply.latency_ms / 1000)
        return reply


def count_row(job_id: str, status: str) -> None:
    ROWS.labels(job_id, status).inc()

