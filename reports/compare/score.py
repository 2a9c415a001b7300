"""A contender's figures from its job's records and ledger: failures, latency, speed, cost, accuracy
against the labels and agreement with the first contender."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

FAILED = "(failed)"  # a failed row's answer in agreement and confusion tables


def normalised(value: Any) -> Any:
    """An answer or a label as compared: text stripped and case-folded, JSON text parsed, containers
    element by element."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                return normalised(orjson.loads(text))
            except orjson.JSONDecodeError:
                pass
        return text.casefold()
    if isinstance(value, dict):
        return {str(key): normalised(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalised(item) for item in value]
    return value


def matched(answer: Any, expected: Any, fieldwise: bool) -> tuple[int, int]:
    """(parts right, parts): a JSON answer is judged field by field against an object it should
    equal (a missing answer misses every field); anything else is one part."""
    expected = normalised(expected)
    answer = normalised(answer)
    if fieldwise and isinstance(expected, dict):
        got = answer if isinstance(answer, dict) else {}
        return sum(1 for key, value in expected.items() if key in got and got[key] == value), len(expected)
    return int(answer is not None and answer == expected), 1


def _percentile(values: list[float], percent: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def _epoch(stamp: str | None) -> float | None:
    return None if stamp is None else datetime.fromisoformat(stamp).timestamp()


@dataclass
class Score:
    name: str
    backend: str
    model: str
    rows: int
    ok: int
    failed: int
    failures: dict[str, int]
    latencies_ms: list[float]
    output_tokens: int
    span_s: float
    cost_usd: float
    state: str = "complete"
    error: str | None = None
    accuracy: float | None = None
    agreement: float | None = None
    confusion: dict[str, dict[str, int]] | None = None  # the first contender's answer -> this one's -> rows
    projection: dict[str, float] = field(default_factory=dict)

    @property
    def latency_ms_p50(self) -> float | None:
        return _percentile(self.latencies_ms, 50)

    @property
    def latency_ms_p95(self) -> float | None:
        return _percentile(self.latencies_ms, 95)

    @property
    def output_tokens_per_s(self) -> float | None:
        return self.output_tokens / self.span_s if self.span_s > 0 else None

    @property
    def cost_per_1000_rows_usd(self) -> float | None:
        return self.cost_usd / self.rows * 1000 if self.rows else None

    def as_dict(self) -> dict[str, Any]:
        rounded = {
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p95": self.latency_ms_p95,
            "output_tokens_per_s": self.output_tokens_per_s,
        }
        return {
            "name": self.name,
            "backend": self.backend,
            "model": self.model,
            "state": self.state,
            "error": self.error,
            "rows": self.rows,
            "ok": self.ok,
            "failed": self.failed,
            "failures": self.failures,
            **{key: None if value is None else round(value, 1) for key, value in rounded.items()},
            "cost_usd": self.cost_usd,
            "cost_per_1000_rows_usd": self.cost_per_1000_rows_usd,
            "accuracy": self.accuracy,
            "agreement": self.agreement,
            "confusion": self.confusion,
            "projection": self.projection,
        }


def answer_of(record: dict[str, Any]) -> Any:
    return record["output"] if record["status"] == "ok" else FAILED


def score_records(name: str, backend: str, model: str, records: list[dict[str, Any]], cost_usd: float) -> Score:
    """The figures one contender's records give by themselves."""
    ok = [record for record in records if record["status"] == "ok"]
    failures = Counter(record["error"]["kind"] for record in records if record["status"] == "failed")
    starts = [t for t in (_epoch(r["started_at"]) for r in records) if t is not None]
    ends = [t for t in (_epoch(r["finished_at"]) for r in records) if t is not None]
    return Score(
        name=name,
        backend=backend,
        model=model,
        rows=len(records),
        ok=len(ok),
        failed=len(records) - len(ok),
        failures=dict(sorted(failures.items())),
        latencies_ms=[r["latency_ms"] for r in ok if r["latency_ms"] is not None],
        output_tokens=sum(r["usage"]["output_tokens"] for r in ok),
        span_s=max(ends) - min(starts) if starts and ends else 0.0,
        cost_usd=cost_usd,
    )


def accuracy(records: list[dict[str, Any]], labels: list[Any], fieldwise: bool) -> float | None:
    """Share of labelled rows (for JSON outputs: of labelled fields) answered right; a failed row is wrong."""
    right = parts = 0
    for record, label in zip(records, labels, strict=True):
        if label is None:
            continue
        got, out_of = matched(record["output"] if record["status"] == "ok" else None, label, fieldwise)
        right, parts = right + got, parts + out_of
    return round(right / parts, 4) if parts else None


def agreement(records: list[dict[str, Any]], reference: list[dict[str, Any]], fieldwise: bool) -> float | None:
    """Share of rows (for JSON outputs: of fields) where both answered, the same."""
    right = parts = 0
    for record, first in zip(records, reference, strict=True):
        expected = first["output"] if first["status"] == "ok" else None
        if expected is None or record["status"] != "ok":
            parts += 1 if not (fieldwise and isinstance(expected, dict)) else len(expected)
            continue
        got, out_of = matched(record["output"], expected, fieldwise)
        right, parts = right + got, parts + out_of
    return round(right / parts, 4) if parts else None


def confusion(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Rows by the first contender's answer, then by this one's (a failed row as FAILED)."""
    table: dict[str, Counter[str]] = {}
    for record, first in zip(records, reference, strict=True):
        table.setdefault(str(answer_of(first)), Counter())[str(answer_of(record))] += 1
    return {row: dict(sorted(counts.items())) for row, counts in sorted(table.items())}
