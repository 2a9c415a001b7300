"""The one chunk sender: hands chunks to the Celery workers by task name, from the submitting side
(run, submit, resume) and from the workers' sweeper alike. The sending side never imports the
workers; it only needs the tasks' names and the queue.

A job's chunks go out fairly (`send_fairly`): they wait in Redis and the queue gets as many
"pick the next chunk" messages, each of which sends the chunk that the jobs' fair shares say is next
by name (jobs/state/fair.py). A chunk sent by name (`send`) runs as soon as a worker takes its
message: a picked one, one whose worker died, a delayed retry, rows handed to another queue's model.
"""

from __future__ import annotations

from celery import Celery

from promptmill.config.celery_config import NEXT_PRIORITY, TASK_RUN_CHUNK, TASK_RUN_NEXT, celery_config
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.chunks import chunk_id_for
from promptmill.jobs.state.fair import FairStore


class ChunkSender:
    def __init__(self, app: Celery, owned: bool = False):
        self.app = app
        self._owned = owned  # made here for sending only: closed with the sender

    @classmethod
    def for_url(cls, redis_url: str) -> "ChunkSender":
        app = Celery("promptmill-submit")
        app.conf.update(celery_config(redis_url))
        return cls(app, owned=True)

    def send(self, job_id: str, chunk_id: str, queue: str, link: int = 0) -> None:
        """Send a chunk to its queue's workers; with `link`, only its rows handed to that model of
        its fallback chain (served on another queue)."""
        kwargs = {"link": link} if link else {}
        self.app.send_task(TASK_RUN_CHUNK, args=(job_id, chunk_id), kwargs=kwargs, queue=queue)

    def send_fairly(self, fair: FairStore, spec: JobSpec, first_rows: list[int], every_waiting: bool = False) -> int:
        """Let the job's chunks (by first row) wait for their turn on its queue, and send the queue the
        messages that run them; returns how many were sent (`every_waiting`: FairStore.add)."""
        chunks = [(first_row, chunk_id_for(first_row)) for first_row in first_rows]
        messages = fair.add(spec.job_id, spec.queue, chunks, every_waiting)
        self.send_next(spec.queue, messages)
        return messages

    def send_next(self, queue: str, count: int) -> None:
        """`count` messages that each pick the chunk next by the fair shares of `queue`, behind every
        chunk sent by name (NEXT_PRIORITY)."""
        for _ in range(count):
            self.app.send_task(TASK_RUN_NEXT, args=(queue,), queue=queue, priority=NEXT_PRIORITY)

    def close(self) -> None:
        if self._owned:
            self.app.close()
