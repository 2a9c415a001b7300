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
    pm:{JOB}:paid_twice         hash, as the ledger: answers that came for rows already done (a chunk
                                run twice at once), paid for but not committed: ledger + this = bill
    pm:{JOB}:retried            hash, as the ledger: the usage of failed outcomes that `resume
                                --retry-failed` replaced (paid for, so the ledger keeps it; verify adds it)
    pm:{JOB}:hosts              set of the hosts whose workers ran the job's chunks (the manifest)
    pm:{JOB}:sweep              a short lock: one worker at a time looks for lost chunks
    pm:{JOB}:resent             hash: chunk id -> its run count when the sweeper last sent it again
    pm:{JOB}:sent_at            hash: chunk id -> when the sweeper last sent it
    pm:limit:{SCOPE}            hash: the fleet's rate-limit buckets for one account and model, with
                                the limits learned from the provider's headers (workers/rate_limit.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Iterator

import orjson
import redis
from pydantic import BaseModel

from config.celery_config import REDIS_CONNECTION_OPTIONS
from jobs.spec import JobSpec
from pipelines.items import ItemOutcome, RenderedRequest, Usage

_USAGE_FIELDS = tuple(Usage.model_fields)
JOBS_INDEX = "pm:jobs"


def connect(url: str, **options: object) -> redis.Redis:
    """A client with socket timeouts, keepalive and health checks: a silent network drop fails its
    command instead of hanging it. `redis://:PASSWORD@host:port/db` and `rediss://` URLs work."""
    return redis.Redis.from_url(url, **{**REDIS_CONNECTION_OPTIONS, **options})


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
            if name == "requests":
                part.requests_by_model[model] = int(raw_value)
            elif name == "failed_attempts":
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
            model: {"requests": self.requests_by_model.get(model, 0), **self.usage_by_model.get(model, Usage()).model_dump()}
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


def chunk_id_for(first_row: int) -> str:
    return f"{first_row:010d}"


# Commit one outcome: result, done mark and usage in one step, and only once per row.
# A chunk already flushed to its shard is complete: nothing more is written for it.
# An answer for a row already done (its chunk ran twice at once) was paid for all the same: its usage
# goes to the paid_twice ledger, so the ledger and paid_twice add up to the provider's bill.
_COMMIT = """
local model = ARGV[4]
local function account(ledger)
  if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', ledger, model .. '|requests', ARGV[5]) end
  for i = 7, #ARGV, 2 do
    if tonumber(ARGV[i + 1]) ~= 0 then redis.call('HINCRBY', ledger, model .. '|' .. ARGV[i], ARGV[i + 1]) end
  end
end
if redis.call('SISMEMBER', KEYS[4], ARGV[6]) == 1 or redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  account(KEYS[5])
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
account(KEYS[3])
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
redis.call('HDEL', KEYS[8], ARGV[1])
return 1
"""

# The producer is done: running, unless the job was cancelled, failed or paused meanwhile.
_FINISH_PRODUCING = """
redis.call('HSET', KEYS[1], 'produced', 1)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'input_sha256', ARGV[1]) end
if redis.call('HGET', KEYS[1], 'state') == 'producing' then redis.call('HSET', KEYS[1], 'state', 'running') end
return 1
"""

# A new cap. What is held for requests in flight is let go only on a stopped job (whose holders died
# or are settling): zeroing it under running workers would let them pass the cap.
_SET_BUDGET = """
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'budget_micro') else redis.call('HSET', KEYS[1], 'budget_micro', ARGV[1]) end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'producing' and state ~= 'running' then redis.call('HSET', KEYS[2], 'held', 0) end
local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
if tonumber(ARGV[2]) > spent then redis.call('HSET', KEYS[2], 'spent', ARGV[2]) end
return 1
"""

# Settle a request: what it held goes (never below zero: a resume may have let it go already), what
# it cost is spent.
_SETTLE_BUDGET = """
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0') - tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'held', math.max(held, 0))
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
return 1
"""

# Find the job's lost chunks in one step. A chunk is lost when it is incomplete, unflushed and
# unleased, and either (orphaned) a worker started it and died (its run count moved past the count
# it was last sent again at), or (stranded, only when the queue is empty) no message for it exists:
# it died in a dead worker's reserved or delayed messages, a resent copy among them. The guard is
# the loss itself (a run count, a time), never the chunk: a chunk lost twice is sent twice.
# ARGV: now (s), how long a chunk sent must wait before it counts as stranded (s), queue empty (0/1),
# the job's key prefix.
_SWEEP = """
local now, wait, queue_empty, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
local lost = {}
for _, chunk in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('SISMEMBER', KEYS[3], chunk) == 0 and redis.call('EXISTS', prefix .. 'lease:' .. chunk) == 0 then
    local rows = tonumber(redis.call('HGET', KEYS[2], chunk) or '0')
    if redis.call('HLEN', prefix .. 'results:' .. chunk) < rows then
      local runs = redis.call('HGET', KEYS[4], chunk)
      local sent_at = tonumber(redis.call('HGET', KEYS[6], chunk) or '0')
      if runs and runs ~= redis.call('HGET', KEYS[5], chunk) then
        redis.call('HSET', KEYS[5], chunk, runs)
        redis.call('HSET', KEYS[6], chunk, now)
        table.insert(lost, chunk)
      elseif queue_empty and now - sent_at >= wait then
        redis.call('HSET', KEYS[6], chunk, now)
        table.insert(lost, chunk)
      end
    end
  end
end
return lost
"""

