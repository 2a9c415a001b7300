"""What the viewer holds while it serves: the job store, its token, each job's price table and rows
index, and the compares its jobs belong to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from markupsafe import Markup

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.reports.compare.plan import PLAN_FILE, SAMPLE_FILE
from promptmill.reports.report import report_parts
from promptmill.reports.rows import RowIndex


@dataclass
class Figure:
    """A plotly figure as data: the page's script draws it (no inline script on any page)."""

    json: str


@dataclass
class ViewerState:
    settings: Settings
    store: JobStore
    token: str
    _prices: dict[str, PriceTable] = field(default_factory=dict)
    _rows: dict[str, RowIndex] = field(default_factory=dict)
    _reports: dict[str, tuple[tuple, list, dict]] = field(default_factory=dict)

    def prices(self, spec: JobSpec) -> PriceTable:
        if spec.job_id not in self._prices:
            self._prices[spec.job_id] = spec.pipeline.price_table(self.settings)
        return self._prices[spec.job_id]

    def rows(self, spec: JobSpec) -> RowIndex:
        """The job's rows index, kept while the viewer runs (a flushed chunk is indexed once)."""
        index = self._rows.get(spec.job_id)
        if index is None or index.spec.created_at != spec.created_at:
            index = self._rows[spec.job_id] = RowIndex(self.store, spec, self.prices(spec))
        return index

    def report(self, spec: JobSpec) -> tuple[list[Markup | Figure], dict]:
        """The report's parts and verdict for the job page. A stopped job's are kept while it stays as
        it is: the report reads every outcome, which the page would otherwise redo every 20 s."""
        status = self.store.status(spec.job_id)
        asked = (status.state, status.terminal, spec.created_at)
        kept = self._reports.get(spec.job_id)
        if kept is not None and kept[0] == asked:
            return kept[1], kept[2]
        parts, shown = report_parts(self.store, spec, self.prices(spec))
        figures = self.figures(parts)
        if not status.state.runnable:
            self._reports[spec.job_id] = (asked, figures, shown)
        return figures, shown

    def compares(self) -> dict[str, Path]:
        """The compares whose contenders' jobs are in this Redis, by a short key of their folder."""
        found: dict[str, Path] = {}
        for job_id in self.store.job_ids():
            try:
                folder = compare_folder(self.store.spec(job_id))
            except KeyError:
                continue
            if folder is not None:
                found[hashlib.sha256(str(folder).encode()).hexdigest()[:12]] = folder
        return found

    @staticmethod
    def figures(parts: list[str | go.Figure]) -> list[Markup | Figure]:
        """A report's parts for a template: its HTML (built escaped by reports/) and its figures."""
        return [Figure(part.to_json()) if isinstance(part, go.Figure) else Markup(part) for part in parts]


def compare_folder(spec: JobSpec) -> Path | None:
    """The compare a job is a contender of (its input is a compare's sample, beside its plan)."""
    source = Path(spec.input_path)
    return source.parent if source.name == SAMPLE_FILE and (source.parent / PLAN_FILE).exists() else None


