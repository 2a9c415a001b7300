"""The Celery app. Its broker is the job store's Redis, set by `configure` before a worker starts."""

from __future__ import annotations

from celery import Celery

from config.celery_config import QUEUES, celery_config
from config.settings import get_settings

app = Celery("promptmill", include=["workers.tasks", "workers.sweeper", "workers.redis_health"])


def configure(redis_url: str) -> Celery:
    app.conf.update(celery_config(redis_url))
    app.conf.task_queues = None  # kombu builds one queue per name given to the worker
    return app


_url = get_settings().redis_url
if _url:
    configure(_url)

__all__ = ["QUEUES", "app", "configure"]
