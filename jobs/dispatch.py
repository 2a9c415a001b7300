"""Hands chunks to the Celery workers, by task name: the submitting side never imports the workers."""

from __future__ import annotations

from celery import Celery

from config.celery_config import TASK_RUN_CHUNK, celery_config


class ChunkDispatcher:
    def __init__(self, redis_url: str):
        self.app = Celery("promptmill-submit")
        self.app.conf.update(celery_config(redis_url))

    def send(self, job_id: str, chunk_id: str, queue: str) -> None:
        self.app.send_task(TASK_RUN_CHUNK, args=(job_id, chunk_id), queue=queue)

    def close(self) -> None:
        self.app.close()
