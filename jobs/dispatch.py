"""The one chunk sender: hands a chunk to the Celery workers by task name, from the submitting side
(run, submit, resume) and from the workers' sweeper alike. The sending side never imports the
workers; it only needs the task's name and the queue."""

from __future__ import annotations

from celery import Celery

from promptmill.config.celery_config import TASK_RUN_CHUNK, celery_config


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

    def close(self) -> None:
        if self._owned:
            self.app.close()
