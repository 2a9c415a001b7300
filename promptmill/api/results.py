"""`pm.Results`: a finished job's records, read from its exported results file, as records or as a
table (Arrow, pandas, polars, Hugging Face datasets) beside the input's own columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import orjson
from pydantic import BaseModel

from promptmill.api.data import STAGED_COLUMNS, need
from promptmill.jobs.ledger import row_costs
from promptmill.jobs.readers import iter_rows
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.tabular import OUTPUT_PREFIX, output_fields
from promptmill.pipelines.items import Usage

#: The columns a results table adds after the input's, in this order (then a structured output's fields).
RESULT_COLUMNS = ("output", "status", "error", "model", "attempts", "usage", "cost_usd")


class Results:
    """A job's records, one per input row, in input order.

    >>> results = pm.run(df, pipeline)          # doctest: +SKIP
    >>> results.to_pandas()[["text", "output", "cost_usd"]]   # doctest: +SKIP
    >>> [r["output"] for r in results if r["status"] == "ok"]  # doctest: +SKIP
    """

    def __init__(self, spec: JobSpec, status: str, cost: dict[str, Any], path: Path, output_model: type[BaseModel] | None = None):
        self.job_id = spec.job_id
        self.status = status  #: the job's state: complete, or where it stopped
        self.spec = spec
        self.path = path  #: the exported results.jsonl
        self._cost = cost
        self._output_model = output_model

    def __repr__(self) -> str:
        return f"<Results job={self.job_id} {self.status} rows={len(self)} cost=${self._cost['cost_usd']:.6f}>"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Each row's record, as `results.jsonl` holds it."""
        with self.path.open("rb") as handle:
            for line in handle:
                yield orjson.loads(line)

    def __len__(self) -> int:
        with self.path.open("rb") as handle:
            return sum(1 for _ in handle)

    def cost(self) -> dict[str, Any]:
        """What the job cost, by model, as `promptmill cost JOB --json` prints it."""
        return self._cost

    def failed(self) -> list[dict[str, Any]]:
        """The records of the rows that failed, with their reasons."""
        return [record for record in self if record["status"] == "failed"]

    def outputs(self) -> Iterator[BaseModel | None]:
        """Each row's output as an instance of the pipeline's Pydantic model (None for a failed row)."""
        if self._output_model is None:
            raise TypeError("outputs(): the pipeline's output is no Pydantic model; iterate the records instead")
        for record in self:
            yield None if record["status"] != "ok" else self._output_model.model_validate(record["output"])

    def to_arrow(self) -> Any:
        """A pyarrow Table: the input's columns, then output, status, error, model, attempts, usage and
        cost_usd, then one column per top-level field of a structured output (`output.FIELD`)."""
        import pyarrow as pa

        records = list(self)
        table = _input_table(self.spec, len(records))
        taken = set(table.column_names)
        rename = {name: f"input.{name}" for name in taken if name in RESULT_COLUMNS}
        if rename:
            table = table.rename_columns([rename.get(name, name) for name in table.column_names])
        prices = self.spec.pipeline.price_table(_settings())
        structured = self.spec.pipeline.output.type == "json"
        columns: dict[str, Any] = {
            "output": pa.array([_json_or_none(r["output"]) if structured else r["output"] for r in records], pa.string()),
            "status": pa.array([r["status"] for r in records], pa.string()),
            "error": pa.array([_error(r) for r in records], pa.string()),
            "model": pa.array([r["model"] for r in records], pa.string()),
            "attempts": pa.array([r["attempts"] for r in records], pa.int64()),
            "usage": pa.array([r["usage"] for r in records], pa.struct([(n, pa.int64()) for n in Usage.model_fields])),
            "cost_usd": pa.array([float(cost) for cost in row_costs(self.spec, prices, records)], pa.float64()),
        }
        for name, kind in output_fields(self.spec).items():
            values = [(r["output"] or {}).get(name) if isinstance(r["output"], dict) else None for r in records]
            columns[OUTPUT_PREFIX + name] = _typed(pa, values, kind)
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table

    def to_pandas(self) -> Any:
        """A pandas DataFrame (`promptmill[pandas]`), as `to_arrow` lays it out."""
        need("pandas", "pandas")
        return self.to_arrow().to_pandas()

    def to_polars(self) -> Any:
        """A polars DataFrame (`promptmill[polars]`), as `to_arrow` lays it out."""
        polars = need("polars", "polars")
        return polars.from_arrow(self.to_arrow())

    def to_hf(self) -> Any:
        """A Hugging Face `datasets.Dataset` (`promptmill[hf]`), as `to_arrow` lays it out."""
        datasets = need("datasets", "hf")
        return datasets.Dataset(self.to_arrow())


def _input_table(spec: JobSpec, rows: int) -> Any:
    """The input's own columns (not those staging added), one row per record."""
    import pyarrow as pa

    path = Path(spec.input_path)
    if not path.exists():
        return pa.table({"row": pa.array(range(rows), pa.int64())})
    if spec.input_format == "parquet":
        import pyarrow.parquet as pq

        names = [name for name in pq.ParquetFile(path).schema_arrow.names if name not in STAGED_COLUMNS]
        return pq.read_table(path, columns=names)
    if spec.input_format == "csv":
        import pyarrow.csv as pacsv

        try:  # typed as a DataFrame reader types it (ints, floats, dates), not all text
            table = pacsv.read_csv(path)
            if table.num_rows == rows:
                return table.drop_columns([name for name in table.column_names if name in STAGED_COLUMNS])
        except pa.ArrowInvalid:
            pass  # a row the reader takes apart differently: as the job's own reader read it
    values = [row if isinstance(row, dict) else {} for _, _, row in iter_rows(path, spec.input_format)]
    names = list(dict.fromkeys(name for row in values for name in row if name not in STAGED_COLUMNS))
    columns = {}
    for name in names:
        column = [row.get(name) for row in values]
        try:
            columns[name] = pa.array(column)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed kinds: kept as JSON text
            columns[name] = pa.array([_json_or_none(value) for value in column], pa.string())
    return pa.table(columns) if names else pa.table({"row": pa.array(range(rows), pa.int64())})


def _typed(pa: Any, values: list[Any], kind: str) -> Any:
    if kind == "json":
        return pa.array([_json_or_none(value) for value in values], pa.string())
    arrow_type = getattr(pa, kind)()
    fitted = []
    for value in values:
        try:
            pa.scalar(value, type=arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            value = None  # a model's "12" for an integer field: left empty, as export does
        fitted.append(value)
    return pa.array(fitted, arrow_type)


def _error(record: dict[str, Any]) -> str | None:
    error = record.get("error")
    return None if not error else f"{error['kind']}: {error['message']}"


def _json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _settings() -> Any:
    from promptmill.config.settings import get_settings

    return get_settings()
