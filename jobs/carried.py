"""The input's own columns carried into the results (the pipeline's `id_column` and `keep_columns`):
read from the input again as the records stream out in row order, so Redis and the shards never hold
them, and a job's records join back to its input by the input's own id."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from promptmill.jobs.readers import iter_rows
from promptmill.jobs.spec import JobSpec


def with_carried(spec: JobSpec, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each record (in row order) with the carried columns first, under their own names; a row that
    could not be read, or an input no longer here, carries nulls."""
    names = spec.pipeline.carried_columns
    path = Path(spec.input_path)
    if not names:
        yield from records
        return
    rows = iter_rows(path, spec.input_format, max_row_bytes=spec.max_row_bytes) if path.exists() else iter(())
    number, row = -1, None
    for record in records:
        while number < record["row"]:
            number, _, row = next(rows, (float("inf"), 0, None))
        values = row if number == record["row"] and isinstance(row, dict) else {}
        yield {**{name: values.get(name) for name in names}, **record}
