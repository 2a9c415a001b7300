"""The viewer's pages: the jobs, a job, its rows and one row, the compares. Each live part is a
fragment of its page that the page's script reads again every second or so. Every handler is a plain
function, which Starlette runs in a worker thread: a slow one (a report, a rows index being built)
never holds up the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from promptmill.api.comparing import read_compare
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState
from promptmill.reports.compare.page import compare_parts
from promptmill.reports.compare.plan import CompareError
from promptmill.reports.rows import KINDS, SORTS, RowQuery
from promptmill.reports.status import eta_text, job_list, job_status
from promptmill.web.guard import csrf_value
from promptmill.web.state import ViewerState

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PAGE_ROWS = 50


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:,.2f}" if value >= 1 else f"${value:.6f}".rstrip("0").rstrip(".") if value else "$0"


templates.env.filters.update(
    usd=_usd, duration=lambda s: "–" if s is None else eta_text(s),
    num=lambda n: "–" if n is None else f"{n:,}", pct=lambda f: "–" if f is None else f"{f:.0%}",
    # JSON to read, escaped as any text is (Jinja's tojson writes <, > and & as \u escapes, for scripts).
    json=lambda value, indent=False: orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2 if indent else 0).decode(),
)


def viewer_of(request: Request) -> ViewerState:
    return request.app.state.viewer


def _render(request: Request, name: str, **context: Any) -> HTMLResponse:
    viewer = viewer_of(request)
    return templates.TemplateResponse(request, name, {"csrf": csrf_value(viewer.token), **context})


def spec_of(request: Request) -> JobSpec:
    job_id = request.path_params["job_id"]
    store = viewer_of(request).store
    if not store.exists(job_id):
        raise HTTPException(404, f"no job {job_id} in this Redis")
    return store.spec(job_id)


def _jobs(request: Request) -> list[dict]:
    viewer = viewer_of(request)
    return list(reversed(job_list(viewer.store, viewer.prices)))  # newest first


def jobs_page(request: Request) -> Response:
    return _render(request, "jobs.html", jobs=_jobs(request), compares=viewer_of(request).compares())


def jobs_fragment(request: Request) -> Response:
    return _render(request, "_jobs_table.html", jobs=_jobs(request))


def _status(request: Request, spec: JobSpec) -> dict:
    viewer = viewer_of(request)
    return job_status(spec, viewer.store.status(spec.job_id), viewer.prices(spec), viewer.store)


def job_page(request: Request) -> Response:
    spec = spec_of(request)
    return _render(request, "job.html", spec=spec, info=_status(request, spec), states=JobState)


def job_fragment(request: Request) -> Response:
    spec = spec_of(request)
    return _render(request, "_job_live.html", spec=spec, info=_status(request, spec))


def job_plots(request: Request) -> Response:
    """The report's plots and tables, as `report` draws them (read again every 20 s)."""
    parts, shown = viewer_of(request).report(spec_of(request))
    return _render(request, "_parts.html", parts=parts, verdict=shown)


def _query(request: Request) -> RowQuery:
    asked = request.query_params

    def chosen(name: str, allowed: list[str] | tuple[str, ...] | None = None) -> str | None:
        value = asked.get(name) or None
        return value if value is None or allowed is None or value in allowed else None

    attempts = asked.get("attempts", "")
    page = asked.get("page", "1")
    return RowQuery(
        status=chosen("status", ("ok", "failed")),  # type: ignore[arg-type]
        model=chosen("model"), error_kind=chosen("kind", KINDS),
        min_attempts=int(attempts) if attempts.isdigit() else None, search=chosen("q"),
        sort=chosen("sort", SORTS) or "row", descending=asked.get("order") == "desc",  # type: ignore[arg-type]
        offset=(max(int(page), 1) - 1) * PAGE_ROWS if page.isdigit() else 0, limit=PAGE_ROWS,
    )  # fmt: skip


def rows_page(request: Request) -> Response:
    spec = spec_of(request)
    index = viewer_of(request).rows(spec)
    query = _query(request)
    found = index.page(query)
    if query.in_input_order:
        index.warm()  # a filter chosen next finds the index built, or well on its way
    asked = {key: value for key, value in request.query_params.items() if key != "page" and value}
    models = list(dict.fromkeys(link.model for link in spec.links()))  # the job's model and its fallbacks
    return _render(request, "rows.html", spec=spec, page=found, query=query, asked=asked, kinds=KINDS, models=models,
                   sorts=SORTS, page_rows=PAGE_ROWS, number=query.offset // PAGE_ROWS + 1)  # fmt: skip


def row_page(request: Request) -> Response:
    spec = spec_of(request)
    number = request.path_params["row"]
    record = viewer_of(request).rows(spec).row(number)
    if record is None:
        raise HTTPException(404, f"row {number} of job {spec.job_id} has no outcome yet")
    return _render(request, "row.html", spec=spec, record=record)


def compare_page(request: Request) -> Response:
    viewer = viewer_of(request)
    folder = viewer.compares().get(request.path_params["key"])
    if folder is None:
        raise HTTPException(404, "no such compare among this Redis's jobs")
    try:
        title, scores, notes, disagreeing = read_compare(folder)
    except CompareError as bad:
        raise HTTPException(409, str(bad)) from None
    return _render(request, "compare.html", title=title, parts=viewer.figures(compare_parts(scores, notes)),
                   names=[score.name for score in scores], disagreeing=disagreeing[:200],
                   disagree_count=len(disagreeing))  # fmt: skip
