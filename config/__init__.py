"""promptmill's configuration: Settings from the environment, the price table, Celery settings."""

from promptmill.config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
