"""Secrets never reach a log: every log record is masked, by value, as it is made.

A record factory sees every record of every logger (ours, Celery's, the SDKs'), whatever handlers
are set up later, so an API key or a Redis password in a message, its arguments or a traceback is
replaced by `***` before any handler formats it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Iterable
from urllib.parse import unquote, urlsplit

MASK = "***"
_secrets: set[str] = set()
_installed = False

# DEBUG logs of the HTTP stacks carry request bodies: prompts stay out of logs.
_CHATTY = ("anthropic", "openai", "httpx", "httpx2", "httpcore", "aiohttp")


def redis_password(url: str | None) -> str | None:
    if not url:
        return None
    password = urlsplit(url).password
    return unquote(password) if password else None


def mask(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, MASK)
    return text


def mask_secrets_in_logs(secrets: Iterable[str | None]) -> None:
    """Mask these values in every log record from now on (values under 4 characters are not secrets)."""
    global _installed
    _secrets.update(secret for secret in secrets if secret and len(secret) >= 4)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def masked_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if not _secrets:
            return record
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string stays as it was
            return record
        record.msg, record.args = mask(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    logging.setLogRecordFactory(masked_record)
