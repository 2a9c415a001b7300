"""Jobs through `--backend openai`: the real CLI and Celery workers, the real openai SDK against the
local server's chat completions, and a real Redis."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.pipelines.spec import OutputSpec
from promptmill.workers.backends.openai import chosen_label, response_format
from promptmill.workers.limit_signals import LimitHeaders, parse_duration_s
from tests.anthropic_server import ServerControl
from tests.conftest import API_KEY, promptmill, read_jsonl
from tests.support import write_dataset
from tests.test_api_jobs import LABELS, job_id_of

PIPELINE = """
name = "label"
model = "gpt-4.1-mini"
system = "You label items with one word."
prompt = "Item {id}: {text} [[reply:{answer}]]"
max_tokens = 8
temperature = 0.0
seed = 7
stop = ["END"]

[output]
type = "choice"
choices = ["positive", "negative"]
"""


def openai_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """A user of an OpenAI-compatible server: the SDK's own variables, the server's URL with /v1."""
    base = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    return {**base, "OPENAI_BASE_URL": env["ANTHROPIC_BASE_URL"] + "/v1", "OPENAI_API_KEY": API_KEY, **extra}


def write_job(tmp_path: Path, rows: int, pipeline: str = PIPELINE, answer=None) -> tuple[Path, Path]:
    answer = answer or (lambda i: LABELS[i % 2])
    items = ({"id": i, "text": f"row number {i}", "answer": answer(i)} for i in range(rows))
    return write_dataset(tmp_path, items, pipeline)


def run_job(tmp_path: Path, env: dict[str, str], rows: int, *extra: str, pipeline: str = PIPELINE, answer=None):
    data, pipeline_path = write_job(tmp_path, rows, pipeline, answer)
    out = tmp_path / "out"
    result = promptmill(
        "run", str(data), "--pipeline", str(pipeline_path), "--backend", "openai", "--out", str(out), *extra, env=env
    )
    return result, out


def test_a_job_through_chat_completions_is_complete_with_usage_and_cost_equal_to_the_servers_bill(
    tmp_path, env, fake_api
):
    result, out = run_job(tmp_path, openai_env(env), 300, "--workers", "2")
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    records = read_jsonl(out / "results.jsonl")
    assert [r["output"] for r in records] == [LABELS[i % 2] for i in range(300)]
    assert all(r["model"] == "gpt-4.1-mini" and r["request_id"].startswith("req_") for r in records)

    served = [e for e in fake_api.log() if e["status"] == 200]
    assert len(served) == 300 and all(e["route"] == "chat" for e in served)
    # The request: a system message, OpenAI's max_completion_tokens (OPENAI_BASE_URL is not OpenAI's,
    # so max_tokens), sampling, stop, and a JSON schema for the choice.
    params = served[0]["params"]
    assert served[0]["system"] == "You label items with one word."
    assert params["max_tokens"] == 8 and "max_completion_tokens" not in params
    assert (params["temperature"], params["seed"], params["stop"]) == (0.0, 7, ["END"])
    schema = params["response_format"]["json_schema"]["schema"]
    assert schema == {"type": "string", "enum": ["positive", "negative"]}  # not OpenAI's: no strict object

    # Usage in every backend's fields: cached prompt tokens apart from the rest.
    usage = [e["usage"] for e in served]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    expected = {
        "input": sum(u["prompt_tokens"] for u in usage) - cached,
        "output": sum(u["completion_tokens"] for u in usage),
        "cache_read": cached,
        "cache_creation": 0,
    }
    assert cached > 0  # the system message is cached after its first request
    status = json.loads(promptmill("status", job_id, "--json", env=openai_env(env)).stdout)
    assert status["tokens"] == expected
    price = PriceTable.load(Settings()).price_for("gpt-4.1-mini")
    assert (price.input, price.output, price.cache_read) == (Decimal("0.40"), Decimal("1.60"), Decimal("0.10"))
    bill = price.cost_usd(expected["input"], expected["output"], 0, expected["cache_read"])
    report = json.loads(promptmill("cost", job_id, "--json", env=openai_env(env)).stdout)
    assert abs(Decimal(str(report["cost_usd"])) - bill) < Decimal("1e-9")


def test_the_key_reaches_neither_redis_nor_the_results(tmp_path, env, fake_api, redis_url):
    result, out = run_job(tmp_path, openai_env(env), 20)
    assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values = {"string": lambda: [client.get(key)], "hash": lambda: client.hgetall(key).values()}.get(kind)
        for value in values() if values else []:
            assert API_KEY.encode() not in value, key
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(errors="replace"), path


def test_the_pipelines_own_price_wins_and_an_unpriced_model_is_refused_at_submit(tmp_path, env, fake_api):
    unpriced = PIPELINE.replace('model = "gpt-4.1-mini"', 'model = "my-finetune"')
    refused, _ = run_job(tmp_path / "a", openai_env(env), 5, pipeline=unpriced)
    assert refused.returncode != 0 and "my-finetune" in refused.stderr and "[price]" in refused.stderr

    priced = unpriced + "\n[price]\ninput_per_mtok = 3.0\noutput_per_mtok = 12.0\ncache_read_per_mtok = 0.3\n"
    result, _ = run_job(tmp_path / "b", openai_env(env), 40, pipeline=priced)
    assert result.returncode == 0, result.stderr
    usage = [e["usage"] for e in fake_api.log() if e["status"] == 200]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    uncached = sum(u["prompt_tokens"] for u in usage) - cached
    output = sum(u["completion_tokens"] for u in usage)
    bill = (Decimal("3.0") * uncached + Decimal("12.0") * output + Decimal("0.3") * cached) / 1_000_000
    report = json.loads(promptmill("cost", job_id_of(result), "--json", env=openai_env(env)).stdout)
    assert abs(Decimal(str(report["cost_usd"])) - bill) < Decimal("1e-9")


def test_a_self_hosted_server_needs_no_key_but_openai_does(tmp_path, env, fake_api):
    # The local server checks the key, so a keyless run is refused by it: the placeholder key was sent.
    keyless = {k: v for k, v in openai_env(env).items() if k != "OPENAI_API_KEY"}
    result, _ = run_job(tmp_path / "a", keyless, 5)
    assert "no OpenAI API key" not in result.stderr
    assert [e["status"] for e in fake_api.log()][:1] == [401]
    assert result.returncode != 0 and "401" in result.stderr

    to_openai = {k: v for k, v in keyless.items() if k != "OPENAI_BASE_URL"}
    refused, _ = run_job(tmp_path / "b", to_openai, 5)
    assert refused.returncode != 0 and "openai_api_key" in refused.stderr


def test_429s_wait_what_retry_after_ms_says_and_insufficient_quota_stops_the_job(tmp_path, env, fake_api):
    # Three in ten answers 429: a row fails only if all six of its attempts draw one (60 x 0.3^6 = 4% of
    # runs failed so); ten attempts make that 60 x 0.3^10 = 0.04%.
    fake_api.configure(p429=0.3, retry_after=0.05)
    result, out = run_job(tmp_path / "a", openai_env(env, PROMPTMILL_MAX_ATTEMPTS="10"), 60)
    assert result.returncode == 0, result.stderr
    assert all(r["status"] == "ok" for r in read_jsonl(out / "results.jsonl"))
    assert any(e["status"] == 429 for e in fake_api.log())

    fake_api.reset()
    quota = lambda i: "[[insufficient_quota]]" if i == 3 else LABELS[i % 2]  # noqa: E731
    stopped, _ = run_job(tmp_path / "b", openai_env(env), 40, "--workers", "1", answer=quota)
    assert stopped.returncode != 0
    assert "insufficient_quota" in stopped.stderr or "quota" in stopped.stderr
    assert sum(1 for e in fake_api.log() if e["status"] == "insufficient_quota") == 1  # never retried


def test_the_fleet_limiter_learns_openais_limits_from_its_headers(tmp_path, env, fake_api):
    fake_api.configure(rpm=600, input_tpm=60_000, burst_s=1)
    result, _ = run_job(tmp_path, openai_env(env), 100, "--workers", "2")
    assert result.returncode == 0, result.stderr
    log = fake_api.log()
    assert sum(1 for e in log if e["status"] == 429) <= 2  # paced by the headers, not by refusals
    status = json.loads(promptmill("status", job_id_of(result), "--json", env=openai_env(env)).stdout)
    assert status["limits"]["learned"]["requests_per_minute"] == 600
    assert status["limits"]["learned"]["input_tokens_per_minute"] == 60_000


def test_openai_headers_are_read_as_the_limiter_needs_them():
    said = LimitHeaders.from_openai(
        {
            "x-ratelimit-limit-requests": "1200",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "400ms",
        }
    )
    assert said.limits == (1200, 150000, 0) and said.remaining == (0, 149000, -1)
    assert said.exhausted_for_s == 360.0  # the spent budget's reset: the fleet pauses that long
    assert [parse_duration_s(raw) for raw in ("1s", "120ms", "1h2m3.5s", "soon", "")] == [1.0, 0.12, 3723.5, None, None]


def test_a_choice_is_a_bare_json_string_but_an_object_for_openais_strict_mode():
    output = OutputSpec(type="choice", choices=["yes", "no"])
    bare = response_format(output, openai_strict=False)["json_schema"]
    strict = response_format(output, openai_strict=True)["json_schema"]
    assert bare["schema"] == {"type": "string", "enum": ["yes", "no"]}
    assert strict["strict"] is True and strict["schema"]["properties"]["answer"]["enum"] == ["yes", "no"]
    answers = ['"yes"', '{"answer": "no"}', '{"answer":"no', "yes."]  # a cut or free answer stays as it came
    assert [chosen_label(text) for text in answers] == ["yes", "no", '{"answer":"no', "yes."]
    assert response_format(OutputSpec(type="text"), openai_strict=True) is None


def test_promptmills_own_variables_and_a_pipelines_base_url_reach_the_server(tmp_path, env, fake_api):
    url = env["ANTHROPIC_BASE_URL"] + "/v1"
    sdk_free = {k: v for k, v in openai_env(env).items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    own = {**sdk_free, "PROMPTMILL_OPENAI_BASE_URL": url, "PROMPTMILL_OPENAI_API_KEY": API_KEY}
    result, out = run_job(tmp_path / "a", own, 5)
    assert result.returncode == 0, result.stderr
    # A pipeline's base_url wins over the variables: here they point nowhere. The key goes to the
    # pipeline's server because PROMPTMILL_OPENAI_KEY_HOSTS names it.
    nowhere = {**own, "PROMPTMILL_OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "PROMPTMILL_OPENAI_KEY_HOSTS": url}
    pinned = PIPELINE.replace('model = "gpt-4.1-mini"', f'model = "gpt-4.1-mini"\nbase_url = "{url}"')
    result, out = run_job(tmp_path / "b", nowhere, 5, pipeline=pinned)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["ok"] * 5
    assert len([e for e in fake_api.log() if e["status"] == 200]) == 10


def test_a_pipelines_base_url_elsewhere_never_receives_the_fleets_key(tmp_path, env, fake_api):
    """Whoever writes a pipeline names its server: the worker's key goes there only where it was
    configured to go (its base URL, PROMPTMILL_OPENAI_KEY_HOSTS); else a key of the pipeline's own."""
    elsewhere = ServerControl.start("the-pipelines-own-key")  # a second server; it checks its own key
    try:
        elsewhere_url = elsewhere.url + "/v1"
        pointed = PIPELINE.replace('model = "gpt-4.1-mini"', f'model = "gpt-4.1-mini"\nbase_url = "{elsewhere_url}"')
        # The key accepted here is the fleet's: a server sent it would answer 200.
        elsewhere_takes_fleet_key = ServerControl.start(API_KEY)
        try:
            leak = PIPELINE.replace('model = "gpt-4.1-mini"',
                                    f'model = "gpt-4.1-mini"\nbase_url = "{elsewhere_takes_fleet_key.url}/v1"')  # fmt: skip
            result, _ = run_job(tmp_path / "leak", openai_env(env), 5, pipeline=leak)
            assert result.returncode != 0 and "401" in result.stderr, result.stderr
            statuses = [entry["status"] for entry in elsewhere_takes_fleet_key.log()]
            assert statuses and set(statuses) == {401}  # never sent the key it would have taken

            # Allowed by the fleet's operator: then it goes there.
            host = elsewhere_takes_fleet_key.url.removeprefix("http://")
            allowed, out = run_job(tmp_path / "allowed", openai_env(env, PROMPTMILL_OPENAI_KEY_HOSTS=host), 5,
                                   pipeline=leak)  # fmt: skip
            assert allowed.returncode == 0, allowed.stderr
            assert [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["ok"] * 5
        finally:
            elsewhere_takes_fleet_key.stop()

        # The pipeline's own key, from a variable it names.
        own_key = pointed.replace("[output]", 'api_key_env = "PROMPTMILL_KEY_GATEWAY"\n\n[output]')
        key_env = openai_env(env, PROMPTMILL_KEY_GATEWAY="the-pipelines-own-key")
        result, out = run_job(tmp_path / "own", key_env, 5, pipeline=own_key)
        assert result.returncode == 0, result.stderr
        assert [e["status"] for e in elsewhere.log()] == [200] * 5
        assert [e["status"] for e in fake_api.log()] == []  # the configured server saw none of it
    finally:
        elsewhere.stop()
    # A pipeline may not name the fleet's own key's variable.
    fleet_key = PIPELINE.replace("[output]", 'api_key_env = "OPENAI_API_KEY"\n\n[output]')
    refused, _ = run_job(tmp_path / "refused", openai_env(env), 5, pipeline=fleet_key)
    assert refused.returncode == 2 and "api_key_env" in refused.stderr, refused.stderr


def with_key(url: str, variable: str) -> str:
    return PIPELINE.replace('model = "gpt-4.1-mini"', f'model = "gpt-4.1-mini"\nbase_url = "{url}/v1"').replace(
        "[output]", f'api_key_env = "{variable}"\n\n[output]'
    )


def test_a_pipeline_names_only_a_key_the_fleet_lets_it_and_that_key_reaches_only_its_hosts(tmp_path, env, fake_api):
    """A capture server that answers only when sent the fleet's Redis URL (or the cloud's secret) as
    its key: no pipeline gets it sent there, whatever variable it names. A key the operator listed
    with its hosts goes to them and to no other server."""
    redis_url = env["PROMPTMILL_REDIS_URL"]
    capture = ServerControl.start(redis_url)
    try:
        fleet = openai_env(env, AWS_SECRET_ACCESS_KEY=redis_url, MY_VARIABLE=redis_url, PROMPTMILL_KEY_COPY=redis_url)
        for variable in ("PROMPTMILL_REDIS_URL", "AWS_SECRET_ACCESS_KEY", "MY_VARIABLE", "PROMPTMILL_KEY_COPY"):
            result, _ = run_job(tmp_path / variable, fleet, 2, pipeline=with_key(capture.url, variable))
            assert result.returncode != 0 and "api_key_env" in result.stderr and variable in result.stderr, result.stderr
            assert redis_url not in result.stderr + result.stdout
        assert capture.log() == []  # nothing was ever sent there
    finally:
        capture.stop()

    gateway = ServerControl.start("the-gateways-key")
    other = ServerControl.start("the-gateways-key")  # would take the key too, were it sent
    try:
        host = gateway.url.removeprefix("http://")
        bound = openai_env(env, GATEWAY_KEY="the-gateways-key", PROMPTMILL_PIPELINE_KEYS=f"GATEWAY_KEY={host}")
        result, out = run_job(tmp_path / "bound", bound, 3, pipeline=with_key(gateway.url, "GATEWAY_KEY"))
        assert result.returncode == 0, result.stderr
        assert [e["status"] for e in gateway.log()] == [200] * 3
        refused, _ = run_job(tmp_path / "other", bound, 3, pipeline=with_key(other.url, "GATEWAY_KEY"))
        assert refused.returncode != 0 and "GATEWAY_KEY goes to" in refused.stderr, refused.stderr
        assert other.log() == []
    finally:
        gateway.stop()
        other.stop()


def test_the_worker_refuses_the_fleets_variables_whatever_spec_names_them():
    """A spec rewritten in Redis skips the pipeline's check at submit: the worker's own refuses."""
    from promptmill.config.settings import KeyRefused, Settings

    settings = Settings(_env_file=None, redis_url="redis://:password@10.0.0.1:6379/0")
    for variable in ("PROMPTMILL_REDIS_URL", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
                     "AZURE_CLIENT_SECRET", "OPENAI_API_KEY", "REDIS_PASSWORD"):  # fmt: skip
        with pytest.raises(KeyRefused, match=variable):
            settings.openai_key("http://127.0.0.1:1/v1", variable)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_two_jobs_on_two_servers_share_one_worker_and_neither_closes_the_others_client(tmp_path, env, fake_api, backend):
    """One worker process runs chunks of two jobs at once, one on `127.0.0.1:P` and one on
    `localhost:P`: each gets a client of its own, and neither chunk closes the other's (a batch's
    poller goes on with the client it polls with). Both end exact."""
    from promptmill.jobs.state.status import JobState
    from promptmill.jobs.state.store import JobStore
    from tests.support import start_cli, stop, wait_until

    fake_api.configure(latency_ms=150, batch_delay_s=1.0)
    port = fake_api.url.rsplit(":", 1)[1]
    fleet = openai_env(env, PROMPTMILL_OPENAI_KEY_HOSTS=f"127.0.0.1:{port},localhost:{port}",
                       PROMPTMILL_BATCH_GATHER_S="0.3", PROMPTMILL_BATCH_POLL_MIN_S="0.3",
                       PROMPTMILL_BATCH_POLL_MAX_S="0.5", PROMPTMILL_BATCH_HOLD_S="3")  # fmt: skip
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    jobs = {}
    for host in ("127.0.0.1", "localhost"):
        pinned = PIPELINE.replace('model = "gpt-4.1-mini"', f'model = "gpt-4.1-mini"\nbase_url = "http://{host}:{port}/v1"')
        data, pipeline_path = write_job(tmp_path / host, 60, pinned)
        submitted = promptmill("submit", str(data), "-p", str(pipeline_path), "--backend", backend, "--chunk-size", "10",
                               "--out", str(tmp_path / host / "out"), env=fleet)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        jobs[host] = submitted.stdout.split()[-1]
    queue = "api" if backend == "openai" else "batch"
    worker = start_cli(fleet, "worker", "--queues", queue, quiet=True)
    try:
        ended = lambda: all(not store.status(job_id).state.runnable for job_id in jobs.values())  # noqa: E731
        wait_until(ended, 240, "both jobs to end")
    finally:
        stop(worker)
    for host, job_id in jobs.items():
        status = store.status(job_id)
        assert status.state is JobState.complete, (host, status.state, status.error)
        exported = promptmill("export", job_id, "--out", str(tmp_path / host / "export"), env=fleet)
        assert exported.returncode == 0, exported.stderr
        records = read_jsonl(tmp_path / host / "export" / "results.jsonl")
        assert [r["output"] for r in records] == [LABELS[i % 2] for i in range(60)]


def test_a_base_url_outside_the_fleets_hosts_is_refused_at_submit_and_by_the_workers(tmp_path, env, fake_api):
    """PROMPTMILL_BASE_URL_HOSTS names where pipelines may send rows: a submitter that knows it refuses
    another base_url at once; a job submitted from elsewhere (or rewritten in Redis) is stopped by the
    workers, which know it too, before anything is sent."""
    from promptmill.jobs.state.status import JobState
    from promptmill.jobs.state.store import JobStore
    from tests.support import start_cli, stop, wait_until

    elsewhere = ServerControl.start(API_KEY)
    try:
        allowed_host = fake_api.url.removeprefix("http://")
        fleet = openai_env(env, PROMPTMILL_BASE_URL_HOSTS=allowed_host, PROMPTMILL_OPENAI_KEY_HOSTS=elsewhere.url)
        pointed = PIPELINE.replace('model = "gpt-4.1-mini"', f'model = "gpt-4.1-mini"\nbase_url = "{elsewhere.url}/v1"')
        refused, _ = run_job(tmp_path / "refused", fleet, 3, pipeline=pointed)
        assert refused.returncode == 2 and "PROMPTMILL_BASE_URL_HOSTS" in refused.stderr, refused.stderr

        submitter = {k: v for k, v in fleet.items() if k != "PROMPTMILL_BASE_URL_HOSTS"}
        data, pipeline_path = write_job(tmp_path / "submitted", 3, pointed)
        submitted = promptmill("submit", str(data), "-p", str(pipeline_path), "--backend", "openai",
                               "--out", str(tmp_path / "submitted" / "out"), env=submitter)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[-1]
        store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
        worker = start_cli(fleet, "worker", "--queues", "api", quiet=True)
        try:
            wait_until(lambda: not store.status(job_id).state.runnable, 120, "the workers to stop the job")
        finally:
            stop(worker)
        status = store.status(job_id)
        assert status.state is JobState.failed and "PROMPTMILL_BASE_URL_HOSTS" in (status.error or ""), status
        assert elsewhere.log() == []
    finally:
        elsewhere.stop()
