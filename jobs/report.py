"""`report.html`: a job's story in plots, from Redis and its shards, so any machine can write it for a
finished job: rows done over time, the pace against the limit in force, latency, tokens and cost by
model, failures by kind with examples; then the manifest, the totals and `verify`'s verdict."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import plotly.graph_objects as go

from promptmill.config.prices import PriceTable
from promptmill.jobs.html_page import table, write_page
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.pace import EDGES_MS, SLOT_S, job_pace
from promptmill.jobs.shards import iter_outcomes
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.store import JobStore
from promptmill.jobs.verify import verify_job

_EXAMPLES = 3  # failures shown per kind


def _when(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _rows_over_time(over_time: list[tuple[int, int]], total: int) -> go.Figure:
    figure = go.Figure(go.Scatter(x=[_when(t + SLOT_S) for t, _ in over_time], y=[done for _, done in over_time],
                                  mode="lines+markers", name="rows done"))  # fmt: skip
    figure.update_layout(title=f"Rows done over time (of {total:,})", yaxis_title="rows", xaxis_title="UTC")
    return figure


def _pace_against_limit(over_time: list[tuple[int, int]], limits: dict | None) -> go.Figure:
    per_slot = [(t, done - (over_time[i - 1][1] if i else 0)) for i, (t, done) in enumerate(over_time)]
    figure = go.Figure(go.Bar(x=[_when(t) for t, _ in per_slot], y=[n / SLOT_S for _, n in per_slot], name="rows/s"))
    title = "Rows per second, by 10-second slot"
    if limits and limits.get("requests_per_minute"):
        figure.add_hline(y=limits["requests_per_minute"] / 60, line_dash="dash", annotation_text="requests/s limit")
    if limits:
        title += f" ({limits['rate_limited']:,} answers were 429, {limits['breaker_trips']:,} breaker pauses)"
    figure.update_layout(title=title, yaxis_title="rows/s", xaxis_title="UTC")
    return figure


def _latency(counts: dict[int, int]) -> go.Figure:
    buckets = sorted(counts)
    figure = go.Figure(go.Bar(x=[f"≤{EDGES_MS[min(b, len(EDGES_MS) - 1)]:,.0f}" for b in buckets],
                              y=[counts[b] for b in buckets]))  # fmt: skip
    figure.update_layout(title="Latency of answered rows (whole requests)", xaxis_title="ms", yaxis_title="rows")
    return figure


def _by_model(models: list) -> go.Figure:
    names = [m.model for m in models]
    figure = go.Figure(
        [
            go.Bar(x=names, y=[m.usage.input_tokens + m.usage.cache_read_input_tokens for m in models],
                   name="input tokens"),
            go.Bar(x=names, y=[m.usage.output_tokens for m in models], name="output tokens"),
            go.Bar(x=names, y=[float(m.cost_usd) for m in models], name="cost USD", yaxis="y2"),
        ]
    )  # fmt: skip
    figure.update_layout(title="Tokens and cost by model", barmode="group",
                         yaxis={"title": "tokens"}, yaxis2={"title": "USD", "overlaying": "y", "side": "right"})  # fmt: skip
    return figure


def write_report(store: JobStore, spec: JobSpec, prices: PriceTable, path: Path) -> dict:
    """Write the report; returns what it shows in figures, for the command to print."""
    status = store.status(spec.job_id)
    report = cost_report(spec, status, prices)
    pace = job_pace(store.redis, spec.job_id, status.pending)
    limits = None if status.limit_scope is None else store.limits.summary(status.limit_scope, spec.limits)
    failures: Counter = Counter()
    examples: dict[str, list[tuple[int, str]]] = {}
    for outcome in iter_outcomes(store, spec):
        if outcome.error is not None:
            failures[outcome.error.kind.value] += 1
            shown = examples.setdefault(outcome.error.kind.value, [])
            if len(shown) < _EXAMPLES:
                shown.append((outcome.row, outcome.error.message))
    verdict = verify_job(store, spec)
    figures: list[str | go.Figure] = [
        table(["job", "backend", "model", "state", "rows", "ok", "failed", "cost USD", "verify"],
              [[spec.job_id, spec.backend, spec.model, status.state.value, status.total, status.ok, status.failed,
                float(report.cost_usd), "ok" if verdict.ok else "; ".join(verdict.problems)]]),
    ]  # fmt: skip
    if pace.rows_over_time:
        figures += [_rows_over_time(pace.rows_over_time, status.total), _pace_against_limit(pace.rows_over_time, limits)]
    if pace.latency_counts:
        figures.append(_latency(pace.latency_counts))
    if report.models:
        figures.append(_by_model(report.models))
    figures.append("<h2>Failures</h2>")
    if failures:
        figure = go.Figure(go.Bar(x=list(failures), y=list(failures.values())))
        figure.update_layout(title="Failed rows by kind", yaxis_title="rows")
        figures += [figure, table(["kind", "row", "message"],
                                  [[kind, row, message] for kind, shown in examples.items() for row, message in shown])]  # fmt: skip
    else:
        figures.append("<p>none</p>")
    manifest = [
        ("input", spec.input_path), ("pipeline", spec.pipeline_path or spec.pipeline.name),
        ("created", spec.created_at), ("chunk size", spec.chunk_size), ("out", spec.out_dir),
        ("limits given", spec.limits.model_dump()), ("hosts", ", ".join(store.hosts(spec.job_id))),
    ]  # fmt: skip
    shown_pace = [("latency ms", pace.latency_ms), ("rows/s", pace.rows_per_s), ("output tokens/s", pace.output_tokens_per_s)]
    figures += ["<h2>Manifest</h2>", table(["", ""], manifest), "<h2>Pace</h2>", table(["", ""], shown_pace)]
    write_page(path, f"promptmill job {spec.job_id}", figures)
    return {"report": str(path), "verify": "ok" if verdict.ok else "mismatch", "failures": dict(failures)}
