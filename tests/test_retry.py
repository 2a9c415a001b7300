"""The retry policy: what each failure of the real SDK against the local server is classified as,
and how long the backoff waits."""

from __future__ import annotations

import anthropic
import openai
import pytest

from promptmill.pipelines.items import ErrorKind
from promptmill.workers.retry import backoff_s, classify
from tests.conftest import API_KEY


def failure(api_server, prompt: str, key: str = API_KEY, timeout: float = 10.0) -> anthropic.APIError:
    client = anthropic.Anthropic(api_key=key, base_url=api_server.url, max_retries=0, timeout=timeout)
    with pytest.raises(anthropic.APIError) as caught:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": prompt}])
    return caught.value


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_and_overload_are_retried_and_feed_the_breaker(fake_api, status):
    verdict = classify(failure(fake_api, f"[[status:{status}]]"))
    assert verdict.retryable and verdict.server_failure and not verdict.fatal_for_job
    assert verdict.kind is ErrorKind.server_error and str(status) in verdict.message


def test_a_429_is_retried_after_the_providers_retry_after(fake_api):
    fake_api.configure(p429=1.0, retry_after=7)
    verdict = classify(failure(fake_api, "hello"))
    assert verdict.kind is ErrorKind.rate_limited and verdict.retryable and verdict.retry_after_s == 7.0
    assert not verdict.server_failure


def test_a_spent_limit_is_fatal_for_the_job_never_retried(fake_api):
    verdict = classify(failure(fake_api, "[[spend_limit]]"))
    assert verdict.fatal_for_job and not verdict.retryable and "usage limits" in verdict.message


@pytest.mark.parametrize("status, words", [(400, "poisoned"), (413, "maximum allowed")])
def test_bad_requests_fail_the_item_with_the_providers_message(fake_api, status, words):
    verdict = classify(failure(fake_api, f"[[status:{status}]]"))
    assert verdict.kind is ErrorKind.invalid_request and not verdict.retryable and not verdict.fatal_for_job
    assert words in verdict.message and str(status) in verdict.message


def test_a_refused_key_is_fatal_for_the_job(fake_api):
    verdict = classify(failure(fake_api, "hello", key="wrong"))
    assert verdict.fatal_for_job and verdict.kind is ErrorKind.auth_error and "401" in verdict.message


def test_timeouts_and_dropped_connections_are_retried(fake_api):
    fake_api.configure(p_timeout=1.0)
    timed_out = classify(failure(fake_api, "hello", timeout=0.5))
    fake_api.configure(p_timeout=0.0, p_drop=1.0)
    dropped = classify(failure(fake_api, "hello"))
    assert (timed_out.kind, dropped.kind) == (ErrorKind.timeout, ErrorKind.connection_error)
    assert timed_out.retryable and dropped.retryable and timed_out.server_failure and dropped.server_failure


def test_backoff_is_full_jitter_capped_and_never_shorter_than_retry_after():
    waits = [backoff_s(3, base_s=0.5, cap_s=30) for _ in range(2000)]
    assert 0 <= min(waits) < 0.2 and 1.8 < max(waits) <= 2.0  # uniform over [0, 0.5 x 2^2]
    assert max(backoff_s(20, base_s=0.5, cap_s=30) for _ in range(2000)) <= 30
    assert all(5.0 <= backoff_s(1, 0.5, 30, retry_after_s=5.0) <= 5.05 for _ in range(200))
    assert all(backoff_s(1, 0.5, 10, retry_after_s=60.0) >= 60.0 for _ in range(200))  # above the cap too


def openai_failure(api_server, prompt: str, key: str = API_KEY) -> openai.APIError:
    client = openai.OpenAI(api_key=key, base_url=api_server.url + "/v1", max_retries=0, timeout=10.0)
    with pytest.raises(openai.APIError) as caught:
        client.chat.completions.create(
            model="gpt-4.1-mini", max_tokens=8, messages=[{"role": "user", "content": prompt}]
        )
    return caught.value


@pytest.mark.parametrize(
    "prompt, kind, retryable, fatal",
    [
        ("[[status:500]]", ErrorKind.server_error, True, False),
        ("[[status:529]]", ErrorKind.server_error, True, False),
        ("[[status:400]]", ErrorKind.invalid_request, False, False),
        ("[[status:404]]", ErrorKind.model_not_found, False, False),
        ("[[insufficient_quota]]", ErrorKind.rate_limited, False, True),
    ],
)
def test_openais_errors_are_classified_as_anthropics_are(fake_api, prompt, kind, retryable, fatal):
    verdict = classify(openai_failure(fake_api, prompt))
    assert (verdict.kind, verdict.retryable, verdict.fatal_for_job) == (kind, retryable, fatal)


def test_openais_429_waits_its_retry_after_ms_and_a_wrong_key_stops_the_job(fake_api):
    fake_api.configure(rpm=1, burst_s=1)
    openai.OpenAI(api_key=API_KEY, base_url=fake_api.url + "/v1", max_retries=0).chat.completions.create(
        model="gpt-4.1-mini", max_tokens=8, messages=[{"role": "user", "content": "first"}]
    )
    error = openai_failure(fake_api, "second")  # the bucket is empty for about a minute
    verdict = classify(error)
    assert verdict.kind is ErrorKind.rate_limited and verdict.retryable
    headers = error.response.headers  # retry-after in whole seconds, retry-after-ms the finer one
    assert verdict.retry_after_s == int(headers["retry-after-ms"]) / 1000 <= int(headers["retry-after"])
    assert 30 < verdict.retry_after_s <= 60
    refused = classify(openai_failure(fake_api, "hello", key="wrong"))
    assert refused.kind is ErrorKind.auth_error and refused.fatal_for_job
