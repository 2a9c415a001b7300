"""The answers themselves, for `report.html`: counts per label (a choice output) or per value of each
top-level field (a JSON output), and a sample of rows as the model answered them."""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

import orjson
import plotly.graph_objects as go

from promptmill.pipelines.items import ItemOutcome
from promptmill.reports.html_page import table

SAMPLE_ROWS = 20
TOP_VALUES = 12  # per field: the rest are counted as "other"
_SHOWN_CHARS = 300


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


class AnswerTally:
    """Fed every outcome once (in row order); then the report's parts for the answers."""

    def __init__(self, output_type: str):
        self.output_type = output_type
        self.labels: Counter = Counter()
        self.fields: dict[str, Counter] = {}
        self.sample: list[ItemOutcome] = []

    def add(self, outcome: ItemOutcome) -> None:
        if len(self.sample) < SAMPLE_ROWS:
            self.sample.append(outcome)
        if outcome.status != "ok":
            return
        if self.output_type == "choice":
            self.labels[outcome.output] += 1
        elif self.output_type == "json" and isinstance(outcome.output, dict):
            for name, value in outcome.output.items():
                counted = value if isinstance(value, (str, int, float, bool)) or value is None else _shown(value)
                self.fields.setdefault(name, Counter())[counted] += 1

    def parts(self) -> list[str | go.Figure]:
        parts: list[str | go.Figure] = ["<h2>Answers</h2>"]
        if self.labels:
            figure = go.Figure(go.Bar(x=[str(label) for label in self.labels], y=list(self.labels.values())))
            figure.update_layout(title="Answered rows by label", yaxis_title="rows")
            parts.append(figure)
        for name, counts in self.fields.items():
            top = counts.most_common(TOP_VALUES)
            rest = sum(counts.values()) - sum(count for _, count in top)
            rows = [[_shown(value), count] for value, count in top] + ([["(other values)", rest]] if rest else [])
            parts += [f"<h3>{html.escape(name)}: {len(counts):,} distinct value{'s' if len(counts) > 1 else ''}</h3>", table(["value", "rows"], rows)]
        sample = [[o.row, o.status, _shown(o.output) if o.output is not None else None,
                   o.error.message[:_SHOWN_CHARS] if o.error else None] for o in self.sample]  # fmt: skip
        parts += [f"<h3>The first {len(sample)} rows</h3>", table(["row", "status", "output", "error"], sample)]
        return parts
