"""One run of a chunk's rows in a worker: the chunk, the model of its fallback chain it runs on, its
lease, and every read and write the run makes of the chunk's state.

A chunk's own run (`link` 0) sends its rows but those handed to another queue's model; a hand-off
run (`link` L) sends the rows handed to model L of the chain, and commits them into the chunk.
"""

from __future__ import annotations

import socket

from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.chunks import HandOff, run_id
from promptmill.jobs.state.lease import ChunkLease
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ItemOutcome, RenderedRequest, Usage


class ChunkRun:
    def __init__(self, store: JobStore, job: JobSpec, chunk_id: str, link: int, lease_ttl_s: float):
        self.store, self.job, self.chunk_id, self.link = store, job, chunk_id, link
        self.job_id = job.job_id
        self.run_id = run_id(chunk_id, link)  # what the run is leased, counted and swept under
        self.lease = ChunkLease(store.redis, job.job_id, self.run_id, lease_ttl_s)

    @property
    def model_job(self) -> JobSpec:
        """The job as the run's model of the chain runs it (the job itself for a chunk's own run)."""
        return self.job.links()[self.link]

    # -- its start ------------------------------------------------------------------------------------

    def begin(self) -> tuple[int, list[RenderedRequest]]:
        """Count the run (for the poison-row guard) and name its host; returns the runs so far, this
        one included, and the rows it is to send: not done, and its own (see the module's docstring)."""
        runs = self.lease.count_run()
        self.store.add_host(self.job_id, socket.gethostname())
        done = self.store.chunks.done_rows(self.job_id, self.chunk_id)
        handed = {row: handoff.link for row, handoff in self.handed().items()}
        requests = self.store.chunks.get(self.job_id, self.chunk_id).requests
        return runs, [r for r in requests if r.row not in done and handed.get(r.row, 0) == self.link]

    def flushed(self) -> bool:
        """Is the chunk done and gone to its shard (a redelivery of a finished chunk)?"""
        return self.store.chunks.is_flushed(self.job_id, self.chunk_id)

    def runnable(self) -> bool:
        """Does the job still run (not cancelled, failed, paused or deleted)?"""
        return self.store.is_runnable(self.job_id)

    # -- its rows -----------------------------------------------------------------------------------

    def handed(self) -> dict[int, HandOff]:
        """The chunk's rows waiting on another queue's model, with what they carry."""
        return self.store.chunks.handed(self.job_id, self.chunk_id)

    def failed_attempts(self) -> dict[int, int]:
        return self.store.chunks.failed_attempts(self.job_id, self.chunk_id)

    def add_failed_attempt(self, row: int, model: str, billed: tuple[str, Usage] | None = None) -> int:
        return self.store.chunks.add_failed_attempt(self.job_id, self.chunk_id, row, model, billed)

    def commit(self, model: str, outcome: ItemOutcome) -> int:
        """The row's outcome, once: what the commit did (jobs/state/chunks.py COMMITTED, DONE, GONE, LATE)."""
        return self.store.chunks.commit(self.job_id, self.chunk_id, model, outcome)

    def hand_off(self, row: int, handoff: HandOff) -> bool:
        return self.store.chunks.hand_off(self.job_id, self.chunk_id, row, handoff)

    def count_row_starts(self, rows: list[int]) -> dict[int, int]:
        return self.store.chunks.count_row_starts(self.job_id, self.chunk_id, rows)

    # -- its messages -------------------------------------------------------------------------------

    def sent_later(self, at: float) -> None:
        """Its message waits until `at` (a delayed retry): the sweeper must not count it stranded."""
        self.store.chunks.sent_later(self.job_id, self.run_id, at)

    def other_links(self) -> list[int]:
        """The chain's models (other than this run's) that rows of the chunk were handed to."""
        return sorted({handoff.link for handoff in self.handed().values()} - {self.link})

    def sent_to(self, link: int) -> None:
        """The run of the rows handed to `link` was just sent."""
        self.store.chunks.sent_now(self.job_id, run_id(self.chunk_id, link))
