"""The job's output folder: result shards, where a finished chunk's outcomes go when they leave Redis,
and its local workers' logs.

    OUT/shards/.job             the ids of the jobs writing here, a line each, added at submit: a
                                worker that finds its job here sees the folder the submitter sees (the
                                same machine or a shared filesystem)
    OUT/shards/JOB.CHUNK.jsonl  one outcome per line, in row order; named by the job too, so that two
                                jobs may share a folder
    OUT/logs/JOB.worker-QUEUE-N.log   `run`'s local workers' logs

A shard is written beside its name, synced and renamed into place, and only then is the chunk marked
flushed in Redis (which frees its results and payload there). A crash between the two leaves the
outcomes in Redis and the shard written again by the next flush. A worker that cannot see the
submitter's folder (another machine, no shared filesystem) leaves its outcomes in Redis, and
`export` flushes them from the submitter's side.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

import orjson

from promptmill.jobs.files import atomic_write
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ItemOutcome

_MARKER = ".job"
_PAGE = 64  # chunks read from Redis per round trip when merging


class ShardError(RuntimeError):
    pass


def shard_dir(spec: JobSpec) -> Path:
    return Path(spec.out_dir) / "shards"


def marked_jobs(folder: Path) -> list[str]:
    """The jobs the shard folder's marker names (none where it has no marker)."""
    try:
        return (folder / _MARKER).read_text().split()
    except OSError:
        return []


def prepare_shards(spec: JobSpec) -> None:
    """Create the job's shard folder and name the job in its marker (on the submitter's side)."""
    folder = shard_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.job_id not in marked_jobs(folder):
        with (folder / _MARKER).open("a") as marker:
            marker.write(spec.job_id + "\n")


def unmark(spec: JobSpec) -> None:
    """Take the job out of its shard folder's marker (the marker goes with the last job)."""
    folder = shard_dir(spec)
    rest = [job_id for job_id in marked_jobs(folder) if job_id != spec.job_id]
    marker = folder / _MARKER
    if rest:
        with atomic_write(marker) as handle:
            handle.write("".join(f"{job_id}\n" for job_id in rest).encode())
    else:
        marker.unlink(missing_ok=True)


def shards_reachable(spec: JobSpec) -> bool:
    """Does this process see the submitter's shard folder?"""
    return spec.job_id in marked_jobs(shard_dir(spec))


def shard_paths(spec: JobSpec) -> list[Path]:
    """The job's shard files in its folder (the files it may remove: nobody else's)."""
    return sorted(shard_dir(spec).glob(f"{glob.escape(spec.job_id)}.*.jsonl"))


def _shard_path(spec: JobSpec, chunk_id: str) -> Path:
    return shard_dir(spec) / f"{spec.job_id}.{chunk_id}.jsonl"


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
    rows = store.chunks.row_count(spec.job_id, chunk_id)
    if rows == 0 or len(outcomes) < rows:  # no rows known: the job was deleted under us
        return False
    _write_shard(_shard_path(spec, chunk_id), outcomes)
    store.chunks.mark_flushed(spec.job_id, chunk_id, len(spec.links()))
    return True


def flush_complete_chunks(store: JobStore, spec: JobSpec) -> int:
    """Flush every complete chunk still in Redis (export does this for workers that could not)."""
    flushed = store.chunks.flushed(spec.job_id)
    pending = [chunk_id for chunk_id in store.chunks.ids(spec.job_id) if chunk_id not in flushed]
    return sum(flush_chunk(store, spec, chunk_id) for chunk_id in pending)


def shard_lines(spec: JobSpec, chunk_id: str) -> list[bytes]:
    """A flushed chunk's outcomes as their JSON lines, in row order (ShardError if its shard is missing)."""
    path = _shard_path(spec, chunk_id)
    legacy = shard_dir(spec) / f"{chunk_id}.jsonl"  # flushed before shards named their job, by its only job
    if not path.exists() and legacy.exists() and marked_jobs(shard_dir(spec)) == [spec.job_id]:
        path = legacy
    try:
        return [line for line in path.read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        raise ShardError(
            f"chunk {chunk_id} of job {spec.job_id} was flushed to {path}, which is missing; "
            "run this command where the job's output folder is"
        ) from None


def _read_shard(spec: JobSpec, chunk_id: str) -> list[ItemOutcome]:
    return [ItemOutcome.model_validate(orjson.loads(line)) for line in shard_lines(spec, chunk_id)]


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


def worker_log(log_dir: Path, job_id: str, queue: str, index: int) -> Path:
    """A local worker's log, named by its job: jobs sharing an output folder keep their own."""
    return log_dir / f"{job_id}.worker-{queue}-{index}.log"


def worker_logs(log_dir: Path, job_id: str) -> list[Path]:
    """The job's local workers' logs (the ones `delete --files` may remove)."""
    return sorted(log_dir.glob(f"{glob.escape(job_id)}.worker-*.log"))
