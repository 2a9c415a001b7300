"""When a job's failures mean the job itself is wrong (a bad key, a prompt every row breaks): a run
stops rather than pay for every row, and says what failed, by kind, with one example of each."""

from __future__ import annotations

from dataclasses import dataclass

from promptmill.jobs.shards import iter_outcomes
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobStatus
from promptmill.jobs.state.store import JobStore

# Below this many rows done, a share says little: only "every row failed" stops the run at its end.
MIN_ROWS_JUDGED = 100


def too_many_failed(status: JobStatus, max_share: float, finished: bool) -> str | None:
    """Why the run should stop for its failures (None: it should not). Mid-run, once MIN_ROWS_JUDGED
    rows are done, a share of failures over `max_share`; at the end, also every row failed (unless
    `max_share` is 1)."""
    done = status.ok + status.failed
    if not status.failed:
        return None
    if done >= MIN_ROWS_JUDGED and status.failed / done > max_share:
        return f"{status.failed:,} of {done:,} rows done failed, more than --max-failed-share {max_share:g}"
    if finished and status.ok == 0 and max_share < 1:  # a share of 1: the user takes any failure
        return f"every row failed ({status.failed:,})"
    return None


@dataclass
class FailureKind:
    count: int = 0
    example_row: int | None = None
    example: str = ""


def failures_by_kind(store: JobStore, spec: JobSpec) -> dict[str, FailureKind]:
    """The committed failures by error kind, most first, each with its first row's message."""
    kinds: dict[str, FailureKind] = {}
    for outcome in iter_outcomes(store, spec):
        if outcome.status != "failed" or outcome.error is None:
            continue
        kind = kinds.setdefault(outcome.error.kind.value, FailureKind())
        kind.count += 1
        if kind.example_row is None:
            kind.example_row, kind.example = outcome.row, outcome.error.message
    return dict(sorted(kinds.items(), key=lambda item: -item[1].count))
