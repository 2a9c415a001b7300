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

import redis
from prometheus_client import Counter, Gauge, Histogram

from promptmill.config.prices import PriceTable
from promptmill.pipelines.items import Usage
from promptmill.workers.rate_limit import FleetLimiter

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
TIME_TO_FIRST_TOKEN = Histogram(
    "promptmill_time_to_first_token_seconds",
    "Answered requests that measured it (streamed, or the local engine), from sending to the first token.",
    ["model", "backend"], buckets=_LATENCY_BUCKETS,
)  # fmt: skip
LIMITER_WAIT = Histogram(
    "promptmill_limiter_wait_seconds", "How long requests waited for the fleet's rate limiter to grant them.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)  # fmt: skip
RATE_LIMIT = Gauge(
    "promptmill_rate_limit",
    "The per-minute limit in force for a model, by budget (requests, input_tokens, output_tokens) and "
    "source: configured (the pipeline or settings), learned (the provider's headers) or effective.",
    ["model", "budget", "source"], multiprocess_mode="mostrecent",
)  # fmt: skip
BREAKER_OPEN = Gauge(
    "promptmill_breaker_open", "1 while the fleet's circuit breaker (or a 429's pause) holds a model's requests.",
    ["model"], multiprocess_mode="mostrecent",
)  # fmt: skip
JOBS_HELD = Gauge(
    "promptmill_worker_jobs_held",
    "Jobs a worker process keeps state for (specs, prices, limiters, metric series): those running, and "
    "those that ended less than PROMPTMILL_FORGET_JOB_AFTER_S ago.",
    multiprocess_mode="livesum",
)
JOB_SHARE = Gauge(
    "promptmill_job_share",
    "A running job's fair share of its queue's worker turns: its weight (priority) over the weights of the jobs "
    "waiting for the same workers (0 once it waits for none).",
    ["job"], multiprocess_mode="mostrecent",
)  # fmt: skip
ENGINE_RUNNING = Gauge(
    "promptmill_engine_running_requests", "Requests the local vLLM engine is running.", multiprocess_mode="livesum"
)
ENGINE_KV_CACHE = Gauge(
    "promptmill_engine_kv_cache_usage", "Share of the local vLLM engine's KV cache in use (0 to 1).",
    multiprocess_mode="livemax",
)  # fmt: skip

_TOKEN_KINDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_write": "cache_creation_input_tokens",
}


def metrics_on(port: int | None) -> bool:
    return port is not None or bool(os.environ.get(MULTIPROC_DIR))


@dataclass
class Gathered:
    """A process's requests for one job's model on a backend, gathered until the next flush.

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
    first_tokens: list[float] = field(default_factory=list)
    in_flight: int = 0

    def request(
        self, status: str, usage: Usage | None, latency_ms: float | None = None, ttft_ms: float | None = None
    ) -> None:
        """A request's reply: its status (the HTTP status, or timeout, dropped, engine_error), the usage
        it was billed for, and for an answer its latency and time to first token."""
        self.statuses[status] += 1
        if usage is not None:
            self._add_usage(usage)
        if latency_ms is not None:
            self.durations.append(latency_ms / 1000)
        if ttft_ms is not None:
            self.first_tokens.append(ttft_ms / 1000)
        if time.monotonic() - _flushed[0] > _FLUSH_EVERY_S:
            flush()

    def _add_usage(self, usage: Usage) -> None:
        priced = self.prices.ledger_model(self.model, usage.prompt_tokens) + self.suffix if self.per_token else ""
        sums = self.usage.get(priced)
        if sums is None:
            sums = self.usage[priced] = [0] * len(_USAGE_FIELDS)
        for i, name in enumerate(_USAGE_FIELDS):
            sums[i] += getattr(usage, name)

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
        if self.first_tokens:
            histogram = TIME_TO_FIRST_TOKEN.labels(self.model, self.backend)
            for seconds in self.first_tokens:
                histogram.observe(seconds)
            self.first_tokens.clear()


_FLUSH_EVERY_S = 0.5
_USAGE_FIELDS = tuple(Usage.model_fields)
_flushed = [0.0]
_measures: dict[tuple[str, str, str], Gathered] = {}
_rows: collections.Counter = collections.Counter()
_rows_lock = threading.Lock()
_limiters: dict[tuple[str, str], FleetLimiter] = {}  # (model, scope) -> the process's limiter for it
_limiter_waits: list[float] = []
_BUDGETS = ("requests", "input_tokens", "output_tokens")


def watch_limiter(model: str, limiter: FleetLimiter) -> None:
    """Report this limiter's limits and pauses for the model with every flush."""
    _limiters.setdefault((model, limiter.scope), limiter)


def limiter_waited(seconds: float) -> None:
    _limiter_waits.append(seconds)


def gathered_for(job_id: str, model: str, backend: str, prices: PriceTable, per_token: bool, suffix: str) -> Gathered:
    """The process's one gatherer for a job's model on a backend: every chunk's path shares it."""
    key = (job_id, model, backend)
    if key not in _measures:
        _measures[key] = Gathered(job_id, model, backend, prices, per_token, suffix)
    return _measures[key]


def jobs_measured() -> set[str]:
    return {job_id for job_id, _, _ in list(_measures)}


def forget_measures(job_id: str) -> None:
    """The job ended: its gatherers go, and its series with them where the process serves its own
    (in `run`'s multiprocess mode the series live in files that go with the run)."""
    for key in [key for key in list(_measures) if key[0] == job_id]:
        _measures.pop(key, None)
    if not os.environ.get(MULTIPROC_DIR):
        for metric in (REQUESTS, TOKENS, COST, ROWS, JOB_SHARE):
            metric.remove_by_labels({"job": job_id})


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
    waits = _limiter_waits[:]
    del _limiter_waits[: len(waits)]
    for seconds in waits:
        LIMITER_WAIT.observe(seconds)
    for (model, _), limiter in list(_limiters.items()):
        configured = (limiter.limits.rpm, limiter.limits.input_tpm, limiter.limits.output_tpm)
        for source, values in (("configured", configured), ("learned", limiter.learned), ("effective", limiter.effective)):
            for budget, value in zip(_BUDGETS, values):
                RATE_LIMIT.labels(model, budget, source).set(value or 0)
        try:
            BREAKER_OPEN.labels(model).set(int(limiter.paused_for_s() > 0))
        except redis.RedisError:
            pass  # Redis restarting: the next flush reads it
    with _rows_lock:
        rows = dict(_rows)
        _rows.clear()
    for (job_id, status), count in rows.items():
        ROWS.labels(job_id, status).inc(count)


def engine_stat_logger() -> type:
    """A vLLM stat logger (vLLM calls it after each engine step) that keeps the engine's gauges."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineGauges(StatLoggerBase):
        def __init__(self, vllm_config: object, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                ENGINE_RUNNING.set(scheduler_stats.num_running_reqs)
                ENGINE_KV_CACHE.set(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return EngineGauges
