"""The Celery app. `configure` points it at the job store's Redis and hands the worker its settings."""

from __future__ import annotations

from celery import Celery

from promptmill.config.celery_config import celery_config
from promptmill.config.settings import Settings
from promptmill.workers import runtime

app = Celery(
    "promptmill",
    include=["promptmill.workers.tasks", "promptmill.workers.sweeper", "promptmill.workers.redis_health",
             "promptmill.workers.lifetime"],
)


def configure(settings: Settings) -> Celery:
    """Make this process a worker of `settings.redis_url` with these settings (the CLI's `worker`)."""
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL")
    app.conf.update(celery_config(settings.redis_url))
    app.conf.task_queues = None  # kombu builds one queue per name given to the worker
    runtime.configure(settings)
    return app
