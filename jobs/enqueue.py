"""The one way a job's chunks reach the workers, for `run`, `submit` and `resume` alike."""

from __future__ import annotations

from typing import Callable

from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.producer import produce
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore


def enqueue(
    store: JobStore,
    spec: JobSpec,
    sender: ChunkSender,
    max_pending_rows: int | None,
    resuming: bool = False,
    on_chunk: Callable[[], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> int:
    """Send the job's chunks; returns the rows the producer read (0 when it had finished before).

    On resume, the chunks already stored and not complete go first; then the producer goes on from
    where it stopped, sending each chunk as it stores it and waiting while `max_pending_rows` rows
    wait for workers. Every chunk waits its job's turn among the jobs on its queue (fair shares:
    jobs/dispatch.py). `on_chunk` runs after each chunk, `on_wait` while the producer waits.
    """
    if resuming:
        incomplete = [int(chunk_id) for chunk_id in store.chunks.incomplete(spec.job_id)]
        sender.send_fairly(store.fair, spec, incomplete, every_waiting=True)
    if store.status(spec.job_id).produced:
        return 0

    def send(chunk, added: bool) -> None:
        if added and chunk.requests:
            sender.send_fairly(store.fair, spec, [chunk.first_row])
        if on_chunk is not None:
            on_chunk()

    return produce(spec, store, on_chunk=send, max_pending_rows=max_pending_rows, on_wait=on_wait)
