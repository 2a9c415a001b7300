"""The Redis job store: the only module that knows Redis key names.

Every key of a job carries the job id in braces (`pm:{JOB}:...`), so one job's keys share a Redis
Cluster slot and the Lua scripts below may touch them together.

    pm:jobs                     sorted set of job ids by creation time
    pm:{JOB}:spec               the JobSpec as JSON (no secrets)
    pm:{JOB}:meta               hash: state, error, rows_produced, total, produced
    pm:{JOB}:chunks             list of chunk ids in input order
    pm:{JOB}:chunk_rows         hash: chunk id -> rows in the chunk (to tell a complete chunk)
    pm:{JOB}:chunk:{CHUNK}      the chunk's rendered requests as JSON
    pm:{JOB}:results:{CHUNK}    hash: row -> outcome JSON; a row's field is its done mark
    pm:{JOB}:counters           hash: ok, failed
    pm:{JOB}:ledger             hash: "MODEL|requests", "MODEL|failed_attempts", "MODEL|input_tokens", ...
                                token usage by model ("MODEL@long": requests at long-context rates)
    pm:{JOB}:budget             hash: spent, held: micro-USD paid so far, and held for requests in flight
    pm:{JOB}:chunk_runs         hash: chunk id -> times a worker started it, while it runs: a chunk
                                here whose lease is gone lost its worker
    pm:{JOB}:lease:{CHUNK}      the token of the worker running the chunk, with an expiry
    pm:{JOB}:attempts:{CHUNK}   hash: row -> failed attempts so far (a resumed row keeps its count)
    pm:{JOB}:row_starts:{CHUNK} hash: row -> times it was sent by a chunk run that follows a dead
                                worker's (poison-row guard; only written in that careful mode)
    pm:{JOB}:flushed            set of chunk ids whose outcomes are in result shards on disk, their
                                results, payload and bookkeeping gone from Redis
    pm:{JOB}:sweep              a short lock: one worker at a time looks for orphaned chunks
    pm:{JOB}:resent             hash: chunk id -> its run count when the sweeper last sent it again
    pm:{JOB}:stranded           hash: chunk id -> when the sweeper last sent it for want of a message
    pm:limit:{SCOPE}            hash: the fleet's rate-limit buckets for one account and model, with
                                the limits learned from the provider's headers (workers/rate_limit.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

import orjson
import redis
from pydantic import BaseModel

from jobs.spec import JobSpec
from pipelines.items import ItemOutcome, RenderedRequest, Usage

_USAGE_FIELDS = tuple(Usage.model_fields)
JOBS_INDEX = "pm:jobs"


def _key(job_id: str, *parts: str) -> str:
    return ":".join(("pm", "{" + job_id + "}", *parts))


def limiter_key(scope: str) -> str:
    return "pm:limit:{" + scope + "}"


class JobState(StrEnum):
    producing = "producing"  #: the producer is still enqueuing rows; workers may already run
    running = "running"  #: every row is enqueued; workers are on it
    complete = "complete"  #: every row is ok or failed (derived from the counters, never stored)
    cancelled = "cancelled"  #: stopped by `promptmill cancel`; `resume` picks it up again
    failed = "failed"  #: a fatal error (such as a refused API key) stopped it; resumable after a fix
    paused_budget = "paused_budget"  #: the next request would pass its budget; resumable with a higher one

    @property
    def runnable(self) -> bool:
        """Workers (and the producer) go on with a job only in these states."""
        return self in (JobState.producing, JobState.running)


class ChunkPayload(BaseModel):
    chunk_id: str
    first_row: int
    row_count: int
    requests: list[RenderedRequest]


@dataclass(frozen=True)
class Budget:
    cap_usd: float | None
    spent_usd: float  # paid for answers so far, committed or not
    held_usd: float  # the most the requests in flight can still cost


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
    limit_scope: str | None = None

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
        total = Usage()
        for usage in self.usage_by_model.values():
            total = total + usage
        return total


def chunk_id_for(first_row: int) -> str:
    return f"{first_row:010d}"


# Commit one outcome: result, done mark and usage in one step, and only once per row.
# A chunk already flushed to its shard is complete: nothing more is written for it.
_COMMIT = """
if redis.call('SISMEMBER', KEYS[4], ARGV[6]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
local model = ARGV[4]
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[3], model .. '|requests', ARGV[5]) end
for i = 7, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) ~= 0 then redis.call('HINCRBY', KEYS[3], model .. '|' .. ARGV[i], ARGV[i + 1]) end
end
return 1
"""

# Hold a request's worst-case cost against the job's budget, or pause the job at its cap: what is held
# and spent never passes the cap, so the job never spends more than its budget (micro-USD).
_HOLD_BUDGET = """
local cap = redis.call('HGET', KEYS[1], 'budget_micro')
if not cap then return 1 end
local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
local held = tonumber(redis.call('HGET', KEYS[2], 'held') or '0')
if spent + held + tonumber(ARGV[1]) > tonumber(cap) then
  local state = redis.call('HGET', KEYS[1], 'state')
  if state == 'running' or state == 'producing' then redis.call('HSET', KEYS[1], 'state', 'paused_budget') end
  return 0
