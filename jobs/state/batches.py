"""A job's provider batches in Redis: which batch holds each row's attempt, and what each batch holds.

A batch is intended before it is created: its rows are recorded under an intent (a fresh id, which
the batch's `custom_id`s carry, its time and its size) before the create goes out, and the intent
names the batch the moment the provider does. So a create whose answer was lost (a timeout, a dropped
connection, a worker killed before it recorded the batch) is looked for among the provider's batches
before the rows are sent again, instead of leaving a billed batch nobody reads. A run that follows a
kill finds its rows here and polls their batch instead of sending them again. A row's entry names the
attempt the batch carries, so a row whose result came back errored (its attempt counted) goes in a
new batch, while one whose worker died before counting it waits on the same batch again.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import orjson
import redis
from pydantic import BaseModel, Field

from promptmill.jobs.state.keys import JobKeys, batch_owner_key

ENDED = "ended"
# A batch's statuses once it is over: Anthropic's "ended", OpenAI's own four.
OVER = frozenset({ENDED, "completed", "failed", "expired", "cancelled"})
BATCH_OWNER_TTL_S = 86_400  # a batch's owner is known this long: a lost create is looked for within minutes


class BatchCounts(BaseModel):
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0


class BatchRecord(BaseModel):
    batch_id: str
    created_at: float  # epoch seconds
    requests: int
    processing_status: str = "in_progress"  # the provider's word: in_progress, canceling, ended, completed...
    counts: BatchCounts = Field(default_factory=BatchCounts)
    checked_at: float | None = None
    intent: str | None = None  # the prefix of its requests' custom_ids (None: a batch made before intents)
    files: dict[str, str] = Field(default_factory=dict)  # OpenAI's: input, output and error file ids

    @property
    def open(self) -> bool:
        return self.processing_status not in OVER


class BatchIntent(BaseModel):
    """A batch about to be created: the rows point at it before the provider has named it."""

    intent_id: str  # the prefix of the batch's custom_ids: "INTENT-ROW"
    at: float  # epoch seconds, just before the create went out
    requests: int
    batch_id: str | None = None  # the batch the provider made of it, once known
    unmade: bool = False  # no batch was made of it: its rows go in a new one
    input_file: str | None = None  # OpenAI's: the uploaded file of its requests, once uploaded


@dataclass(frozen=True)
class Holder:
    """What holds a row's attempt: a batch (by id), or an intent whose batch is not known yet."""

    attempt: int
    batch_id: str | None
    intent: str | None

