"""One HTML file of tables and plotly figures (compare.html, report.html) that opens offline: plotly's
script (4.6 MB) is written once beside it as `plotly-VERSION.min.js` and shared by every page in that
folder, so a page itself weighs what its figures do."""

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


def plotly_bundle(folder: Path) -> str:
    """plotly's script beside the pages of `folder` (written once per version); its file name."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    name = f"plotly-{get_plotlyjs_version()}.min.js"
    if not (folder / name).exists():
        with atomic_write(folder / name, "w", encoding="utf-8") as handle:
            handle.write(get_plotlyjs())
    return name


def write_page(path: Path, title: str, parts: Sequence[str | go.Figure]) -> None:
    """The parts in order: HTML text, or a figure (the first loads plotly's shared script)."""
    rendered, script_written = [], False
    for part in parts:
        if isinstance(part, go.Figure):
            script = plotly_bundle(path.parent) if not script_written else False
            rendered.append(
                part.to_html(full_html=False, include_plotlyjs=script, default_width="100%", default_height="420px")
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
