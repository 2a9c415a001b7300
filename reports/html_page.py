"""One self-contained HTML file of tables and plotly figures: plotly's script is written into it once,
so it opens offline (compare.html, report.html)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go

from promptmill.jobs.files import atomic_write

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
"""


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return html.escape(", ".join(f"{key} {count}" for key, count in value.items())) or "–"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"
    return html.escape(str(value))


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    header = "".join(f"<th>{html.escape(title)}</th>" for title in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def write_page(path: Path, title: str, parts: Sequence[str | go.Figure]) -> None:
    """The parts in order: HTML text, or a figure (the first carries plotly's script)."""
    rendered, script_written = [], False
    for part in parts:
        if isinstance(part, go.Figure):
            rendered.append(
                part.to_html(full_html=False, include_plotlyjs=not script_written, default_width="100%",
                             default_height="420px")  # fmt: skip
            )
            script_written = True
        else:
            rendered.append(part)
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(rendered) + "\n</body></html>\n"
    )
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(page)
