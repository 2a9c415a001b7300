"""`promptmill jobs`: every job in this Redis, and how the running ones share the fleet."""

from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table

from promptmill.cli.app import JsonFlag, app, open_store, out
from promptmill.config.settings import get_settings
from promptmill.reports.status import eta_text, job_list


@app.command()
def jobs(as_json: JsonFlag = False) -> None:
    """List the jobs in this Redis: state, rows ok and failed of the total, and for a running job its
    share of the fleet (the share of its workers' turns its weight gives it), weight, pace in rows/s
    and ETA (jobs whose keys expired or were deleted are gone)."""
    with open_store(get_settings()) as (store, _):
        listed = job_list(store)
    if as_json:
        out.print_json(json.dumps({"jobs": listed}))
        return
    table = Table(box=None, pad_edge=False)
    for title in ("job", "state", "ok", "failed", "total"):
        table.add_column(title, no_wrap=True, justify="left" if title in ("job", "state") else "right")
    table.add_column("model", overflow="fold")
    for job in listed:
        failed = f"[red]{job['failed']:,}[/]" if job["failed"] else "0"
        table.add_row(job["job_id"], job["state"], f"{job['ok']:,}", failed, f"{job['total']:,}", escape(job["model"]))
    out.print(table)
    running = [job for job in listed if job["share"] is not None]
    if running:  # a table of their own: the list above fits 80 columns, and so does this
        fleet = Table(box=None, pad_edge=False, title="running: their share of the fleet", title_justify="left")
        for title in ("job", "weight", "share", "slots", "rows/s", "eta"):
            fleet.add_column(title, no_wrap=True, justify="left" if title == "job" else "right")
        for job in running:
            fleet.add_row(job["job_id"], str(job["weight"]), f"{job['share']:.0%}", str(job["slots"]),
                          "" if job["rows_per_s"] is None else f"{job['rows_per_s']:,.1f}",
                          "" if job["eta_s"] is None else eta_text(job["eta_s"]))  # fmt: skip
        out.print(fleet)

