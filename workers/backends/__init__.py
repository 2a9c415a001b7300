"""Backends: one small interface, one module per provider or engine."""

from workers.backends.base import Backend, FatalJobError, RawOutcome, get_backend

__all__ = ["Backend", "FatalJobError", "RawOutcome", "get_backend"]
