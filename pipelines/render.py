"""Turns one input row into the text of its request."""

from __future__ import annotations

from string import Formatter
from typing import Any, Mapping

from pipelines.items import RenderedRequest
from pipelines.spec import Pipeline


class RenderError(ValueError):
    pass


def render_request(pipeline: Pipeline, row_number: int, row: Mapping[str, Any]) -> RenderedRequest:
    # Each placeholder is looked up as a whole column name, never as an attribute or index path, so
    # a template cannot reach into Python objects.
    parts: list[str] = []
    for literal, field, spec, conversion in Formatter().parse(pipeline.prompt):
        parts.append(literal)
        if field is None:
            continue
        if field not in row:
            raise RenderError(f"row has no column {field!r} (columns: {', '.join(map(str, row)) or 'none'})")
        value = row[field]
        if value is None:
            raise RenderError(f"column {field!r} is empty (null)")
        if conversion == "r":
            value = repr(value)
        try:
            parts.append(format(value, spec or ""))
        except (TypeError, ValueError) as bad:
            raise RenderError(f"column {field!r}: cannot format {value!r} with {spec!r}: {bad}") from None
    return RenderedRequest(row=row_number, prompt="".join(parts))
