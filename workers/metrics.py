"""Prometheus metrics of a worker process (prometheus-client), on when a port is given.

`promptmill worker --metrics-port P` (or PROMPTMILL_METRICS_PORT) serves one process's metrics;
`promptmill run` serves its local workers' together on one port (prometheus-client's multiprocess
mode: each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which `run` reads). With no
port, no layer measures anything and no request pays for it.

Every request a provider answers is counted once, as the provider counts it: by its HTTP status (or
timeout, dropped, engine_error), with its tokens and its cost at the ledger's prices.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from promptmill.config.prices import PriceTable
from promptmill.pipelines.items import Usage
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
    """The innermost layer but the Gate: each request sent, counted when its reply comes.

    Counts gather in the process and go to prometheus-client at most twice a second (and when a chunk
    ends, `flush`): in multiprocess mode each value written is a locked write to a shared file, and a
    request writes a dozen. Cost is priced from the gathered tokens (prices are linear: the same sum).
    """

    job_id: str
    model: str
    backend: str
    prices: PriceTable
    per_token: bool
    suffix: str = ""
    statuses: collections.Counter = field(default_factory=collections.Counter)
    usage: dict[str, list[int]] = field(default_factory=dict)  # ledger model -> _USAGE_FIELDS not yet written
    durations: list[float] = field(default_factory=list)
    in_flight: int = 0

    async def __call__(self, call: Call, send: Send) -> Reply | None:
        self.in_flight += 1
        try:
            reply = await send(call)
        finally:
            self.in_flight -= 1
        if reply is None:
            return None  # not sent (the gate closed)
        if isinstance(reply, Verdict):
            self.statuses[str(reply.status)] += 1
        elif reply.error is not None:  # refused by the engine, or a batch request's error
            self.statuses[str(reply.errors[-1].status) if reply.errors else "engine_error"] += 1
        else:
            self.statuses["200"] += 1
            usage = reply.usage
            priced = self.prices.ledger_model(self.model, usage.prompt_tokens) + self.suffix if self.per_token else ""
            sums = self.usage.get(priced)
            if sums is None:
                sums = self.usage[priced] = [0] * len(_USAGE_FIELDS)
            for i, name in enumerate(_USAGE_FIELDS):
                sums[i] += getattr(usage, name)
            if reply.latency_ms is not None:
                self.durations.append(reply.latency_ms / 1000)
        if time.monotonic() - _flushed[0] > _FLUSH_EVERY_S:
            flush()
        return reply

    def write(self) -> None:
        for status, count in self.statuses.items():
            REQUESTS.labels(self.job_id, self.model, self.backend, status).inc(count)
        self.statuses.clear()
        for priced, sums in self.usage.items():
            usage = Usage(**dict(zip(_USAGE_FIELDS, sums)))
            for kind, name in _TOKEN_KINDS.items():
                if tokens := getattr(usage, name):
                    TOKENS.labels(self.job_id, self.model, kind).inc(tokens)
            price = self.prices.price_for(priced).cost_usd(**usage.token_counts()) if self.per_token else (
                self.prices.engine_cost_usd(usage.engine_us)
            )  # fmt: skip
            COST.labels(self.job_id, self.model).inc(float(price))
        self.usage.clear()
        histogram = REQUEST_DURATION.labels(self.model, self.backend)
        for seconds in self.durations:
            histogram.observe(seconds)
        self.durations.clear()


_FLUSH_EVERY_S = 0.5
_USAGE_FIELDS = tuple(Usage.model_fields)
_flushed = [0.0]
_measures: dict[tuple[str, str, str], Measure] = {}
_rows: collections.Counter = collections.Counter()
_rows_lock = threading.Lock()


def measure_for(job_id: str, model: str, backend: str, prices: PriceTable, per_token: bool, suffix: str) -> Measure:
    """The process's one Measure for a job's model on a backend: every chunk's path shares it."""
    key = (job_id, model, backend)
    if key not in _measures:
        _measures[key] = Measure(job_id, model, backend, prices, per_token, suffix)
    return _measures[key]


def count_row(job_id: str, status: str) -> None:
    with _rows_lock:
        _rows[(job_id, status)] += 1


def flush() -> None:
    """Write what the process gathered (a chunk ends, or half a second passed)."""
    _flushed[0] = time.monotonic()
    in_flight: collections.Counter = collections.Counter()
    for measure in list(_measures.values()):
        measure.write()
        in_flight[measure.model] += measure.in_flight
    for model, count in in_flight.items():
        IN_FLIGHT.labels(model).set(count)
    with _rows_lock:
        rows = dict(_rows)
        _rows.clear()
    for (job_id, status), count in rows.items():
        ROWS.labels(job_id, status).inc(count)
