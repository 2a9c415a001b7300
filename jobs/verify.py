"""`promptmill verify`: recompute a job's counters and cost ledger from its committed outcomes and
say where they disagree. They never should: both are written by the one commit script."""

from __future__ import annotations

from dataclasses import dataclass, field

from promptmill.config.prices import BATCH, LONG
from promptmill.jobs.shards import iter_outcomes
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import Usage


@dataclass
class Verification:
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_job(store: JobStore, spec: JobSpec) -> Verification:
    status = store.status(spec.job_id)
    result = Verification()
    ok = failed = answered = 0
    usage = Usage()
    seen: set[int] = set()
    for outcome in iter_outcomes(store, spec):
        result.rows += 1
        if outcome.row in seen:
            result.problems.append(f"row {outcome.row} has two outcomes")
        seen.add(outcome.row)
        if not 0 <= outcome.row < status.rows_produced:
            result.problems.append(f"row {outcome.row} is outside the {status.rows_produced:,} rows produced")
        ok += outcome.status == "ok"
        failed += outcome.status == "failed"
        answered += outcome.usage.answered
        usage = usage + outcome.usage
    if (status.ok, status.failed) != (ok, failed):
        result.problems.append(
            f"counters say {status.ok:,} ok and {status.failed:,} failed; the outcomes, {ok:,} and {failed:,}"
        )
    # The job's models (its own and its fallback chain's) at their standard and long-context rates,
    # each through the Message Batches API too.
    names = {link.model + band + batch for link in spec.links() for band in ("", LONG) for batch in ("", BATCH)}
    # Failed outcomes replaced by `resume --retry-failed` were paid for: the ledger keeps them; so are
    # failed attempts the provider billed anyway (streams broken off mid-answer).
    for paid in (store.chunks.retried_usage(spec.job_id), store.chunks.partial_usage(spec.job_id)):
        usage = usage + paid.usage
        answered += sum(paid.requests_by_model.values())
    ledger = sum((status.usage_by_model.get(name, Usage()) for name in names), Usage())
    if ledger != usage:
        result.problems.append(f"the ledger says {ledger.model_dump()}; the outcomes add up to {usage.model_dump()}")
    others = sorted(set(status.usage_by_model) - names)
    if others:
        result.problems.append(f"the ledger holds usage for models the job does not use: {others}")
    requests = sum(status.requests_by_model.get(name, 0) for name in names)
    if requests != answered:
        result.problems.append(f"the ledger counts {requests:,} answered requests; the outcomes, {answered:,}")
    if status.produced and status.pending == 0 and len(seen) != status.rows_produced:
        result.problems.append(f"the job is complete but {status.rows_produced - len(seen):,} rows have no outcome")
    return result
