"""The Redis job store: a job's spec, state and counters, and the stores of its parts.

`JobStore` owns a job's life (created, producing, running, stopped, finished, expired, deleted);
its chunks and results (`store.chunks`), its budget (`store.budgets`) and the fleet's rate limits
(`store.limits`) each have a store of their own on the same client. Key names: jobs/state/keys.py.
"""

from __future__ import annotations

import time
from typing import Iterator

import orjson
import redis

from promptmill.config.celery_config import REDIS_CONNECTION_OPTIONS
from promptmill.jobs.state.batches import BatchStore
from promptmill.jobs.state.budget import BudgetStore
from promptmill.jobs.state.chunks import ChunkStore
from promptmill.jobs.state.fair import FairStore
from promptmill.jobs.state.keys import (
    COUNTER_FAILED,
    COUNTER_OK,
    JOBS_INDEX,
    NAMES_KEY,
    META_CREATED_AT,
    META_ERROR,
    META_FINISHED_AT,
    META_INPUT_SHA256,
    META_ENGINE,
    META_LIMIT_SCOPE,
    META_PRIORITY,
    META_PRODUCED,
    META_ROWS_PRODUCED,
    META_STATE,
    JobKeys,
    lua,
)
from promptmill.jobs.state.limits import LimitStore
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState, JobStatus, LedgerPart


def connect(url: str, **options: object) -> redis.Redis:
    """A client with socket timeouts, keepalive and health checks: a silent network drop fails its
    command instead of hanging it. `redis://:PASSWORD@host:port/db` and `rediss://` URLs work."""
    return redis.Redis.from_url(url, **{**REDIS_CONNECTION_OPTIONS, **options})


# The producer is done: running, unless the job was cancelled, failed or paused meanwhile.
_FINISH_PRODUCING = lua("""
redis.call('HSET', KEYS[1], $PRODUCED, 1)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], $SHA256, ARGV[1]) end
if redis.call('HGET', KEYS[1], $STATE) == $PRODUCING then redis.call('HSET', KEYS[1], $STATE, $RUNNING) end
return 1
""", PRODUCED=META_PRODUCED, SHA256=META_INPUT_SHA256, STATE=META_STATE, PRODUCING=JobState.producing,
    RUNNING=JobState.running)


# HSET KEYS[1] ARGV[1] ARGV[2] while the job (its spec, KEYS[2]) exists: a late write never brings a
# deleted job's key back.
_SET_IF_JOB = "if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 1"


class JobStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self.chunks = ChunkStore(client)
        self.budgets = BudgetStore(client)
        self.limits = LimitStore(client)
        self.batches = BatchStore(client)
        self.fair = FairStore(client)
        self._finish_producing = client.register_script(_FINISH_PRODUCING)

    @classmethod
    def from_url(cls, url: str, **options: object) -> "JobStore":
        return cls(connect(url, **options))

    def create_job(self, spec: JobSpec) -> None:
        created = self.redis.set(JobKeys(spec.job_id).spec, spec.model_dump_json(), nx=True)
        if not created:
            raise ValueError(f"job {spec.job_id} already exists")
        now = time.time()
        with self.redis.pipeline() as pipe:
            meta = {
                META_STATE: JobState.producing, META_ROWS_PRODUCED: 0, META_CREATED_AT: now, META_PRIORITY: spec.priority
            }  # fmt: skip
            pipe.hset(JobKeys(spec.job_id).meta, mapping=meta)
            pipe.zadd(JOBS_INDEX, {spec.job_id: now})
            pipe.execute()

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(JobKeys(job_id).spec))

    def spec(self, job_id: str) -> JobSpec:
        raw = self.redis.get(JobKeys(job_id).spec)
        if raw is None:
            raise KeyError(f"no job {job_id!r} in this Redis")
        return JobSpec.model_validate_json(raw)

    def job_ids(self) -> list[str]:
        """The jobs in this Redis, oldest first; those whose keys expired or were deleted leave the index."""
        ids = [raw.decode() for raw in self.redis.zrange(JOBS_INDEX, 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(JobKeys(job_id).spec)
            alive = pipe.execute()
        gone = [job_id for job_id, present in zip(ids, alive) if not present]
        if gone:
            self.redis.zrem(JOBS_INDEX, *gone)
        return [job_id for job_id, present in zip(ids, alive) if present]

    def _job_keys(self, job_id: str) -> Iterator[bytes]:
        # Braces are literal in a SCAN pattern; they hold every key of the job.
        return self.redis.scan_iter(match=JobKeys(job_id).pattern, count=1000)

    def delete_job(self, job_id: str) -> int:
        """Remove every Redis key of the job; returns how many there were. The spec goes first: from
        then on a late answer's commit (and every write guarded by it) writes nothing."""
        self.fair.leave(job_id)
        deleted = self.redis.unlink(JobKeys(job_id).spec)
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

    def forget_names(self, job_id: str) -> int:
        """Drop the Python API's names of the job (a job deleted by hand, with its files: the same
        `pm.run` then runs anew instead of finding it). Its keys merely expiring keep its names."""
        named = [name for name, found in self.redis.hscan_iter(NAMES_KEY) if orjson.loads(found).get("job_id") == job_id]
        return self.redis.hdel(NAMES_KEY, *named) if named else 0

    def running_chunks(self, job_id: str) -> int:
        """Runs of the job's chunks holding a lease now (workers still on it)."""
        return sum(1 for _ in self.redis.scan_iter(match=JobKeys(job_id).lease("*"), count=1000))

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
        if self.redis.ttl(JobKeys(job_id).meta) != -1:
            return False
        self.redis.hsetnx(JobKeys(job_id).meta, META_FINISHED_AT, time.time())
        self.expire_job(job_id, ttl_s)
        return True

    def reopen(self, job_id: str) -> None:
        """A finished job runs again (`resume --retry-failed`): its keys no longer expire."""
        self.expire_job(job_id, None)
        self.redis.hdel(JobKeys(job_id).meta, META_FINISHED_AT)

    def add_host(self, job_id: str, host: str) -> None:
        self.redis.sadd(JobKeys(job_id).hosts, host)

    def hosts(self, job_id: str) -> list[str]:
        return sorted(raw.decode() for raw in self.redis.smembers(JobKeys(job_id).hosts))

    def stored_state(self, job_id: str) -> JobState:
        raw = self.redis.hget(JobKeys(job_id).meta, META_STATE)
        return JobState(raw.decode()) if raw else JobState.failed

    def set_state(self, job_id: str, state: JobState, error: str | None = None) -> None:
        assert state is not JobState.complete, "complete is derived, never stored"
        with self.redis.pipeline() as pipe:
            pipe.hset(JobKeys(job_id).meta, META_STATE, state)
            if error is None:
                pipe.hdel(JobKeys(job_id).meta, META_ERROR)
            else:
                pipe.hset(JobKeys(job_id).meta, META_ERROR, error)
            pipe.execute()
        if state in (JobState.cancelled, JobState.failed):
            self.fair.leave(job_id)  # an ended job takes no turn of the fleet's

    def tell_engine(self, job_id: str, stage: str) -> None:
        """What the local engine serving the job is doing while it starts (`status`, the progress bar);
        nothing for a deleted job."""
        keys = JobKeys(job_id)
        self.redis.eval(_SET_IF_JOB, 2, keys.meta, keys.spec, META_ENGINE, stage)

    def fail_job(self, job_id: str, error: str) -> None:
        """A fatal error: stop every worker on the job, keep every committed result."""
        self.set_state(job_id, JobState.failed, error)

    def pause(self, job_id: str) -> bool:
        """Pause a running job: its workers commit the answers on the wire and send nothing more until
        a resume. False: it was not running."""
        if not self.status(job_id).state.runnable:
            return False
        self.set_state(job_id, JobState.paused, f"paused by the user; `promptmill resume {job_id}` goes on")
        return True

    def is_runnable(self, job_id: str) -> bool:
        return self.stored_state(job_id).runnable

    def finish_producing(self, job_id: str, input_sha256: str | None = None) -> None:
        self._finish_producing(keys=[JobKeys(job_id).meta], args=[input_sha256 or ""])

    def status(self, job_id: str) -> JobStatus:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(JobKeys(job_id).meta)
            pipe.hgetall(JobKeys(job_id).counters)
            pipe.hgetall(JobKeys(job_id).ledger)
            pipe.hgetall(JobKeys(job_id).paid_twice)
            meta, counters, ledger_raw, paid_twice = pipe.execute()
        if not meta:
            raise KeyError(f"no job {job_id!r} in this Redis")
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        ledger = LedgerPart.parse(ledger_raw)
        status = JobStatus(
            job_id=job_id,
            state=JobState(meta.get(META_STATE, JobState.failed)),
            error=meta.get(META_ERROR),
            produced=meta.get(META_PRODUCED) == "1",
            rows_produced=int(meta.get(META_ROWS_PRODUCED, 0)),
            ok=int(counters.get(COUNTER_OK.encode(), 0)),
            failed=int(counters.get(COUNTER_FAILED.encode(), 0)),
            usage_by_model=ledger.usage_by_model,
            requests_by_model=ledger.requests_by_model,
            failed_attempts_by_model=ledger.failed_attempts_by_model,
            limit_scope=meta.get(META_LIMIT_SCOPE),
            engine=meta.get(META_ENGINE),
            paid_twice=LedgerPart.parse(paid_twice),
            created_at=float(meta[META_CREATED_AT]) if META_CREATED_AT in meta else None,
            finished_at=float(meta[META_FINISHED_AT]) if META_FINISHED_AT in meta else None,
            input_sha256=meta.get(META_INPUT_SHA256),
        )
        if status.state is JobState.running and status.produced and status.pending <= 0:
            status.state = JobState.complete
        return status

    def take_sweep_turn(self, job_id: str, every_s: float) -> bool:
        """True for one caller per `every_s` across the fleet."""
        return bool(self.redis.set(JobKeys(job_id).sweep, 1, nx=True, px=int(every_s * 1000)))
