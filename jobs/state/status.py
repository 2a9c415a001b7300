"""What a job's state reads as: its state, counters and ledger, its budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from promptmill.jobs.state.keys import LEDGER_FAILED_ATTEMPTS, LEDGER_REQUESTS
from promptmill.pipelines.items import Usage


class JobState(StrEnum):
    producing = "producing"  #: the producer is still enqueuing rows; workers may already run
    running = "running"  #: every row is enqueued; workers are on it
    complete = "complete"  #: every row is ok or failed (derived from the counters, never stored)
    cancelled = "cancelled"  #: stopped by `promptmill cancel`; `resume` picks it up again
    failed = "failed"  #: a fatal error (such as a refused API key) stopped it; resumable after a fix
    paused_budget = "paused_budget"  #: the next request would pass its budget; resumable with a higher one
    paused = "paused"  #: stopped with its reason (an outage: no answer for OUTAGE_PAUSE_S); resumable as it is

    @property
    def runnable(self) -> bool:
        """Workers (and the producer) go on with a job only in these states."""
        return self in (JobState.producing, JobState.running)


@dataclass(frozen=True)
class Budget:
    cap_usd: float | None
    spent_usd: float  # paid for answers so far, committed or not
    held_usd: float  # the most the requests in flight can still cost


@dataclass
class LedgerPart:
    """Requests, failed attempts and tokens by model, as one ledger hash holds them."""

    usage_by_model: dict[str, Usage] = field(default_factory=dict)
    requests_by_model: dict[str, int] = field(default_factory=dict)
    failed_attempts_by_model: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[bytes, bytes]) -> "LedgerPart":
        part = cls()
        usage_fields: dict[str, dict[str, int]] = {}
        for raw_name, raw_value in raw.items():
            model, _, name = raw_name.decode().rpartition("|")
            if name == LEDGER_REQUESTS:
                part.requests_by_model[model] = int(raw_value)
            elif name == LEDGER_FAILED_ATTEMPTS:
                part.failed_attempts_by_model[model] = int(raw_value)
            else:
                usage_fields.setdefault(model, {})[name] = int(raw_value)
        part.usage_by_model = {model: Usage(**fields) for model, fields in usage_fields.items()}
        return part

    @property
    def usage(self) -> Usage:
        return sum(self.usage_by_model.values(), Usage())

    def as_dict(self) -> dict[str, dict[str, int]]:
        """By model: requests and each kind of token."""
        models = sorted(set(self.usage_by_model) | set(self.requests_by_model))
        return {
            model: {LEDGER_REQUESTS: self.requests_by_model.get(model, 0), **self.usage_by_model.get(model, Usage()).model_dump()}
            for model in models
        }


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    error: str | None
    produced: bool
    rows_produced: int
    ok: int
    failed: int
    usage_by_model: dict[str, Usage] = field(default_factory=dict)
    requests_by_model: dict[str, int] = field(default_factory=dict)
    failed_attempts_by_model: dict[str, int] = field(default_factory=dict)
    engine: str | None = None  # the local engine's start, as its worker tells it
    limit_scope: str | None = None
    paid_twice: LedgerPart = field(default_factory=LedgerPart)
    created_at: float | None = None
    finished_at: float | None = None
    input_sha256: str | None = None  # once the producer has read the whole input

    @property
    def total(self) -> int:
        return self.rows_produced

    @property
    def terminal(self) -> int:
        return self.ok + self.failed

    @property
    def pending(self) -> int:
        return self.rows_produced - self.terminal

    @property
    def usage(self) -> Usage:
        return sum(self.usage_by_model.values(), Usage())
