"""What the fleet's limiter learns from: whose buckets a request draws on, what a provider's headers
say of the account's limits, and how many input tokens a request holds before it is counted."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Mapping


def account_scope(base_url: str | None, api_key: str | None, model: str, provider: str = "anthropic") -> str:
    """Which buckets a request draws on: its account and model, never the key itself."""
    fingerprint = hashlib.sha256(f"{base_url or 'default'}\n{api_key or ''}".encode()).hexdigest()[:16]
    return f"{provider}:{fingerprint}:{model}"


@dataclass(frozen=True)
class LimitHeaders:
    """What one response said about the account's limits."""

    limits: tuple[int, int, int] = (0, 0, 0)  # requests, input, output per minute; 0 = not said
    remaining: tuple[int, int, int] = (-1, -1, -1)  # -1 = not said
    exhausted_for_s: float | None = None  # a budget is spent and refills this much later (OpenAI's reset)

    _NAMES = ("requests", "input-tokens", "output-tokens")

    @classmethod
    def from_anthropic(cls, headers: Mapping[str, str]) -> "LimitHeaders":
        """What Anthropic's `anthropic-ratelimit-*` headers say (all unsaid when there are none)."""
        limits, remaining = [], []
        for name in cls._NAMES:
            limits.append(_int(headers.get(f"anthropic-ratelimit-{name}-limit"), 0))
            remaining.append(_int(headers.get(f"anthropic-ratelimit-{name}-remaining"), -1))
        return cls(tuple(limits), tuple(remaining))  # type: ignore[arg-type]

    @classmethod
    def from_openai(cls, headers: Mapping[str, str]) -> "LimitHeaders":
        """What OpenAI's `x-ratelimit-*` headers say. Its one token budget (prompt plus `max_tokens`)
        is kept in the input bucket; the output bucket stays unsaid."""
        requests_limit = _int(headers.get("x-ratelimit-limit-requests"), 0)
        tokens_limit = _int(headers.get("x-ratelimit-limit-tokens"), 0)
        requests_left = _int(headers.get("x-ratelimit-remaining-requests"), -1)
        tokens_left = _int(headers.get("x-ratelimit-remaining-tokens"), -1)
        waits = [
            parse_duration_s(headers.get(f"x-ratelimit-reset-{name}"))
            for name, left in (("requests", requests_left), ("tokens", tokens_left))
            if left == 0
        ]
        waits = [wait for wait in waits if wait is not None]
        return cls((requests_limit, tokens_limit, 0), (requests_left, tokens_left, -1), max(waits, default=None))

    @property
    def said_anything(self) -> bool:
        return any(self.limits) or any(r >= 0 for r in self.remaining)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(raw: str | None) -> float | None:
    """OpenAI's reset durations, such as `1s`, `120ms` or `6m0s`, in seconds; None if unreadable."""
    if not raw:
        return None
    text = raw.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def _int(raw: str | None, default: int) -> int:
    try:
        return int(float(raw)) if raw is not None else default
    except ValueError:
        return default


class InputTokenEstimate:
    """Input tokens of a request before it is sent, from its characters, calibrated by the answers.

    Starts at 1 token per 3.5 characters (English prose for Claude's tokenizer) and follows the
    provider's own counts; the limiter corrects each estimate once the real count is known.
    """

    def __init__(self, tokens_per_char: float = 1 / 3.5):
        self.tokens_per_char = tokens_per_char

    def estimate(self, chars: int) -> int:
        return max(1, math.ceil(chars * self.tokens_per_char))

    def learn(self, chars: int, tokens: int) -> None:
        if chars > 0:
            self.tokens_per_char += 0.05 * (tokens / chars - self.tokens_per_char)
