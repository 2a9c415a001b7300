"""`report.html`: a job's story in plots, from Redis and its shards, so any machine can write it for a
finished job: rows done over time, the pace against the limit in force, latency, tokens and cost by
model, failures by kind with examples; then the manifest, the totals and `verify`'s verdict."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import plotly.graph_objects as go

from promptmill.config.prices import PriceTable
from promptmill.reports.answers import AnswerTally
from promptmill.reports.html_page import table, write_page
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.state.pace import EDGES_MS, job_pace
from promptmill.jobs.shards import iter_outcomes
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.verify import verify_job

_EXAMPLES = 3  # failures shown per kind


def _when(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _rows_over_time(over_time: list[tuple[int, int, int]], total: int) -> go.Figure:
    figure = go.Figure(go.Scatter(x=[_when(t + width) for t, _, width in over_time], y=[done for _, done, _ in over_time],
                                  mode="lines+markers", name="rows done"))  # fmt: skip
    figure.update_layout(title=f"Rows done over time (of {total:,})", yaxis_title="rows", xaxis_title="UTC")
    return figure


def _rows_per_second(over_time: list[tuple[int, int, int]]) -> go.Figure:
    """The pace of a job with no limiter (the local engine): rows per second, by slot."""
    per_slot = [(t, done - (over_time[i - 1][1] if i else 0), width) for i, (t, done, width) in enumerate(over_time)]
    figure = go.Figure(go.Bar(x=[_when(t) for t, _, _ in per_slot], y=[n / width for _, n, width in per_slot],
                              name="rows/s"))  # fmt: skip
    figure.update_layout(title="Rows per second, by 10-second slot (older ones rolled up into wider slots)", yaxis_title="rows/s", xaxis_title="UTC")
    return figure


def _requests_against_limit(slots: list[tuple], limits: dict | None) -> go.Figure:
    """Requests per second by slot, the limit in force as a line, and the slots with 429s, server
    errors and requests the limiter held (its pace, a 429's pause, an open breaker) marked."""
    when = [_when(slot[0]) for slot in slots]
    rate = [slot[1] / slot[6] for slot in slots]
    figure = go.Figure(go.Bar(x=when, y=rate, name="requests/s"))
    if any(slot[5] for slot in slots):
        figure.add_trace(go.Scatter(x=when, y=[slot[5] / 60 if slot[5] else None for slot in slots], name="limit in force",
                                    mode="lines", line={"dash": "dash", "shape": "hv"}))  # fmt: skip
    for index, name, symbol in ((2, "429", "x"), (3, "server errors", "triangle-down"), (4, "held ≥1 s by the limiter", "circle-open")):
        marked = [(w, r, slot[index]) for w, r, slot in zip(when, rate, slots) if slot[index]]
        if marked:
            figure.add_trace(go.Scatter(x=[m[0] for m in marked], y=[m[1] for m in marked], mode="markers", name=name,
                                        marker={"symbol": symbol, "size": 11}, text=[f"{m[2]:,} {name}" for m in marked]))  # fmt: skip
    title = "Requests per second against the limit in force, by 10-second slot (older ones rolled up)"
    if limits:
        title += f" ({limits['rate_limited']:,} answers were 429, {limits['breaker_trips']:,} breaker pauses)"
    figure.update_layout(title=title, yaxis_title="requests/s", xaxis_title="UTC")
    return figure


def _distribution(counts: dict[int, int], title: str) -> go.Figure:
    buckets = sorted(counts)
    figure = go.Figure(go.Bar(x=[f"≤{EDGES_MS[min(b, len(EDGES_MS) - 1)]:,.0f}" for b in buckets],
                              y=[counts[b] for b in buckets]))  # fmt: skip
    figure.update_layout(title=title, xaxis_title="ms", yaxis_title="rows")
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
    parts, shown = report_parts(store, spec, prices)
    write_page(path, f"promptmill job {spec.job_id}", parts)
    return {"report": str(path), **shown}


def report_parts(store: JobStore, spec: JobSpec, prices: PriceTable) -> tuple[list[str | go.Figure], dict]:
    """The report's parts in order (HTML text and figures: the live viewer's job page shows them too),
    and its verdict and failures by kind."""
    status = store.status(spec.job_id)
    report = cost_report(spec, status, prices)
    pace = job_pace(store.redis, spec.job_id, status.pending)
    limits = None if status.limit_scope is None else store.limits.summary(status.limit_scope, spec.limits)
    failures: Counter = Counter()
    examples: dict[str, list[tuple[int, str]]] = {}
    answers = AnswerTally(spec.pipeline.output.type)
    for outcome in iter_outcomes(store, spec):
        answers.add(outcome)
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
        figures.append(_rows_over_time(pace.rows_over_time, status.total))
    if pace.requests_over_time:
        figures.append(_requests_against_limit(pace.requests_over_time, limits))
    elif pace.rows_over_time:
        figures.append(_rows_per_second(pace.rows_over_time))
    if pace.latency_counts:
        figures.append(_distribution(pace.latency_counts, "Latency of answered rows (whole requests)"))
    if pace.ttft_counts:
        figures.append(_distribution(pace.ttft_counts, "Time to first token of answered rows"))
    if report.models:
        figures.append(_by_model(report.models))
    figures += answers.parts()
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
    shown_pace = [("latency ms", pace.latency_ms), ("time to first token ms", pace.ttft_ms or "not measured"),
                  ("rows/s", pace.rows_per_s), ("output tokens/s", pace.output_tokens_per_s)]  # fmt: skip
    figures += ["<h2>Manifest</h2>", table(["", ""], manifest), "<h2>Pace</h2>", table(["", ""], shown_pace)]
    return figures, {"verify": "ok" if verdict.ok else "mismatch", "problems": verdict.problems,
                     "failures": dict(failures)}  # fmt: skip
