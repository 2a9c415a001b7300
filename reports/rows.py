"""The rows browser's data: a job's committed outcomes (its shards, and what is still in Redis) to
filter, search, sort and page through, and one row's whole story.

A page in input order is read straight from the one or two chunks that hold it, whatever the job's
size. Filters and sorts read a compact index of every committed row (a few numbers each, built once
per flushed chunk: a flushed shard never changes), beside the chunks still in Redis, read afresh.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from promptmill.config.prices import PriceTable
from promptmill.config.settings import get_settings
from promptmill.jobs.ledger import row_costs
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.shards import ShardError, shard_lines
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind, Usage

SortKey = Literal["row", "latency", "cost"]
SORTS: tuple[str, ...] = ("row", "latency", "cost")
KINDS = [kind.value for kind in ErrorKind]
_COLUMNS = ("row", "failed", "model", "kind", "attempts", "latency", "cost", "chunk", "line")


@dataclass
class RowQuery:
    status: Literal["ok", "failed"] | None = None
    model: str | None = None
    error_kind: str | None = None
    min_attempts: int | None = None
    search: str | None = None  #: in the answer, the parsed output and the errors (case-insensitive)
    sort: SortKey = "row"
    descending: bool = False
    offset: int = 0
    limit: int = 50

    @property
    def in_input_order(self) -> bool:
        return self == RowQuery(offset=self.offset, limit=self.limit)


@dataclass
class RowPage:
    rows: list[dict[str, Any]]  #: each row's record, with its `cost_usd`
    matched: int  #: rows matching the query among the committed ones
    committed: int  #: rows with an outcome


class RowIndex:
    """One job's committed rows; `page(query)` answers the browser. Safe to share between threads."""

    def __init__(self, store: JobStore, spec: JobSpec, prices: PriceTable):
        self.store, self.spec, self.prices = store, spec, prices
        self.models: list[str] = []
        self._chunks: dict[str, dict[str, np.ndarray]] = {}  # flushed chunk -> its columns
        self._stacked: dict[str, np.ndarray] | None = None
        self._units: dict[tuple[str, str | None], np.ndarray] = {}
        self._searched: dict[tuple[str, str], np.ndarray] = {}  # (needle, chunk) -> its matching rows
        self._lock = threading.Lock()
        self._warming = False

    # -- reading chunks ---------------------------------------------------------------------------

    def _layout(self) -> tuple[list[str], set[str]]:
        return self.store.chunks.ids(self.spec.job_id), self.store.chunks.flushed(self.spec.job_id)

    def _lines(self, chunk_id: str, flushed: bool) -> list[bytes]:
        """A chunk's outcomes as JSON lines in row order: its shard's, or Redis's so far."""
        if flushed:
            return shard_lines(self.spec, chunk_id)
        raw = self.store.redis.hvals(JobKeys(self.spec.job_id).results(chunk_id))
        return sorted(raw, key=lambda line: orjson.loads(line)["row"])

    def _records(self, lines: list[bytes]) -> list[dict[str, Any]]:
        """The rows' records as the browser shows them: with what each one cost."""
        records = [orjson.loads(line) for line in lines]
        for record, cost in zip(records, row_costs(self.spec, self.prices, records)):
            record["cost_usd"] = float(cost)
        return records

    # -- the index --------------------------------------------------------------------------------

    def _unit_costs(self, model: str, priced_as: str | None) -> np.ndarray:
        """USD per unit of each Usage field for rows priced so: a row's cost is linear in its usage."""
        key = (model, priced_as)
        if key not in self._units:
            def cost(**usage: int) -> float:
                (priced,) = row_costs(self.spec, self.prices, [{"model": model, "priced_as": priced_as, "usage": usage}])
                return float(priced)

            base = cost(input_tokens=1)
            self._units[key] = np.array(
                [base if name == "input_tokens" else cost(input_tokens=1, **{name: 1_000_000}) / 1e6 - base / 1e6
                 for name in Usage.model_fields]
            )  # fmt: skip
        return self._units[key]

    def _columns(self, lines: list[bytes], chunk: int) -> dict[str, np.ndarray]:
        values: dict[str, list] = {name: [] for name in _COLUMNS}
        for number, line in enumerate(lines):
            record = orjson.loads(line)
            model, usage, error = record.get("model"), record.get("usage") or {}, record.get("error")
            if model is not None and model not in self.models:
                self.models.append(model)
            answered = usage.get("input_tokens") or usage.get("output_tokens")
            counts = np.array([usage.get(name, 0) for name in Usage.model_fields], dtype=float)
            cost = float(counts @ self._unit_costs(model, record.get("priced_as"))) if model and answered else 0.0
            latency = record.get("latency_ms")
            for name, value in (
                ("row", record["row"]), ("failed", record["status"] != "ok"),
                ("model", -1 if model is None else self.models.index(model)),
                ("kind", -1 if error is None else KINDS.index(error["kind"])), ("attempts", record.get("attempts", 0)),
                ("latency", np.nan if latency is None else latency), ("cost", cost), ("chunk", chunk), ("line", number),
            ):  # fmt: skip
                values[name].append(value)
        types = {"row": np.int64, "failed": bool, "model": np.int16, "kind": np.int16, "attempts": np.int32,
                 "latency": float, "cost": float, "chunk": np.int32, "line": np.int32}  # fmt: skip
        return {name: np.array(values[name], dtype=types[name]) for name in _COLUMNS}

    def refresh(self) -> tuple[list[str], set[str], dict[str, np.ndarray]]:
        """Index the chunks flushed since the last call; returns the layout and every committed row's
        columns (the unflushed chunks' read now)."""
        with self._lock:
            ids, flushed = self._layout()
            fresh = [chunk_id for chunk_id in ids if chunk_id in flushed and chunk_id not in self._chunks]
            position = {chunk_id: i for i, chunk_id in enumerate(ids)}
            for chunk_id in fresh:
                self._chunks[chunk_id] = self._columns(shard_lines(self.spec, chunk_id), position[chunk_id])
            if fresh or self._stacked is None:
                parts = [self._chunks[c] for c in ids if c in self._chunks]
                self._stacked = {name: np.concatenate([p[name] for p in parts]) if parts else np.array([])
                                 for name in _COLUMNS}  # fmt: skip
            live = [self._columns(self._lines(c, False), position[c]) for c in ids if c not in flushed]
            columns = self._stacked
            if live:
                columns = {name: np.concatenate([columns[name], *(part[name] for part in live)]) for name in _COLUMNS}
            return ids, flushed, columns

    def warm(self) -> None:
        """Build the index in the background, once (the rows page's first visit starts it)."""
        if self._warming:
            return
        self._warming = True
        threading.Thread(target=self.refresh, daemon=True, name=f"index-{self.spec.job_id}").start()

    def _matching(self, needle: str, ids: list[str], flushed: set[str], chunks: np.ndarray) -> np.ndarray:
        """The rows whose record holds `needle`: a flushed chunk is searched once per needle."""
        wanted = needle.lower().encode()
        found = []
        for position in np.unique(chunks):
            chunk_id = ids[position]
            key = (needle, chunk_id)
            if key in self._searched:
                found.append(self._searched[key])
                continue
            rows = np.array([orjson.loads(line)["row"] for line in self._lines(chunk_id, chunk_id in flushed)
                             if wanted in line.lower()], dtype=np.int64)  # fmt: skip
            if chunk_id in flushed:
                self._searched[key] = rows
            found.append(rows)
        return np.concatenate(found) if found else np.array([], dtype=np.int64)

    # -- pages ------------------------------------------------------------------------------------

    def page(self, query: RowQuery) -> RowPage:
        if query.in_input_order:
            return self._input_order_page(query.offset, query.limit)
        ids, flushed, columns = self.refresh()
        mask = np.ones(len(columns["row"]), dtype=bool)
        if query.status is not None:
            mask &= columns["failed"] == (query.status == "failed")
        if query.model is not None:
            mask &= columns["model"] == (self.models.index(query.model) if query.model in self.models else -2)
        if query.error_kind is not None:
            mask &= columns["kind"] == (KINDS.index(query.error_kind) if query.error_kind in KINDS else -2)
        if query.min_attempts is not None:
            mask &= columns["attempts"] >= query.min_attempts
        if query.search:
            mask &= np.isin(columns["row"], self._matching(query.search, ids, flushed, columns["chunk"][mask]))
        chosen = np.flatnonzero(mask)
        if query.sort == "row":
            order = np.argsort(columns["row"][chosen], kind="stable")
        else:  # rows without a latency (never answered) go last either way
            values = columns["latency" if query.sort == "latency" else "cost"][chosen]
            values = np.where(np.isnan(values), -np.inf if query.descending else np.inf, values)
            order = np.lexsort((columns["row"][chosen], -values if query.descending else values))
        if query.sort == "row" and query.descending:
            order = order[::-1]
        shown = chosen[order[query.offset : query.offset + query.limit]]
        wanted: dict[int, list[int]] = {}
        for index in shown:
            wanted.setdefault(int(columns["chunk"][index]), []).append(int(columns["line"][index]))
        lines: dict[tuple[int, int], bytes] = {}
        for chunk, numbers in wanted.items():
            chunk_lines = self._lines(ids[chunk], ids[chunk] in flushed)
            lines.update({(chunk, n): chunk_lines[n] for n in numbers if n < len(chunk_lines)})
        keys = [(int(columns["chunk"][i]), int(columns["line"][i])) for i in shown]
        rows = self._records([lines[key] for key in keys if key in lines])
        return RowPage(rows, len(chosen), len(columns["row"]))

    def _input_order_page(self, offset: int, limit: int) -> RowPage:
        """Rows in input order without the index: each flushed chunk's row count is known, so only the
        chunks under the page (and those still in Redis, to count theirs) are read."""
        ids, flushed = self._layout()
        counts = {key.decode(): int(value) for key, value in
                  self.store.redis.hgetall(JobKeys(self.spec.job_id).chunk_rows).items()}  # fmt: skip
        live = {chunk_id: self._lines(chunk_id, False) for chunk_id in ids if chunk_id not in flushed}
        rows: list[dict[str, Any]] = []
        seen = 0
        for chunk_id in ids:
            committed = counts.get(chunk_id, 0) if chunk_id in flushed else len(live[chunk_id])
            if len(rows) < limit and seen + committed > offset:
                lines = live[chunk_id] if chunk_id not in flushed else shard_lines(self.spec, chunk_id)
                start = max(offset - seen, 0)
                rows += self._records(lines[start : start + limit - len(rows)])
            seen += committed
        return RowPage(rows, seen, seen)

    # -- one row ----------------------------------------------------------------------------------

    def row(self, number: int) -> dict[str, Any] | None:
        """A row's record with its cost, its input and (as the pipeline's `store_text` allows) the
        prompt it rendered to; None while it has no outcome."""
        ids, flushed = self._layout()
        starts = [int(chunk_id) for chunk_id in ids]
        at = bisect.bisect_right(starts, number) - 1
        if at < 0:
            return None
        try:
            lines = self._lines(ids[at], ids[at] in flushed)
        except ShardError:
            return None
        found = next((line for line in lines if orjson.loads(line)["row"] == number), None)
        if found is None:
            return None
        (record,) = self._records([found])
        record["input"], record["prompt"] = self._input(number)
        return record

    def _input(self, number: int) -> tuple[dict[str, Any] | str | None, dict[str, Any] | None]:
        """The row as the input holds it, and its rendered request (system and user turns, and which
        columns' files go with it: what went, by sha256, is the record's own `attachments`)."""
        path = Path(self.spec.input_path)
        if not path.exists():
            return f"{path} is not here", None
        read = iter_rows(path, self.spec.input_format, skip=number, max_row_bytes=self.spec.max_row_bytes)
        _, line, row = next(read, (number, 0, InvalidRow(f"{path} has no row {number} now")))
        if isinstance(row, InvalidRow):
            return row.reason, None
        if not self.spec.pipeline.store_text:
            return row, None
        try:
            request = self.spec.render(number, row, line, get_settings())
        except ValueError as bad:
            return row, {"error": str(bad)}
        return row, {"system": self.spec.pipeline.system, "user": request.prompt,
                     "attachments": [{"column": ref.column, "kind": ref.kind} for ref in request.attachments or []]}  # fmt: skip
