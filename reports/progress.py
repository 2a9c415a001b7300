"""The live progress display: done, failed, the fleet's pace (rows per second over the last minute,
latency and time to first token p50, ETA: `status`'s figures), tokens and cost, read from committed state."""

from __future__ import annotations

import time
from typing import Callable

import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from promptmill.config.prices import PriceTable
from promptmill.jobs.ledger import cost_report
from promptmill.jobs.state.pace import JobPace, job_pace
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState, JobStatus
from promptmill.jobs.state.store import JobStore


class JobProgress:
    """A rich progress bar over a job; `refresh()` re-reads the job store."""

    def __init__(self, store: JobStore, spec: JobSpec, prices: PriceTable, console: Console):
        self.store, self.spec, self.prices = store, spec, prices
        # At 80 columns the figures fold onto a second line rather than being cut to "$0.…".
        folds = {"table_column": Column(overflow="fold")}
        self.progress = Progress(
            TextColumn("[bold]{task.description}", **folds),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed", **folds),
            TextColumn("[green]{task.fields[cost]}", table_column=Column(no_wrap=True)),
            TextColumn("[cyan]{task.fields[pace]}", **folds),
            TextColumn("{task.fields[tokens]}", **folds),
            console=console,
        )
        self.task = None
        self.last_refresh = 0.0
        self.pace_read_at = float("-inf")
        self.pace = "- rows/s"
        self.started = time.monotonic()
        self.first_row_told = False

    def __enter__(self) -> "JobProgress":
        self.progress.start()
        status = self.store.status(self.spec.job_id)
        self.started, self.first_row_told = time.monotonic(), status.terminal > 0
        # A resumed job shows what is already done at once, not after a silent warm-up.
        self.task = self.progress.add_task(
            self.spec.job_id, total=status.total or None, completed=status.terminal, **self._fields(status)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            try:
                self.refresh(force=True)
            except redis.ConnectionError:
                pass  # the last figures stay on screen
        self.progress.stop()

    def note(self, message: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=message)

    def _fields(self, status: JobStatus) -> dict[str, str]:
        usage = status.usage
        cost = cost_report(self.spec, status, self.prices).cost_usd
        if time.monotonic() - self.pace_read_at >= 1.0:  # the fleet's pace, as `status` shows it
            self.pace_read_at = time.monotonic()
            self.pace = _pace_line(job_pace(self.store.redis, self.spec.job_id, status.pending))
        return {
            "pace": self.pace,
            "failed": f"{status.failed:,}",
            "tokens": f"{usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens:,} in / {usage.output_tokens:,} out",
            "cost": f"${cost:,.4f}",
        }

    def refresh(self, force: bool = False) -> JobStatus | None:
        now = time.monotonic()
        if not force and now - self.last_refresh < 0.2:
            return None
        self.last_refresh = now
        status = self.store.status(self.spec.job_id)
        description = "producing" if status.state is JobState.producing else status.state.value
        if self.spec.info.local and not status.terminal and status.state.runnable:
            # The engine's start is a minute of nothing else: say what it is doing.
            description = status.engine or "engine starting (about a minute)"
            description = f"{escape(description)} · {now - self.started:.0f}s"  # an error's text is no markup
        elif status.terminal and not self.first_row_told:
            self.first_row_told = True
            self.progress.console.print(f"first row after {now - self.started:.1f}s", highlight=False)
        self.progress.update(
            self.task,
            total=status.total if status.produced else None,
            completed=status.terminal,
            description=description,
            **self._fields(status),
        )
        return status


def _pace_line(pace: JobPace) -> str:
    rate = pace.rows_per_s["last_minute"]
    parts = [f"{rate:,.1f} rows/s" if rate else "- rows/s"]
    if pace.latency_ms["p50"] is not None:
        parts.append(f"p50 {pace.latency_ms['p50']:,.0f} ms")
    if pace.ttft_ms and pace.ttft_ms["p50"] is not None:
        parts.append(f"ttft {pace.ttft_ms['p50']:,.0f} ms")
    if pace.eta_s:
        parts.append(f"eta {pace.eta_s // 3600}:{pace.eta_s % 3600 // 60:02d}:{pace.eta_s % 60:02d}")
    return " · ".join(parts)


REDIS_PATIENCE_S = 300.0  # how long a run waits for a Redis that went away before it gives up


class WorkersExited(RuntimeError):
    pass


def wait_for_job(
    progress: JobProgress,
    alive: Callable[[], bool] | None = None,
    poll_s: float = 0.25,
    on_redis_lost: Callable[[], object] | None = None,
    stop_when: Callable[[JobStatus], bool] | None = None,
) -> JobStatus:
    """Refresh until the job is complete or stopped (failed, cancelled, paused at its budget); raises
    if the local workers die.

    While Redis is unreachable it waits (calling `on_redis_lost`, which may restart it), up to
    `REDIS_PATIENCE_S`. `stop_when` sees each running status and may stop the job (True: it did).
    """
    unreachable_since: float | None = None
    while True:
        try:
            status = progress.refresh(force=True)
        except redis.ConnectionError as error:
            # Redis restarting: workers reconnect by themselves; wait for it rather than give up.
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > REDIS_PATIENCE_S:
                raise
            progress.note(f"Redis unreachable ({error}); waiting")
            if on_redis_lost is not None:
                try:
                    on_redis_lost()
                except Exception:  # noqa: BLE001 - keep waiting; the next round tries again
                    pass
            time.sleep(1.0)
            continue
        unreachable_since = None
        assert status is not None
        if not status.state.runnable:
            return status
        if stop_when is not None and stop_when(status):
            continue  # stopped: the next refresh reads it so
        if alive is not None and not alive():
            raise WorkersExited("the local workers keep dying as soon as they start")
        time.sleep(poll_s)
