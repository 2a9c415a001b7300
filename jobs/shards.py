"""Result shards: a finished chunk's outcomes leave Redis for a file in the job's output folder.

    OUT/shards/.job           the job id, written at submit: a worker that finds it here sees the
                              folder the submitter sees (the same machine or a shared filesystem)
    OUT/shards/CHUNK.jsonl    one outcome per line, in row order

A shard is written beside its name, synced and renamed into place, and only then is the chunk marked
flushed in Redis (which frees its results and payload there). A crash between the two leaves the
outcomes in Redis and the shard written again by the next flush. A worker that cannot see the
submitter's folder (another machine, no shared filesystem) leaves its outcomes in Redis, and
`export` flushes them from the submitter's side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import orjson

from promptmill.jobs.files import atomic_write
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.store import JobStore
from promptmill.pipelines.items import ItemOutcome

_MARKER = ".job"
_PAGE = 64  # chunks read from Redis per round trip when merging


class ShardError(RuntimeError):
    pass


def shard_dir(spec: JobSpec) -> Path:
    return Path(spec.out_dir) / "shards"


def prepare_shards(spec: JobSpec) -> None:
    """Create the job's shard folder and its marker (on the submitter's side)."""
    folder = shard_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MARKER).write_text(spec.job_id)


def shards_reachable(spec: JobSpec) -> bool:
    """Does this process see the submitter's shard folder?"""
    try:
        return (shard_dir(spec) / _MARKER).read_text().strip() == spec.job_id
    except OSError:
        return False


def _shard_path(spec: JobSpec, chunk_id: str) -> Path:
    return shard_dir(spec) / f"{chunk_id}.jsonl"


def _write_shard(path: Path, outcomes: list[ItemOutcome]) -> None:
    # The shard and its folder entry are on disk before Redis lets go of its copy.
    with atomic_write(path) as handle:
        for outcome in outcomes:
            handle.write(orjson.dumps(outcome.model_dump(mode="json")) + b"\n")


def flush_chunk(store: JobStore, spec: JobSpec, chunk_id: str) -> bool:
    """Move a complete chunk's outcomes to its shard; False if it is incomplete or already flushed."""
    if store.chunks.is_flushed(spec.job_id, chunk_id):
        return False
    (outcomes,) = store.chunks.outcomes(spec.job_id, [chunk_id])
    if len(outcomes) < store.chunks.row_count(spec.job_id, chunk_id):
        return False
    _write_shard(_shard_path(spec, chunk_id), outcomes)
    store.chunks.mark_flushed(spec.job_id, chunk_id)
    return True


def flush_complete_chunks(store: JobStore, spec: JobSpec) -> int:
    """Flush every complete chunk still in Redis (export does this for workers that could not)."""
    flushed = store.chunks.flushed(spec.job_id)
    pending = [chunk_id for chunk_id in store.chunks.ids(spec.job_id) if chunk_id not in flushed]
    return sum(flush_chunk(store, spec, chunk_id) for chunk_id in pending)


def _read_shard(spec: JobSpec, chunk_id: str) -> list[ItemOutcome]:
    path = _shard_path(spec, chunk_id)
    try:
        with path.open("rb") as handle:
            return [ItemOutcome.model_validate(orjson.loads(line)) for line in handle if line.strip()]
    except FileNotFoundError:
        raise ShardError(
            f"chunk {chunk_id} of job {spec.job_id} was flushed to {path}, which is missing; "
            "run this command where the job's output folder is"
        ) from None


def outcomes_by_chunk(store: JobStore, spec: JobSpec) -> Iterator[tuple[str, list[ItemOutcome]]]:
    """Each chunk's committed outcomes in input order, from its shard or from Redis."""
    chunk_ids = store.chunks.ids(spec.job_id)
    flushed = store.chunks.flushed(spec.job_id)
    for start in range(0, len(chunk_ids), _PAGE):
        page = chunk_ids[start : start + _PAGE]
        unflushed = [chunk_id for chunk_id in page if chunk_id not in flushed]
        in_redis = dict(zip(unflushed, store.chunks.outcomes(spec.job_id, unflushed)))
        if unflushed:
            flushed = store.chunks.flushed(spec.job_id)  # a worker may have flushed one as we read it
        for chunk_id in page:
            yield chunk_id, _read_shard(spec, chunk_id) if chunk_id in flushed else in_redis[chunk_id]


def iter_outcomes(store: JobStore, spec: JobSpec) -> Iterator[ItemOutcome]:
    """Every committed outcome of the job in input order, from its shards and from Redis."""
    for _, outcomes in outcomes_by_chunk(store, spec):
        yield from outcomes
