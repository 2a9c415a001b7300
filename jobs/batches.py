"""A job's provider batches in Redis: which batch holds each row's attempt, and what each batch holds.

A batch is recorded the moment the provider names it, before anyone waits on it: a run that follows a
kill finds its rows there and polls the batch instead of sending them again. A row's entry names the
attempt the batch carries, so a row whose result came back errored (its attempt counted) goes in a
new batch, while one whose worker died before counting it waits on the same batch again.
"""

from __future__ import annotations

import time
from collections import defaultdict

import orjson
import redis
from pydantic import BaseModel, Field

from promptmill.jobs.keys import JobKeys

ENDED = "ended"


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
    processing_status: str = "in_progress"  # in_progress | canceling | ended
    counts: BatchCounts = Field(default_factory=BatchCounts)
    checked_at: float | None = None

    @property
    def open(self) -> bool:
        return self.processing_status != ENDED


class BatchStore:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def record(self, job_id: str, batch_id: str, created_at: float, attempts: dict[str, dict[int, int]]) -> None:
        """The new batch and its rows (chunk -> row -> the attempt it carries), in one step."""
        keys = JobKeys(job_id)
        record = BatchRecord(
            batch_id=batch_id,
            created_at=created_at,
            requests=sum(len(rows) for rows in attempts.values()),
            counts=BatchCounts(processing=sum(len(rows) for rows in attempts.values())),
        )
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batches, batch_id, record.model_dump_json())
            for chunk_id, rows in attempts.items():
                pipe.hset(keys.batch_rows(chunk_id), mapping={row: f"{batch_id}|{n}" for row, n in rows.items()})
            pipe.execute()

    def holding(self, job_id: str, rows: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, int]]:
        """(chunk, row) -> (batch id, attempt) for each of these rows a batch holds."""
        by_chunk: dict[str, list[int]] = defaultdict(list)
        for chunk_id, row in rows:
            by_chunk[chunk_id].append(row)
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk_id, chunk_rows in by_chunk.items():
                pipe.hmget(JobKeys(job_id).batch_rows(chunk_id), chunk_rows)
            pages = pipe.execute()
        held = {}
        for (chunk_id, chunk_rows), values in zip(by_chunk.items(), pages):
            for row, raw in zip(chunk_rows, values):
                if raw is not None:
                    batch_id, attempt = raw.decode().rsplit("|", 1)
                    held[(chunk_id, row)] = (batch_id, int(attempt))
        return held

    def forget_row(self, job_id: str, chunk_id: str, row: int) -> None:
        """The row's batch will never answer it (canceled): its next run sends it in a new one."""
        self.redis.hdel(JobKeys(job_id).batch_rows(chunk_id), row)

    def update(self, job_id: str, batch_id: str, processing_status: str, counts: BatchCounts) -> None:
        raw = self.redis.hget(JobKeys(job_id).batches, batch_id)
        if raw is None:
            return  # the job was deleted under us
        record = BatchRecord.model_validate_json(raw)
        record = record.model_copy(update={"processing_status": processing_status, "counts": counts, "checked_at": time.time()})
        self.redis.hset(JobKeys(job_id).batches, batch_id, record.model_dump_json())

    def all(self, job_id: str) -> list[BatchRecord]:
        """The job's batches, oldest first."""
        records = [BatchRecord.model_validate(orjson.loads(raw)) for raw in self.redis.hvals(JobKeys(job_id).batches)]
        return sorted(records, key=lambda record: record.created_at)
