"""Celery workers: the app and its task, the backends, the retry policy and the rate limiter."""