end
redis.call('HINCRBY', KEYS[2], 'held', ARGV[1])
return 1
"""

# Add a chunk once: a producer that runs again over the same rows adds nothing twice.
_ADD_CHUNK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') == false then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[4], 'rows_produced', ARGV[3])
return 1
"""

# A chunk's outcomes are safe in its shard: mark it flushed and free everything it held.
_MARK_FLUSHED = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
return 1
"""

# Release a lease only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class JobStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._commit = client.register_script(_COMMIT)
        self._add_chunk = client.register_script(_ADD_CHUNK)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._mark_flushed = client.register_script(_MARK_FLUSHED)
        self._hold_budget = client.register_script(_HOLD_BUDGET)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(redis.Redis.from_url(url, health_check_interval=30))

    # -- the job -----------------------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> None:
        created = self.redis.set(_key(spec.job_id, "spec"), spec.model_dump_json(), nx=True)
        if not created:
            raise ValueError(f"job {spec.job_id} already exists")
        with self.redis.pipeline() as pipe:
            pipe.hset(_key(spec.job_id, "meta"), mapping={"state": JobState.producing, "rows_produced": 0})
            pipe.zadd(JOBS_INDEX, {spec.job_id: time.time()})
            pipe.execute()

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(_key(job_id, "spec")))

    def spec(self, job_id: str) -> JobSpec:
        raw = self.redis.get(_key(job_id, "spec"))
        if raw is None:
            raise KeyError(f"no job {job_id!r} in this Redis")
        return JobSpec.model_validate_json(raw)

    def job_ids(self) -> list[str]:
        return [raw.decode() for raw in self.redis.zrange(JOBS_INDEX, 0, -1)]

    def stored_state(self, job_id: str) -> JobState:
        raw = self.redis.hget(_key(job_id, "meta"), "state")
        return JobState(raw.decode()) if raw else JobState.failed

    def set_state(self, job_id: str, state: JobState, error: str | None = None) -> None:
        assert state is not JobState.complete, "complete is derived, never stored"
        with self.redis.pipeline() as pipe:
            pipe.hset(_key(job_id, "meta"), "state", state)
            if error is None:
                pipe.hdel(_key(job_id, "meta"), "error")
            else:
                pipe.hset(_key(job_id, "meta"), "error", error)
            pipe.execute()

    def fail_job(self, job_id: str, error: str) -> None:
        """A fatal error: stop every worker on the job, keep every committed result."""
        self.set_state(job_id, JobState.failed, error)

    def is_runnable(self, job_id: str) -> bool:
        return self.stored_state(job_id).runnable

    def finish_producing(self, job_id: str) -> None:
        meta = _key(job_id, "meta")
        with self.redis.pipeline() as pipe:
            pipe.hset(meta, "produced", 1)
            pipe.execute()
        if self.stored_state(job_id) is JobState.producing:
            self.set_state(job_id, JobState.running)

    def status(self, job_id: str) -> JobStatus:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(_key(job_id, "meta"))
            pipe.hgetall(_key(job_id, "counters"))
            pipe.hgetall(_key(job_id, "ledger"))
            meta, counters, ledger = pipe.execute()
        if not meta:
            raise KeyError(f"no job {job_id!r} in this Redis")
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        usage_fields: dict[str, dict[str, int]] = {}
        requests: dict[str, int] = {}
        failed_attempts: dict[str, int] = {}
        for raw_name, raw_value in ledger.items():
            model, _, name = raw_name.decode().rpartition("|")
            if name == "requests":
                requests[model] = int(raw_value)
            elif name == "failed_attempts":
                failed_attempts[model] = int(raw_value)
            else:
                usage_fields.setdefault(model, {})[name] = int(raw_value)
        status = JobStatus(
            job_id=job_id,
            state=JobState(meta.get("state", JobState.failed)),
            error=meta.get("error"),
            produced=meta.get("produced") == "1",
            rows_produced=int(meta.get("rows_produced", 0)),
            ok=int(counters.get(b"ok", 0)),
            failed=int(counters.get(b"failed", 0)),
            usage_by_model={model: Usage(**fields) for model, fields in usage_fields.items()},
            requests_by_model=requests,
            failed_attempts_by_model=failed_attempts,
            limit_scope=meta.get("limit_scope"),
        )
        if status.state is JobState.running and status.produced and status.pending <= 0:
            status.state = JobState.complete
        return status

    # -- chunks --------------------------------------------------------------------------------

    def add_chunk(self, job_id: str, chunk: ChunkPayload) -> bool:
        """Store a chunk once; returns False when it was already there (a producer re-run)."""
        added = self._add_chunk(
            keys=[
                _key(job_id, "chunk", chunk.chunk_id),
                _key(job_id, "chunks"),
                _key(job_id, "chunk_rows"),
                _key(job_id, "meta"),
            ],
            args=[chunk.model_dump_json(), chunk.chunk_id, chunk.row_count],
        )
        return bool(added)

    def chunk(self, job_id: str, chunk_id: str) -> ChunkPayload:
        raw = self.redis.get(_key(job_id, "chunk", chunk_id))
        if raw is None:
            raise KeyError(f"job {job_id} has no chunk {chunk_id}")
        return ChunkPayload.model_validate_json(raw)

    def last_chunk_first_row(self, job_id: str) -> int | None:
        """Where the producer stopped: the first row of the last chunk it stored."""
        raw = self.redis.lindex(_key(job_id, "chunks"), -1)
        return None if raw is None else int(raw)

    def chunk_ids(self, job_id: str) -> list[str]:
        return [raw.decode() for raw in self.redis.lrange(_key(job_id, "chunks"), 0, -1)]

    def done_rows(self, job_id: str, chunk_id: str) -> set[int]:
        """Rows of an unflushed chunk that have their outcome (a flushed chunk has all of them)."""
        return {int(raw) for raw in self.redis.hkeys(_key(job_id, "results", chunk_id))}

    def chunk_row_count(self, job_id: str, chunk_id: str) -> int:
        return int(self.redis.hget(_key(job_id, "chunk_rows"), chunk_id) or 0)

    def incomplete_chunks(self, job_id: str) -> list[str]:
        chunk_ids = self.chunk_ids(job_id)
        row_counts = self.redis.hgetall(_key(job_id, "chunk_rows"))
        flushed = self.flushed_chunks(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id in chunk_ids:
                pipe.hlen(_key(job_id, "results", chunk_id))
            done_counts = pipe.execute()
        return [
            chunk_id
            for chunk_id, done in zip(chunk_ids, done_counts)
            if chunk_id not in flushed and done < int(row_counts[chunk_id.encode()])
        ]

    def orphaned_chunks(self, job_id: str) -> list[str]:
        """Chunks a worker started and neither finished nor still holds (their worker died), and that
        were not sent again since that run: a chunk waiting in the queue is not sent once more."""
        runs = {raw.decode(): int(count) for raw, count in self.redis.hgetall(_key(job_id, "chunk_runs")).items()}
        resent = {raw.decode(): int(count) for raw, count in self.redis.hgetall(_key(job_id, "resent")).items()}
        not_resent = [chunk_id for chunk_id, count in runs.items() if resent.get(chunk_id) != count]
        orphans = self._unleased(job_id, not_resent)
        if orphans:
            self.redis.hset(_key(job_id, "resent"), mapping={chunk_id: runs[chunk_id] for chunk_id in orphans})
        return orphans

    def stranded_chunks(self, job_id: str, not_before_s: float) -> list[str]:
        """Incomplete chunks that nobody runs or leases, each at most once per `not_before_s`."""
        started = set(self.redis.hkeys(_key(job_id, "chunk_runs")))
        idle = self._unleased(job_id, [c for c in self.incomplete_chunks(job_id) if c.encode() not in started])
        last_sent = self.redis.hgetall(_key(job_id, "stranded"))
        now = time.time()
        stranded = [c for c in idle if now - float(last_sent.get(c.encode(), 0)) >= not_before_s]
        if stranded:
            self.redis.hset(_key(job_id, "stranded"), mapping={chunk_id: now for chunk_id in stranded})
        return stranded

    def _unleased(self, job_id: str, chunk_ids: list[str]) -> list[str]:
        """Those of these chunks that no worker holds a lease on."""
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id in chunk_ids:
                pipe.exists(_key(job_id, "lease", chunk_id))
            held = pipe.execute()
        return [chunk_id for chunk_id, leased in zip(chunk_ids, held) if not leased]

    def take_sweep_turn(self, job_id: str, every_s: float) -> bool:
        """True for one caller per `every_s` across the fleet."""
        return bool(self.redis.set(_key(job_id, "sweep"), 1, nx=True, px=int(every_s * 1000)))

    def count_row_starts(self, job_id: str, chunk_id: str, rows: list[int]) -> dict[int, int]:
        """Count these rows as sent once more; returns each one's count, this start included."""
        with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hincrby(_key(job_id, "row_starts", chunk_id), row, 1)
            return dict(zip(rows, map(int, pipe.execute())))

    # -- result shards -----------------------------------------------------------------------------

    def flushed_chunks(self, job_id: str) -> set[str]:
        return {raw.decode() for raw in self.redis.smembers(_key(job_id, "flushed"))}

    def rows_in_redis(self, job_id: str) -> int:
        """Rows enqueued whose chunk is not yet flushed: what the job holds in Redis now."""
        produced = int(self.redis.hget(_key(job_id, "meta"), "rows_produced") or 0)
        flushed = list(self.flushed_chunks(job_id))
        counts = self.redis.hmget(_key(job_id, "chunk_rows"), flushed) if flushed else []
        return produced - sum(int(count) for count in counts if count)

    def is_flushed(self, job_id: str, chunk_id: str) -> bool:
        return bool(self.redis.sismember(_key(job_id, "flushed"), chunk_id))

    def mark_flushed(self, job_id: str, chunk_id: str) -> None:
        """Call only once the chunk's outcomes are safely in its shard."""
        self._mark_flushed(
            keys=[
                _key(job_id, "flushed"),
                _key(job_id, "results", chunk_id),
                _key(job_id, "chunk", chunk_id),
                _key(job_id, "attempts", chunk_id),
                _key(job_id, "row_starts", chunk_id),
                _key(job_id, "chunk_runs"),
                _key(job_id, "resent"),
            ],
            args=[chunk_id],
        )

    def count_chunk_run(self, job_id: str, chunk_id: str) -> int:
        """How many times a worker has started this chunk, this start included."""
        return int(self.redis.hincrby(_key(job_id, "chunk_runs"), chunk_id, 1))

    def forget_chunk_runs(self, job_id: str, chunk_id: str) -> None:
        """A run that ended on its own (not by its worker dying) does not count towards poison."""
        self.redis.hdel(_key(job_id, "chunk_runs"), chunk_id)

    def failed_attempts(self, job_id: str, chunk_id: str) -> dict[int, int]:
        raw = self.redis.hgetall(_key(job_id, "attempts", chunk_id))
        return {int(row): int(count) for row, count in raw.items()}

    # -- budget ----------------------------------------------------------------------------------

    def set_budget(self, job_id: str, usd: float | None, spent_at_least_usd: float = 0.0) -> None:
        """A new cap (None: none); what is held for requests in flight is counted afresh from here.

        Spending is counted only while a cap is set: a job given one late passes in the ledger's cost
        so far as `spent_at_least_usd`.
        """
        floor = round(spent_at_least_usd * 1_000_000)
        spent = int(self.redis.hget(_key(job_id, "budget"), "spent") or 0)
        with self.redis.pipeline() as pipe:
            if usd is None:
                pipe.hdel(_key(job_id, "meta"), "budget_micro")
            else:
                pipe.hset(_key(job_id, "meta"), "budget_micro", round(usd * 1_000_000))
            pipe.hset(_key(job_id, "budget"), "held", 0)
            if floor > spent:
                pipe.hincrby(_key(job_id, "budget"), "spent", floor - spent)
            pipe.execute()

    def has_budget(self, job_id: str) -> bool:
        return bool(self.redis.hexists(_key(job_id, "meta"), "budget_micro"))

    def budget(self, job_id: str) -> Budget:
        with self.redis.pipeline() as pipe:
            pipe.hget(_key(job_id, "meta"), "budget_micro")
            pipe.hgetall(_key(job_id, "budget"))
            cap, figures = pipe.execute()
        return Budget(
            cap_usd=None if cap is None else int(cap) / 1_000_000,
            spent_usd=int(figures.get(b"spent", 0)) / 1_000_000,
            held_usd=int(figures.get(b"held", 0)) / 1_000_000,
        )

    def hold_budget(self, job_id: str, micro_usd: int) -> bool:
        """Hold a request's most possible cost; False (and the job paused) if that would pass the cap."""
        return bool(self._hold_budget(keys=[_key(job_id, "meta"), _key(job_id, "budget")], args=[micro_usd]))

    def settle_budget(self, job_id: str, held_micro_usd: int, spent_micro_usd: int) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hincrby(_key(job_id, "budget"), "held", -held_micro_usd)
            pipe.hincrby(_key(job_id, "budget"), "spent", spent_micro_usd)
            pipe.execute()

    def add_failed_attempt(self, job_id: str, chunk_id: str, row: int, model: str) -> int:
        """Count a failed attempt before retrying, so a resumed row does not start afresh; the ledger
        counts it too (no failure the API answers with an error is billed, so it has no tokens)."""
        with self.redis.pipeline() as pipe:
            pipe.hincrby(_key(job_id, "attempts", chunk_id), row, 1)
            pipe.hincrby(_key(job_id, "ledger"), f"{model}|failed_attempts", 1)
            count, _ = pipe.execute()
        return int(count)

    # -- the fleet's rate limit ------------------------------------------------------------------

    def set_limit_scope(self, job_id: str, scope: str) -> None:
        """Record which limiter buckets the job draws on, so `status` can show them."""
        self.redis.hset(_key(job_id, "meta"), "limit_scope", scope)

    def limit_state(self, scope: str) -> dict[str, float]:
        raw = self.redis.hgetall(limiter_key(scope))
        return {name.decode(): float(value) for name, value in raw.items()}

    # -- leases --------------------------------------------------------------------------------

    def acquire_lease(self, job_id: str, chunk_id: str, token: str, ttl_ms: int) -> bool:
        return bool(self.redis.set(_key(job_id, "lease", chunk_id), token, nx=True, px=ttl_ms))

    def lease_ttl_ms(self, job_id: str, chunk_id: str) -> int:
        return max(0, int(self.redis.pttl(_key(job_id, "lease", chunk_id))))

    def renew_lease(self, job_id: str, chunk_id: str, token: str, ttl_ms: int) -> bool:
        return bool(self._renew(keys=[_key(job_id, "lease", chunk_id)], args=[token, ttl_ms]))

    def release_lease(self, job_id: str, chunk_id: str, token: str) -> None:
        self._release(keys=[_key(job_id, "lease", chunk_id)], args=[token])

    # -- outcomes --------------------------------------------------------------------------------

    def commit(self, job_id: str, chunk_id: str, model: str, outcome: ItemOutcome) -> bool:
        """Commit an outcome with its done mark and usage, atomically; False if the row was done."""
        usage = outcome.usage
        answered = 1 if (usage.input_tokens or usage.output_tokens) else 0
        args: list[object] = [outcome.row, outcome.model_dump_json(), outcome.status, model, answered, chunk_id]
        for name in _USAGE_FIELDS:
            args.extend((name, getattr(usage, name)))
        committed = self._commit(
            keys=[
                _key(job_id, "results", chunk_id),
                _key(job_id, "counters"),
                _key(job_id, "ledger"),
                _key(job_id, "flushed"),
            ],
            args=args,
        )
        return bool(committed)

    def chunk_outcomes(self, job_id: str, chunk_ids: list[str]) -> list[list[ItemOutcome]]:
        """The outcomes held in Redis for each of these chunks, each list in row order."""
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id in chunk_ids:
                pipe.hvals(_key(job_id, "results", chunk_id))
            pages = pipe.execute()
        return [
            sorted((ItemOutcome.model_validate(orjson.loads(raw)) for raw in values), key=lambda o: o.row)
            for values in pages
        ]

