"""The retry policy, in one place: which failures are retried, how long to wait, when to give up.

Retryable: 429, 408, 409, 5xx and 529 (overloaded), timeouts and connection errors, waiting what the
provider's `retry-after` says or else an exponential backoff with full jitter, capped. Fatal for the
item: 400, 404, 413, 422 (the provider's message is kept). Fatal for the job: 401 and 403, and a 429
that says the account's spend limit is reached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anthropic

from promptmill.pipelines.items import ErrorKind
from promptmill.workers.limit_signals import LimitHeaders


@dataclass(frozen=True)
class Verdict:
    kind: ErrorKind
    message: str
    retryable: bool
    fatal_for_job: bool = False
    retry_after_s: float | None = None
    status: int | str = "engine_error"  # the HTTP status, or timeout, dropped or engine_error
    limits: LimitHeaders | None = field(default=None, compare=False)  # what the response said of the limits

    @property
    def server_failure(self) -> bool:
        """A failure of the provider (5xx, 529, timeout, dropped connection): feeds the circuit breaker."""
        return self.kind in (ErrorKind.server_error, ErrorKind.timeout, ErrorKind.connection_error)

    def final_message(self, attempts: int) -> str:
        return f"{self.message} (after {attempts} attempts)" if self.retryable else self.message


def _provider_message(error: anthropic.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return f"{error.status_code} {inner.get('type', 'error')}: {inner['message']}"
    return f"{error.status_code}: {error.message}"


def _retry_after(error: anthropic.APIStatusError) -> float | None:
    raw = error.response.headers.get("retry-after") if error.response is not None else None
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def classify(error: BaseException) -> Verdict:
    if isinstance(error, anthropic.APITimeoutError):
        return Verdict(ErrorKind.timeout, f"timed out: {error}", retryable=True, status="timeout")
    if isinstance(error, anthropic.APIConnectionError):
        return Verdict(ErrorKind.connection_error, f"connection failed: {error}", retryable=True, status="dropped")
    if isinstance(error, anthropic.APIStatusError):
        status = error.status_code
        message = _provider_message(error)
        if status in (401, 403):
            return Verdict(ErrorKind.auth_error, message, retryable=False, fatal_for_job=True, status=status)
        if status == 429:
            body = error.body if isinstance(error.body, dict) else {}
            inner = body.get("error") if isinstance(body.get("error"), dict) else {}
            if "spend_limit" in str(inner.get("error_code", "")) or "spend_limit" in str(inner.get("type", "")):
                return Verdict(ErrorKind.rate_limited, message, retryable=False, fatal_for_job=True, status=status)
            return Verdict(
                ErrorKind.rate_limited, message, retryable=True, retry_after_s=_retry_after(error), status=status
            )
        if status in (408, 409) or status >= 500:  # 500, 502, 503, 504 and 529 (overloaded) among them
            return Verdict(
                ErrorKind.server_error, message, retryable=True, retry_after_s=_retry_after(error), status=status
            )
        return Verdict(ErrorKind.invalid_request, message, retryable=False, status=status)
    return Verdict(ErrorKind.engine_error, f"{type(error).__name__}: {error}", retryable=False)


def backoff_s(attempt: int, base_s: float, cap_s: float, retry_after_s: float | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1): full jitter, capped.

    A provider's `retry-after` is a floor: waiting less only earns another refusal.
    """
    jittered = random.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))
    if retry_after_s is not None:
        return retry_after_s + jittered * 0.1
    return jittered
