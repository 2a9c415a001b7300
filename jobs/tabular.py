"""A results record as a table's row (CSV, Parquet): the input's carried columns first, then one
column per top-level field of a JSON output beside the output's own JSON text, then the audit
columns. Parquet gets a type per column: ints, floats, booleans, timestamps (UTC) and strings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator

import orjson

from promptmill.jobs.spec import JobSpec
from promptmill.pipelines.items import Usage

# JSON schema's scalar types as Arrow's (pyarrow's factory names); anything else is kept as JSON text.
_ARROW_OF_JSON = {"integer": "int64", "number": "float64", "boolean": "bool_", "string": "string"}
_TIMES = ("started_at", "finished_at")
OUTPUT_PREFIX = "output."


def output_fields(spec: JobSpec) -> dict[str, str]:
    """A JSON output's top-level fields and their Arrow types ('json': nested, kept as JSON text)."""
    output = spec.pipeline.output
    schema = output.json_schema if output.type == "json" else None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    fields = {}
    for name, sub in properties.items():
        kinds = sub.get("type") if isinstance(sub, dict) else None
        kinds = [kinds] if isinstance(kinds, str) else [kind for kind in kinds or [] if kind != "null"]
        fields[name] = _ARROW_OF_JSON.get(kinds[0], "json") if len(kinds) == 1 else "json"
    return fields


class Tabular:
    """How one job's records become flat rows, and the Arrow schema they are written under."""

    def __init__(self, spec: JobSpec):
        self.carried = spec.pipeline.carried_columns
        self.fields = output_fields(spec)

    def flat(self, record: dict[str, Any], typed: bool = False) -> dict[str, Any]:
        """The record as one table row; `typed` (Parquet): timestamps as datetimes, not ISO text."""
        error = record["error"] or {}
        output = record["output"]
        parsed = output if isinstance(output, dict) else {}
        row: dict[str, Any] = {name: record.get(name) for name in self.carried}
        row |= {"row": record["row"], "status": record["status"], "output": _json_text(output)}
        for name, kind in self.fields.items():
            value = parsed.get(name)
            row[OUTPUT_PREFIX + name] = _json_text(value) if kind == "json" else value
        row |= {
            "text": record["text"],
            "error_kind": error.get("kind"),
            "error_message": error.get("message"),
            **record["usage"],
            "finish_reason": record["finish_reason"],
            "attempts": record["attempts"],
            **{name: record[name] for name in ("model", "request_id", *_TIMES, "latency_ms", "ttft_ms")},
            "models_tried": _json_text(record["models_tried"]),
            "errors": orjson.dumps(record["errors"]).decode(),
            "line": record["line"],
            "attachments": _json_text(record.get("attachments")),
        }
        if typed:
            for name in _TIMES:
                if row[name] is not None:
                    row[name] = datetime.fromisoformat(row[name])
        return row

    def arrow_schema(self, pa: Any, first: list[dict[str, Any]]) -> Any:
        """Every column's type; a carried column's is the one its first rows show (text if they
        disagree or hold none)."""
        carried = []
        for name in self.carried:
            try:
                kind = pa.array([row[name] for row in first]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                kind = pa.string()
            carried.append((name, pa.string() if pa.types.is_null(kind) else kind))
        usage = [(name, pa.int64()) for name in Usage.model_fields]
        output = [(OUTPUT_PREFIX + name, getattr(pa, "string" if kind == "json" else kind)()) for name, kind in self.fields.items()]
        return pa.schema(
            [*carried, ("row", pa.int64()), ("status", pa.string()), ("output", pa.string()), *output,
             ("text", pa.string()), ("error_kind", pa.string()), ("error_message", pa.string()), *usage,
             ("finish_reason", pa.string()), ("attempts", pa.int64()), ("model", pa.string()),
             ("request_id", pa.string()), *((name, pa.timestamp("ms", tz="UTC")) for name in _TIMES),
             ("latency_ms", pa.float64()), ("ttft_ms", pa.float64()), ("models_tried", pa.string()),
             ("errors", pa.string()), ("line", pa.int64()), ("attachments", pa.string())]
        )  # fmt: skip


def fitted(pa: Any, schema: Any, carried: list[str], rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rows whose values fit the schema's types: an output field or carried value of another type
    (a model's "12" for an integer field, a column that changes type) is kept as text if the column
    is text, else left empty, rather than failing the export."""
    checked = [field for field in schema if field.name.startswith(OUTPUT_PREFIX) or field.name in carried]
    for row in rows:
        for field in checked:
            value = row.get(field.name)
            if value is None:
                continue
            try:
                pa.scalar(value, type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                row[field.name] = _json_text(value) if pa.types.is_string(field.type) else None
        yield row


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
