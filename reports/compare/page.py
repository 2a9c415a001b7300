"""`compare.html`: the contenders' table, cost against quality, latencies and confusion tables, in one
file that opens offline (reports/html_page.py)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

from promptmill.reports.compare.score import Score
from promptmill.reports.html_page import table, write_page

_COLUMNS = [
    ("contender", "name"),
    ("rows", "rows"),
    ("ok", "ok"),
    ("failed", "failed"),
    ("failures", "failures"),
    ("latency p50 ms", "latency_ms_p50"),
    ("latency p95 ms", "latency_ms_p95"),
    ("output tokens/s", "output_tokens_per_s"),
    ("cost USD", "cost_usd"),
    ("USD / 1,000 rows", "cost_per_1000_rows_usd"),
    ("accuracy", "accuracy"),
    ("agreement", "agreement"),
]


def _table(scores: list[Score]) -> str:
    return table([title for title, _ in _COLUMNS], [[score.as_dict()[key] for _, key in _COLUMNS] for score in scores])


def _confusions(scores: list[Score]) -> str:
    parts = []
    for score in scores[1:]:
        if not score.confusion:
            continue
        answers = sorted({answer for counts in score.confusion.values() for answer in counts})
        head = "".join(f"<th>{html.escape(answer)}</th>" for answer in answers)
        body = "".join(
            f"<tr><th>{html.escape(first)}</th>"
            + "".join(f"<td>{counts.get(answer, 0)}</td>" for answer in answers)
            + "</tr>"
            for first, counts in score.confusion.items()
        )
        parts.append(
            f"<h3>{html.escape(scores[0].name)} (rows) against {html.escape(score.name)} (columns)</h3>"
            f"<table><tr><th></th>{head}</tr>{body}</table>"
        )
    return "".join(parts)


def _cost_against_quality(scores: list[Score]) -> go.Figure:
    by_accuracy = any(score.accuracy is not None for score in scores)
    quality = "accuracy" if by_accuracy else "agreement"
    figure = go.Figure(
        go.Scatter(
            x=[score.cost_per_1000_rows_usd for score in scores],
            y=[getattr(score, quality) for score in scores],
            text=[score.name for score in scores],
            mode="markers+text",
            textposition="top center",
            marker={"size": 12},
        )
    )
    figure.update_layout(
        title=f"Cost against {quality}" + ("" if by_accuracy else " with the first contender (no --label)"),
        xaxis_title="USD per 1,000 rows",
        yaxis_title=quality,
        yaxis_range=[0, 1.05],
    )
    return figure


def _latencies(scores: list[Score]) -> go.Figure:
    figure = go.Figure([go.Box(y=score.latencies_ms, name=score.name, boxpoints="outliers") for score in scores])
    figure.update_layout(title="Latency of answered rows", yaxis_title="ms", showlegend=False)
    return figure


def compare_parts(scores: list[Score], notes: list[str]) -> list[str | go.Figure]:
    """The page's parts in order (the live viewer's compare page shows them too)."""
    return [_table(scores), *(f"<p>{html.escape(note)}</p>" for note in notes), _cost_against_quality(scores),
            _latencies(scores), _confusions(scores)]  # fmt: skip


def write_compare_page(path: Path, title: str, scores: list[Score], notes: list[str]) -> None:
    write_page(path, title, compare_parts(scores, notes))