class BatchStore:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def intend(self, job_id: str, intent: BatchIntent, attempts: dict[str, dict[int, int]]) -> None:
        """The batch about to be created and its rows (chunk -> row -> the attempt it carries), in one step."""
        keys = JobKeys(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch_intents, intent.intent_id, intent.model_dump_json())
            for chunk_id, rows in attempts.items():
                pipe.hset(keys.batch_rows(chunk_id), mapping={row: f"{intent.intent_id}|{n}" for row, n in rows.items()})
            pipe.execute()

    def note_file(self, job_id: str, intent: BatchIntent, file_id: str) -> BatchIntent:
        """The intent's requests were uploaded as this file (OpenAI's batches are made of a file)."""
        noted = intent.model_copy(update={"input_file": file_id})
        self.redis.hset(JobKeys(job_id).batch_intents, intent.intent_id, noted.model_dump_json())
        return noted

    def record(self, job_id: str, intent: BatchIntent, batch_id: str, created_at: float) -> None:
        """The provider made the intended batch: record it, name it in its intent, and mark it as this
        job's for the whole fleet (a lost create of another job's never takes it)."""
        keys = JobKeys(job_id)
        record = BatchRecord(batch_id=batch_id, created_at=created_at, requests=intent.requests,
                             counts=BatchCounts(processing=intent.requests), intent=intent.intent_id,
                             files={"input": intent.input_file} if intent.input_file else {})  # fmt: skip
        made = intent.model_copy(update={"batch_id": batch_id})
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(keys.batches, batch_id, record.model_dump_json())
            pipe.hset(keys.batch_intents, intent.intent_id, made.model_dump_json())
            pipe.set(batch_owner_key(batch_id), job_id, ex=BATCH_OWNER_TTL_S)
            pipe.execute()

    def unmade(self, job_id: str, intent: BatchIntent) -> None:
        """No batch was made of the intent: its rows are no longer held (their next run sends them)."""
        gone = intent.model_copy(update={"unmade": True})
        self.redis.hset(JobKeys(job_id).batch_intents, intent.intent_id, gone.model_dump_json())

    def intent(self, job_id: str, intent_id: str) -> BatchIntent | None:
        raw = self.redis.hget(JobKeys(job_id).batch_intents, intent_id)
        return None if raw is None else BatchIntent.model_validate_json(raw)

    def owned(self, batch_ids: list[str]) -> set[str]:
        """Those of these batches that a job of this Redis recorded as its own."""
        if not batch_ids:
            return set()
        owners = self.redis.mget([batch_owner_key(batch_id) for batch_id in batch_ids])
        return {batch_id for batch_id, owner in zip(batch_ids, owners) if owner is not None}

    def holding(self, job_id: str, rows: list[tuple[str, int]]) -> dict[tuple[str, int], Holder]:
        """(chunk, row) -> what holds its attempt, for each of these rows a batch (or an intent) holds."""
        by_chunk: dict[str, list[int]] = defaultdict(list)
        for chunk_id, row in rows:
            by_chunk[chunk_id].append(row)
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id, chunk_rows in by_chunk.items():
                pipe.hmget(JobKeys(job_id).batch_rows(chunk_id), chunk_rows)
            pages = pipe.execute()
        entries: dict[tuple[str, int], tuple[str, int]] = {}
        for (chunk_id, chunk_rows), values in zip(by_chunk.items(), pages):
            for row, raw in zip(chunk_rows, values):
                if raw is not None:
                    holder, attempt = raw.decode().rsplit("|", 1)
                    entries[(chunk_id, row)] = (holder, int(attempt))
        names = sorted({holder for holder, _ in entries.values()})
        found = self.redis.hmget(JobKeys(job_id).batch_intents, names) if names else []
        intents = {name: BatchIntent.model_validate_json(raw) for name, raw in zip(names, found) if raw is not None}
        held = {}
        for where, (holder, attempt) in entries.items():
            intent = intents.get(holder)
            if intent is None:  # a batch id: recorded before intents
                held[where] = Holder(attempt, holder, None)
            elif not intent.unmade:
                held[where] = Holder(attempt, intent.batch_id, intent.intent_id)
        return held

    def disown(self, job_id: str, batch_id: str, intent_id: str | None) -> None:
        """The batch taken for the intent's (after a lost create) holds none of its rows: it is no longer
        the job's, and never taken by this fleet again; the intent's batch is looked for again by the
        rows' next run (the one the provider did make of it, or none: then they go in a new one)."""
        intent = self.intent(job_id, intent_id) if intent_id else None
        with self.redis.pipeline() as pipe:
            pipe.hdel(JobKeys(job_id).batches, batch_id)
            pipe.set(batch_owner_key(batch_id), "another's", ex=BATCH_OWNER_TTL_S)
            if intent is not None and intent.batch_id == batch_id:
                pipe.hset(JobKeys(job_id).batch_intents, intent.intent_id, intent.model_copy(update={"batch_id": None}).model_dump_json())
            pipe.execute()

    def forget_row(self, job_id: str, chunk_id: str, row: int) -> None:
        """The row's batch will never answer it (canceled): its next run sends it in a new one."""
        self.redis.hdel(JobKeys(job_id).batch_rows(chunk_id), row)

    def update(
        self, job_id: str, batch_id: str, processing_status: str, counts: BatchCounts, files: dict[str, str] | None = None
    ) -> None:
        raw = self.redis.hget(JobKeys(job_id).batches, batch_id)
        if raw is None:
            return  # the job was deleted under us
        record = BatchRecord.model_validate_json(raw)
        changed = {"processing_status": processing_status, "counts": counts, "checked_at": time.time()}
        record = record.model_copy(update={**changed, "files": {**record.files, **(files or {})}})
        self.redis.hset(JobKeys(job_id).batches, batch_id, record.model_dump_json())

    def all(self, job_id: str) -> list[BatchRecord]:
        """The job's batches, oldest first."""
        records = [BatchRecord.model_validate(orjson.loads(raw)) for raw in self.redis.hvals(JobKeys(job_id).batches)]
        return sorted(records, key=lambda record: record.created_at)