# `resume --retry-failed`: put a chunk's failed rows back to pending. ARGV[1] is JSON: the chunk id,
# its payload (the requests to send), the outcomes to keep (a flushed chunk's come back from its
# shard) and the rows to retry with their attempts so far and the usage their failed answers cost,
# which stays paid (the `retried` ledger) while the rows' new outcomes are committed.
_REQUEUE_FAILED = """
local a = cjson.decode(ARGV[1])
if redis.call('SREM', KEYS[3], a.chunk) == 1 then
  for row, outcome in pairs(a.keep) do redis.call('HSET', KEYS[1], row, outcome) end
end
for _, r in ipairs(a.retry) do
  redis.call('HDEL', KEYS[1], r.row)
  redis.call('HSET', KEYS[5], r.row, r.attempts)
  if r.answered then redis.call('HINCRBY', KEYS[6], r.model .. '|requests', 1) end
  for name, value in pairs(r.usage) do
    if value ~= 0 then redis.call('HINCRBY', KEYS[6], r.model .. '|' .. name, value) end
  end
end
redis.call('HINCRBY', KEYS[2], 'failed', -#a.retry)
redis.call('SET', KEYS[4], a.payload)
return #a.retry
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
        self._set_budget = client.register_script(_SET_BUDGET)
        self._settle_budget = client.register_script(_SETTLE_BUDGET)
        self._finish_producing = client.register_script(_FINISH_PRODUCING)
        self._sweep = client.register_script(_SWEEP)
        self._requeue_failed = client.register_script(_REQUEUE_FAILED)

    @classmethod
    def from_url(cls, url: str, **options: object) -> "JobStore":
        return cls(connect(url, **options))

    # -- the job -----------------------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> None:
        created = self.redis.set(_key(spec.job_id, "spec"), spec.model_dump_json(), nx=True)
        if not created:
            raise ValueError(f"job {spec.job_id} already exists")
        now = time.time()
        with self.redis.pipeline() as pipe:
            meta = {"state": JobState.producing, "rows_produced": 0, "created_at": now}
            pipe.hset(_key(spec.job_id, "meta"), mapping=meta)
            pipe.zadd(JOBS_INDEX, {spec.job_id: now})
            pipe.execute()

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(_key(job_id, "spec")))

    def spec(self, job_id: str) -> JobSpec:
        raw = self.redis.get(_key(job_id, "spec"))
        if raw is None:
            raise KeyError(f"no job {job_id!r} in this Redis")
        return JobSpec.model_validate_json(raw)

    def job_ids(self) -> list[str]:
        """The jobs in this Redis, oldest first; those whose keys expired or were deleted leave the index."""
        ids = [raw.decode() for raw in self.redis.zrange(JOBS_INDEX, 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(_key(job_id, "spec"))
            alive = pipe.execute()
        gone = [job_id for job_id, present in zip(ids, alive) if not present]
        if gone:
            self.redis.zrem(JOBS_INDEX, *gone)
        return [job_id for job_id, present in zip(ids, alive) if present]

    def _job_keys(self, job_id: str) -> Iterator[bytes]:
        # Braces are literal in a SCAN pattern; they hold every key of the job.
        return self.redis.scan_iter(match=_key(job_id, "*"), count=1000)

    def delete_job(self, job_id: str) -> int:
        """Remove every Redis key of the job; returns how many there were."""
        deleted = 0
        batch: list[bytes] = []
        for key in self._job_keys(job_id):
            batch.append(key)
            if len(batch) == 500:
                deleted += self.redis.unlink(*batch)
                batch = []
        if batch:
            deleted += self.redis.unlink(*batch)
        self.redis.zrem(JOBS_INDEX, job_id)
        return deleted

    def expire_job(self, job_id: str, ttl_s: float | None) -> None:
        """Give every key of the job an expiry (None: take it away, for a job that runs again)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key in self._job_keys(job_id):
                if ttl_s is None:
                    pipe.persist(key)
                else:
                    pipe.pexpire(key, int(ttl_s * 1000))
            pipe.execute()

    def mark_finished(self, job_id: str, ttl_s: float) -> bool:
        """A complete job whose results are all on disk: record when it finished and let its keys
        expire after `ttl_s`. False if already done (its meta has an expiry)."""
        if self.redis.ttl(_key(job_id, "meta")) != -1:
            return False
        self.redis.hsetnx(_key(job_id, "meta"), "finished_at", time.time())
        self.expire_job(job_id, ttl_s)
        return True

    def reopen(self, job_id: str) -> None:
        """A finished job runs again (`resume --retry-failed`): its keys no longer expire."""
        self.expire_job(job_id, None)
        self.redis.hdel(_key(job_id, "meta"), "finished_at")

    def requeue_failed(
        self, job_id: str, chunk_id: str, payload: ChunkPayload, keep: list[ItemOutcome], retry: list[ItemOutcome]
    ) -> int:
        """Put these failed rows of a chunk back to pending with `payload` as the chunk's requests."""
        argument = {
            "chunk": chunk_id,
            "payload": payload.model_dump_json(),
            "keep": {str(o.row): o.model_dump_json() for o in keep},
            "retry": [
                {
                    "row": o.row,
                    "attempts": o.attempts,
                    "model": o.model or "",
                    "answered": o.usage.answered,
                    "usage": o.usage.model_dump(),
                }
                for o in retry
            ],
        }
        keys = [
            _key(job_id, "results", chunk_id),
            _key(job_id, "counters"),
            _key(job_id, "flushed"),
            _key(job_id, "chunk", chunk_id),
            _key(job_id, "attempts", chunk_id),
            _key(job_id, "retried"),
        ]
        return int(self._requeue_failed(keys=keys, args=[orjson.dumps(argument).decode()]))

    def retried_usage(self, job_id: str) -> LedgerPart:
        return LedgerPart.parse(self.redis.hgetall(_key(job_id, "retried")))

    def add_host(self, job_id: str, host: str) -> None:
        self.redis.sadd(_key(job_id, "hosts"), host)

    def hosts(self, job_id: str) -> list[str]:
        return sorted(raw.decode() for raw in self.redis.smembers(_key(job_id, "hosts")))

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

    def finish_producing(self, job_id: str, input_sha256: str | None = None) -> None:
        self._finish_producing(keys=[_key(job_id, "meta")], args=[input_sha256 or ""])

    def status(self, job_id: str) -> JobStatus:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(_key(job_id, "meta"))
            pipe.hgetall(_key(job_id, "counters"))
            pipe.hgetall(_key(job_id, "ledger"))
            pipe.hgetall(_key(job_id, "paid_twice"))
            meta, counters, ledger_raw, paid_twice = pipe.execute()
        if not meta:
            raise KeyError(f"no job {job_id!r} in this Redis")
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        ledger = LedgerPart.parse(ledger_raw)
        status = JobStatus(
            job_id=job_id,
            state=JobState(meta.get("state", JobState.failed)),
            error=meta.get("error"),
            produced=meta.get("produced") == "1",
            rows_produced=int(meta.get("rows_produced", 0)),
            ok=int(counters.get(b"ok", 0)),
            failed=int(counters.get(b"failed", 0)),
            usage_by_model=ledger.usage_by_model,
            requests_by_model=ledger.requests_by_model,
            failed_attempts_by_model=ledger.failed_attempts_by_model,
            limit_scope=meta.get("limit_scope"),
            paid_twice=LedgerPart.parse(paid_twice),
            created_at=float(meta["created_at"]) if "created_at" in meta else None,
            finished_at=float(meta["finished_at"]) if "finished_at" in meta else None,
            input_sha256=meta.get("input_sha256"),
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

    def lost_chunks(self, job_id: str, queue_empty: bool, stranded_after_s: float) -> list[str]:
        """The job's lost chunks, each marked as sent again now (see `_SWEEP`): the caller sends them."""
        keys = ["chunks", "chunk_rows", "flushed", "chunk_runs", "resent", "sent_at"]
        lost = self._sweep(
            keys=[_key(job_id, name) for name in keys],
            args=[time.time(), stranded_after_s, int(queue_empty), _key(job_id, "")],
        )
        return [raw.decode() for raw in lost]

    def is_leased(self, job_id: str, chunk_id: str) -> bool:
        return bool(self.redis.exists(_key(job_id, "lease", chunk_id)))

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

    def all_flushed(self, job_id: str) -> bool:
        """Is every chunk's outcome in its shard on disk (nothing of the job's results only in Redis)?"""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.scard(_key(job_id, "flushed"))
            pipe.llen(_key(job_id, "chunks"))
            flushed, chunks = pipe.execute()
        return flushed == chunks

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
                _key(job_id, "sent_at"),
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
        """A new cap (None: none); on a stopped job, what dead workers held is let go.

        Spending is counted only while a cap is set: a job given one late passes in the ledger's cost
        so far as `spent_at_least_usd`.
        """
        cap = "" if usd is None else round(usd * 1_000_000)
        floor = round(spent_at_least_usd * 1_000_000)
        self._set_budget(keys=[_key(job_id, "meta"), _key(job_id, "budget")], args=[cap, floor])

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
        self._settle_budget(keys=[_key(job_id, "budget")], args=[held_micro_usd, spent_micro_usd])

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
        answered = int(usage.answered)
        args: list[object] = [outcome.row, outcome.model_dump_json(), outcome.status, model, answered, chunk_id]
        for name in _USAGE_FIELDS:
            args.extend((name, getattr(usage, name)))
        committed = self._commit(
            keys=[
                _key(job_id, "results", chunk_id),
                _key(job_id, "counters"),
                _key(job_id, "ledger"),
                _key(job_id, "flushed"),
                _key(job_id, "paid_twice"),
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

