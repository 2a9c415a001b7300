"""A job's chunks in Redis: their requests, their rows' outcomes and done marks, and their flushing.

A row's outcome is committed with its done mark and its usage in one atomic step, once; a chunk whose
outcomes are safe in its shard on disk is flushed: marked, and everything it held in Redis freed.
"""

from __future__ import annotations

import logging
import time

import orjson
import redis
from pydantic import BaseModel

from promptmill.jobs.state.chunk_scripts import (
    ADD_CHUNK,
    COMMIT,
    FAILED_ATTEMPT,
    HAND_OFF,
    MARK_FLUSHED,
    REQUEUE_FAILED,
    SWEEP,
)
from promptmill.jobs.state.keys import LEDGER_REQUESTS, META_ROWS_PRODUCED, JobKeys
from promptmill.jobs.state.status import LedgerPart
from promptmill.pipelines.items import AttemptError, ItemOutcome, RenderedRequest, Usage

_USAGE_FIELDS = tuple(Usage.model_fields)
COMMITTED, DONE, GONE, LATE = 1, 0, -1, -2  #: what a commit did (ChunkStore.commit)
log = logging.getLogger(__name__)


class ChunkPayload(BaseModel):
    chunk_id: str
    first_row: int
    row_count: int
    requests: list[RenderedRequest]


def chunk_id_for(first_row: int) -> str:
    return f"{first_row:010d}"


class HandOff(BaseModel):
    """A row gone on to a model of its fallback chain that another queue serves (a vLLM engine on a
    gpu worker for an api job): the model, and what the row went through before, for its record."""

    link: int  # the model, as an index into JobSpec.links()
    models_tried: list[str]
    attempts: int
    errors: list[AttemptError]
    started_at: float | None


def run_id(chunk_id: str, link: int) -> str:
    """What a run of a chunk's rows is leased and counted under: the chunk, or its rows handed to `link`."""
    return f"{chunk_id}@{link}" if link else chunk_id


def parse_run_id(run: str) -> tuple[str, int]:
    chunk_id, _, link = run.partition("@")
    return chunk_id, int(link or 0)


class ChunkStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        scripts = (COMMIT, ADD_CHUNK, MARK_FLUSHED, SWEEP, REQUEUE_FAILED, HAND_OFF, FAILED_ATTEMPT)
        (self._commit, self._add_chunk, self._mark_flushed, self._sweep, self._requeue_failed, self._hand_off,
         self._failed_attempt) = (client.register_script(lua) for lua in scripts)  # fmt: skip

    def add(self, job_id: str, chunk: ChunkPayload) -> bool:
        """Store a chunk once; returns False when it was already there (a producer re-run)."""
        added = self._add_chunk(
            keys=[
                JobKeys(job_id).chunk(chunk.chunk_id),
                JobKeys(job_id).chunks,
                JobKeys(job_id).chunk_rows,
                JobKeys(job_id).meta,
            ],
            args=[chunk.model_dump_json(exclude_none=True), chunk.chunk_id, chunk.row_count, META_ROWS_PRODUCED],
        )
        return bool(added)

    def get(self, job_id: str, chunk_id: str) -> ChunkPayload:
        raw = self.redis.get(JobKeys(job_id).chunk(chunk_id))
        if raw is None:
            raise KeyError(f"job {job_id} has no chunk {chunk_id}")
        return ChunkPayload.model_validate_json(raw)

    def last_chunk_first_row(self, job_id: str) -> int | None:
        """Where the producer stopped: the first row of the last chunk it stored."""
        raw = self.redis.lindex(JobKeys(job_id).chunks, -1)
        return None if raw is None else int(raw)

    def ids(self, job_id: str) -> list[str]:
        return [raw.decode() for raw in self.redis.lrange(JobKeys(job_id).chunks, 0, -1)]

    def done_rows(self, job_id: str, chunk_id: str) -> set[int]:
        """Rows of an unflushed chunk that have their outcome (a flushed chunk has all of them)."""
        return {int(raw) for raw in self.redis.hkeys(JobKeys(job_id).results(chunk_id))}

    def row_count(self, job_id: str, chunk_id: str) -> int:
        return int(self.redis.hget(JobKeys(job_id).chunk_rows, chunk_id) or 0)

    def incomplete(self, job_id: str) -> list[str]:
        chunk_ids = self.ids(job_id)
        row_counts = self.redis.hgetall(JobKeys(job_id).chunk_rows)
        flushed = self.flushed(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id in chunk_ids:
                pipe.hlen(JobKeys(job_id).results(chunk_id))
            done_counts = pipe.execute()
        return [
            chunk_id
            for chunk_id, done in zip(chunk_ids, done_counts)
            if chunk_id not in flushed and done < int(row_counts[chunk_id.encode()])
        ]

    def lost(
        self, job_id: str, queue_empty: bool, stranded_after_s: float, empty_links: list[int] = (),
        lease_s: float = 15.0,
    ) -> list[str]:
        """The job's lost runs (see `run_id`), each marked as sent again now (see `SWEEP`): the
        caller sends them. `empty_links`: the chain's models whose queue is empty; `lease_s`: how long
        a picked chunk may wait to start."""
        keys = ["chunks", "chunk_rows", "flushed", "chunk_runs", "resent", "sent_at", "ready"]
        lost = self._sweep(
            keys=[getattr(JobKeys(job_id), name) for name in keys],
            args=[time.time(), stranded_after_s, int(queue_empty), JobKeys(job_id).prefix,
                  orjson.dumps(list(empty_links)).decode(), lease_s],
        )  # fmt: skip
        return [raw.decode() for raw in lost]

    def hand_off(self, job_id: str, chunk_id: str, row: int, handoff: HandOff) -> bool:
        """Mark a row as gone on to another queue's model; False if it is done already."""
        keys = [JobKeys(job_id).results(chunk_id), JobKeys(job_id).handed(chunk_id), JobKeys(job_id).spec]
        return bool(self._hand_off(keys=keys, args=[row, handoff.model_dump_json()]))

    def handed(self, job_id: str, chunk_id: str) -> dict[int, HandOff]:
        """The chunk's rows waiting on another queue's model (a row's mark goes with its outcome)."""
        raw = self.redis.hgetall(JobKeys(job_id).handed(chunk_id))
        return {int(row): HandOff.model_validate_json(value) for row, value in raw.items()}

    def sent_now(self, job_id: str, run: str) -> None:
        """A run's message was just sent: the sweeper gives it its time before calling it stranded."""
        self.redis.hset(JobKeys(job_id).sent_at, run, time.time())

    def count_row_starts(self, job_id: str, chunk_id: str, rows: list[int]) -> dict[int, int]:
        """Count these rows as sent once more; returns each one's count, this start included."""
        with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hincrby(JobKeys(job_id).row_starts(chunk_id), row, 1)
            return dict(zip(rows, map(int, pipe.execute())))

    def flushed(self, job_id: str) -> set[str]:
        return {raw.decode() for raw in self.redis.smembers(JobKeys(job_id).flushed)}

    def rows_in_redis(self, job_id: str) -> int:
        """Rows enqueued whose chunk is not yet flushed: what the job holds in Redis now."""
        produced = int(self.redis.hget(JobKeys(job_id).meta, META_ROWS_PRODUCED) or 0)
        flushed = list(self.flushed(job_id))
        counts = self.redis.hmget(JobKeys(job_id).chunk_rows, flushed) if flushed else []
        return produced - sum(int(count) for count in counts if count)

    def all_flushed(self, job_id: str) -> bool:
        """Is every chunk's outcome in its shard on disk (nothing of the job's results only in Redis)?"""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.scard(JobKeys(job_id).flushed)
            pipe.llen(JobKeys(job_id).chunks)
            flushed, chunks = pipe.execute()
        return flushed == chunks

    def is_flushed(self, job_id: str, chunk_id: str) -> bool:
        return bool(self.redis.sismember(JobKeys(job_id).flushed, chunk_id))

    def mark_flushed(self, job_id: str, chunk_id: str, links: int = 1) -> None:
        """Call only once the chunk's outcomes are safely in its shard; `links`: the models of the
        job's fallback chain (each may have had a run of the chunk's rows)."""
        self._mark_flushed(
            keys=[
                JobKeys(job_id).flushed,
                JobKeys(job_id).results(chunk_id),
                JobKeys(job_id).chunk(chunk_id),
                JobKeys(job_id).attempts(chunk_id),
                JobKeys(job_id).row_starts(chunk_id),
                JobKeys(job_id).chunk_runs,
                JobKeys(job_id).resent,
                JobKeys(job_id).sent_at,
                JobKeys(job_id).batch_rows(chunk_id),
                JobKeys(job_id).handed(chunk_id),
                JobKeys(job_id).spec,
            ],
            args=[run_id(chunk_id, link) for link in range(links)],
        )

    def sent_later(self, job_id: str, chunk_id: str, at: float) -> None:
        """The chunk's message waits until `at` (a delayed retry): the sweeper must not count it stranded before."""
        self.redis.hset(JobKeys(job_id).sent_at, chunk_id, at)

    def failed_attempts(self, job_id: str, chunk_id: str) -> dict[int, int]:
        raw = self.redis.hgetall(JobKeys(job_id).attempts(chunk_id))
        return {int(row): int(count) for row, count in raw.items()}

    def add_failed_attempt(
        self, job_id: str, chunk_id: str, row: int, model: str, billed: tuple[str, Usage] | None = None
    ) -> int:
        """Count a failed attempt before retrying, so a resumed row does not start afresh; the ledger
        counts it too. A failure the API answers with an error is not billed; one it billed anyway (a
        stream broken off mid-answer: `billed` is the ledger model and its usage) goes into the ledger
        as a request, and into the `partial` hash, which no outcome accounts for. Returns the row's
        failed attempts (0: the job was deleted, nothing written)."""
        keys = JobKeys(job_id)
        args: list[object] = [row, model]
        if billed is not None and billed[1].answered:
            priced_as, usage = billed
            args += [priced_as, *(part for name in _USAGE_FIELDS for part in (name, getattr(usage, name)))]
        count = self._failed_attempt(keys=[keys.spec, keys.attempts(chunk_id), keys.ledger, keys.partial], args=args)
        return int(count)

    def partial_usage(self, job_id: str) -> LedgerPart:
        """What failed attempts were billed for (streams broken off): in the ledger, in no outcome."""
        return LedgerPart.parse(self.redis.hgetall(JobKeys(job_id).partial))

    def commit(self, job_id: str, chunk_id: str, model: str, outcome: ItemOutcome) -> int:
        """Commit an outcome with its done mark and usage, atomically: COMMITTED, DONE (the row was done
        already), GONE (its job was deleted), or LATE (its chunk is in its shard already, and the
        answer has a request id: `paid_twice` counts it unless the shard's outcome is the same answer)."""
        usage = outcome.usage
        answered = int(usage.answered)
        args: list[object] = [
            outcome.row, outcome.model_dump_json(), outcome.status, model, answered, chunk_id, outcome.request_id or ""
        ]  # fmt: skip
        for name in _USAGE_FIELDS:
            args.extend((name, getattr(usage, name)))
        committed = self._commit(
            keys=[
                JobKeys(job_id).results(chunk_id),
                JobKeys(job_id).counters,
                JobKeys(job_id).ledger,
                JobKeys(job_id).flushed,
                JobKeys(job_id).paid_twice,
                JobKeys(job_id).handed(chunk_id),
                JobKeys(job_id).spec,
            ],
            args=args,
        )
        if committed == GONE:
            log.warning("job %s is gone (deleted): the outcome of row %d is dropped", job_id, outcome.row)
        return int(committed)

    def paid_twice(self, job_id: str, model: str, usage: Usage) -> None:
        """An answer for a row done and flushed before it came, billed again: in the paid_twice ledger."""
        keys = JobKeys(job_id)
        if not self.redis.exists(keys.spec):
            return
        with self.redis.pipeline() as pipe:
            if usage.answered:
                pipe.hincrby(keys.paid_twice, f"{model}|{LEDGER_REQUESTS}", int(usage.answered))
            for name in _USAGE_FIELDS:
                if getattr(usage, name):
                    pipe.hincrby(keys.paid_twice, f"{model}|{name}", getattr(usage, name))
            pipe.execute()

    def outcomes(self, job_id: str, chunk_ids: list[str]) -> list[list[ItemOutcome]]:
        """The outcomes held in Redis for each of these chunks, each list in row order."""
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id in chunk_ids:
                pipe.hvals(JobKeys(job_id).results(chunk_id))
            pages = pipe.execute()
        return [
            sorted((ItemOutcome.model_validate(orjson.loads(raw)) for raw in values), key=lambda o: o.row)
            for values in pages
        ]

    def requeue_failed(
        self, job_id: str, chunk_id: str, payload: ChunkPayload, keep: list[ItemOutcome], retry: list[ItemOutcome]
    ) -> int:
        """Put these failed rows of a chunk back to pending with `payload` as the chunk's requests."""
        argument = {
            "chunk": chunk_id,
            "payload": payload.model_dump_json(exclude_none=True),
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
            JobKeys(job_id).results(chunk_id),
            JobKeys(job_id).counters,
            JobKeys(job_id).flushed,
            JobKeys(job_id).chunk(chunk_id),
            JobKeys(job_id).attempts(chunk_id),
            JobKeys(job_id).retried,
            JobKeys(job_id).batch_rows(chunk_id),
        ]
        return int(self._requeue_failed(keys=keys, args=[orjson.dumps(argument).decode()]))

    def retried_usage(self, job_id: str) -> LedgerPart:
        return LedgerPart.parse(self.redis.hgetall(JobKeys(job_id).retried))
