"""Prometheus metrics scraped over HTTP from real worker processes, against the local server's own log."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path

import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.state.pace import bucket_of, percentile_ms
from promptmill.jobs.state.store import JobStore
from tests.conftest import promptmill, read_jsonl
from tests.support import start_cli, stop, wait_until, write_dataset
from tests.test_compare import bill
from tests.test_monitoring import free_port

PIPELINE = """
name = "metrics"
model = "claude-haiku-4-5"
prompt = "Item {id}: {text}"
max_tokens = 8
"""
HAIKU = "claude-haiku-4-5"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample the endpoint serves: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: list[dict], name: str, **labels: str) -> float:
    """A metric's samples summed over processes and over the labels not given."""
    return sum(
        value
        for scraped in samples
        for (sample, sample_labels), value in scraped.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


def finished(store: JobStore, job_id: str, rows: int) -> bool:
    """Every row committed and every chunk's task past its end: a worker writes what it gathered (metrics,
    pace) when a chunk ends, just before it flushes the chunk, and a row's commit comes before both."""
    return store.status(job_id).terminal == rows and store.chunks.all_flushed(job_id)


def submit_and_finish(env: dict[str, str], redis_url: str, data: Path, pipeline: Path, out: Path, rows: int) -> str:
    """Submit a job in chunks of 20 for the workers already running, and wait until it is finished."""
    submitted = promptmill("submit", str(data), "-p", str(pipeline), "--chunk-size", "20", "--out", str(out), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1]
    store = JobStore.from_url(redis_url)
    wait_until(lambda: finished(store, job_id, rows), 120, "the job to finish")
    return job_id


def test_two_workers_metrics_add_up_to_the_servers_own_counts(tmp_path, env, fake_api, redis_url):
    fake_api.configure(p500=0.1, latency_ms=5)
    ports = [free_port(), free_port()]
    workers = [start_cli(env, "worker", "--queues", "api", "--metrics-port", str(p), quiet=True) for p in ports]
    try:
        data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(300)), PIPELINE)
        job_id = submit_and_finish(env, redis_url, data, pipeline, tmp_path / "out", 300)
        samples = [scrape(port) for port in ports]
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port in ports}
        assert listening == {"127.0.0.1"}  # this machine alone, unless --metrics-address says otherwise
    finally:
        stop(*workers)

    log = [e for e in fake_api.log() if e["prompt"] is not None]
    statuses = Counter(str(e["status"]) for e in log)
    assert statuses["500"] > 0 and set(statuses) == {"200", "500"}
    for status, count in statuses.items():
        assert total(samples, "promptmill_requests_total", job=job_id, model=HAIKU, status=status) == count
    assert all(total([s], "promptmill_requests_total", job=job_id) > 0 for s in samples)  # both processes worked
    answered = [e["usage"] for e in log if e["status"] == 200]
    for kind, field in (("input", "input_tokens"), ("output", "output_tokens")):
        assert total(samples, "promptmill_tokens_total", job=job_id, kind=kind) == sum(u[field] for u in answered)
    cost = Decimal(str(total(samples, "promptmill_cost_usd_total", job=job_id)))
    assert abs(cost - bill(fake_api.log(), HAIKU)) < Decimal("1e-9")
    assert total(samples, "promptmill_rows_total", job=job_id, status="ok") == 300
    assert total(samples, "promptmill_request_duration_seconds_count", model=HAIKU) == statuses["200"]
    assert total(samples, "promptmill_in_flight", model=HAIKU) == 0


def test_run_serves_its_local_workers_metrics_on_one_port_while_it_runs(tmp_path, env, fake_api):
    fake_api.configure(latency_ms=100)
    port = free_port()
    data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(400)), PIPELINE)
    run_env = {**env, "PROMPTMILL_METRICS_PORT": str(port), "PROMPTMILL_MAX_IN_FLIGHT": "8", "PROMPTMILL_SWEEP_EVERY_S": "0.5"}
    run = start_cli(run_env, "run", str(data), "-p", str(pipeline), "--workers", "2", "--chunk-size", "10",
                    "--out", str(tmp_path / "out"))  # fmt: skip
    shares: list[float] = []
    try:

        def sent() -> float:
            try:
                return total([scrape(port)], "promptmill_requests_total", status="200")
            except OSError:
                return 0

        def share() -> bool:  # the job's fair share, set by the sweeper: the whole fleet's, alone
            try:
                shares.append(total([scrape(port)], "promptmill_job_share"))
            except OSError:
                pass
            return bool(shares) and shares[-1] > 0

        wait_until(lambda: sent() >= 100 or run.poll() is not None, 120, "metrics from the run's workers")
        scraped = sent()
        answered_after = sum(1 for e in fake_api.log() if e["status"] == 200)
        assert 100 <= scraped <= answered_after
        wait_until(lambda: share() or run.poll() is not None, 60, "the job's share in the metrics")
        assert shares[-1] == 1.0, shares
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    finally:
        stop(run)
    assert sum(1 for e in fake_api.log() if e["status"] == 200) == 400


def test_latency_histograms_from_two_workers_merge_to_the_rows_own_latencies(tmp_path, env, fake_api, redis_url):
    fake_api.configure(latency_ms=20, latency_per_token_ms=15)  # answers of 1 to 12 words: 35 to 200 ms
    rows = ({"id": i, "text": "[[reply:" + " ".join(["word"] * (1 + i % 12)) + "]]"} for i in range(300))
    data, pipeline = write_dataset(tmp_path, rows, PIPELINE)
    workers = [start_cli(env, "worker", "--queues", "api", quiet=True) for _ in range(2)]
    try:
        job_id = submit_and_finish(env, redis_url, data, pipeline, tmp_path / "out", 300)
    finally:
        stop(*workers)
    assert promptmill("export", job_id, env=env).returncode == 0
    latencies = [r["latency_ms"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    expected = Counter(bucket_of(ms) for ms in latencies)
    stored = {int(b): int(n) for b, n in redis.Redis.from_url(redis_url).hgetall(JobKeys(job_id).latency).items()}
    assert stored == dict(expected) and sum(stored.values()) == 300

    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["latency_ms"] == {f"p{q}": percentile_ms(dict(expected), q / 100) for q in (50, 95, 99)}
    true_median = sorted(latencies)[150]
    assert abs(status["latency_ms"]["p50"] - true_median) <= 0.25 * true_median  # buckets are 25% apart
    assert status["rows_per_s"]["job"] > 0 and status["output_tokens_per_s"]["job"] > 0
    assert status["eta_s"] == 0 and status["ttft_ms"] is None


def words(i: int) -> int:
    return 1 + i % 12


def test_streamed_answers_measure_time_to_first_token_and_keep_the_same_answer_and_usage(
    tmp_path, env, fake_api, redis_url
):
    """`stream = true` on both API backends: the server sends the first word after latency_ms and the
    rest per token after it, so each row's time to first token and its whole latency are known."""
    fake_api.configure(latency_ms=60, latency_per_token_ms=10)
    both = {**env, "OPENAI_BASE_URL": env["ANTHROPIC_BASE_URL"] + "/v1", "OPENAI_API_KEY": env["ANTHROPIC_API_KEY"],
            "PROMPTMILL_RPM": "60000"}  # fmt: skip
    port = free_port()
    worker = start_cli(both, "worker", "--queues", "api", "--metrics-port", str(port), quiet=True)
    replies = {i: " ".join(f"w{n}" for n in range(words(i))) for i in range(60)}
    data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"[[reply:{replies[i]}]]"} for i in range(60)),
                                   PIPELINE.replace("max_tokens = 8", "max_tokens = 16\nstream = true"))  # fmt: skip
    jobs = {}
    try:
        for backend, model in (("anthropic", HAIKU), ("openai", "gpt-4.1-mini")):
            submitted = promptmill("submit", str(data), "-p", str(pipeline), "--backend", backend, "--model", model,
                                   "--out", str(tmp_path / backend), env=both)  # fmt: skip
            assert submitted.returncode == 0, submitted.stderr
            jobs[backend] = submitted.stdout.split()[-1]
        store = JobStore.from_url(redis_url)
        wait_until(lambda: all(finished(store, j, 60) for j in jobs.values()), 120, "both jobs to finish")
        scraped = [scrape(port)]
    finally:
        stop(worker)

    log = {(e["model"], e["prompt"]): e for e in fake_api.log() if e["status"] == 200}
    client = redis.Redis.from_url(redis_url)
    for backend, job_id in jobs.items():
        assert promptmill("export", job_id, env=env).returncode == 0
        records = read_jsonl(tmp_path / backend / "results.jsonl")
        model = store.spec(job_id).model
        assert [r["status"] for r in records] == ["ok"] * 60
        for i, record in enumerate(records):
            served = log[(model, f"Item {i}: [[reply:{replies[i]}]]")]
            assert "first" in served, "the server streamed this answer"
            assert record["text"] == replies[i]
            usage = served["usage"]
            if backend == "anthropic":
                assert (record["usage"]["input_tokens"], record["usage"]["output_tokens"]) == (
                    usage["input_tokens"], usage["output_tokens"])  # fmt: skip
            else:
                assert (record["usage"]["input_tokens"], record["usage"]["output_tokens"]) == (
                    usage["prompt_tokens"], usage["completion_tokens"])  # fmt: skip
            # The server sent the first word 60 ms after the request came, the rest 10 ms a word later:
            # the worker sent before it came and saw the word after it went (one machine, one clock).
            served_first_ms = (served["first"] - served["t"]) * 1000
            assert 59 <= served_first_ms <= record["ttft_ms"] < record["latency_ms"]  # asyncio may wake 1 ms early
        ttfts = [r["ttft_ms"] for r in records]
        stored = {int(b): int(n) for b, n in client.hgetall(JobKeys(job_id).ttft).items()}
        assert stored == dict(Counter(bucket_of(ms) for ms in ttfts))
        status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
        assert status["ttft_ms"] == {f"p{q}": percentile_ms(stored, q / 100) for q in (50, 95, 99)}
        assert status["measured"] == {"latency_ms": "send to whole answer", "ttft_ms": "send to first token"}
        assert total(scraped, "promptmill_time_to_first_token_seconds_count", model=model) == 60
        # Every request waited on the fleet's limiter, whose configured limit the gauges show.
        assert total(scraped, "promptmill_rate_limit", model=model, budget="requests", source="configured") == 60000
        assert total(scraped, "promptmill_breaker_open", model=model) == 0
    assert total(scraped, "promptmill_limiter_wait_seconds_count") == 120


def test_a_long_lived_worker_holds_no_more_per_job_state_after_200_jobs_than_after_2(tmp_path, env, fake_api, redis_url):
    """A compose worker runs job after job: what it keeps per job (spec, prices, limiters, metric
    series) goes once the job has ended (here at once), so 200 jobs leave no more behind than 2."""
    from promptmill.api.driving import create_job
    from promptmill.config.settings import Settings
    from promptmill.jobs.dispatch import ChunkSender
    from promptmill.jobs.enqueue import enqueue
    from promptmill.jobs.submission import build_spec
    from tests.conftest import API_KEY

    port = free_port()
    quick = {**env, "PROMPTMILL_FORGET_JOB_AFTER_S": "0", "PROMPTMILL_SWEEP_EVERY_S": "0.5"}
    worker = start_cli(quick, "worker", "--queues", "api", "--metrics-port", str(port), quiet=True)
    data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(2)), PIPELINE)
    settings = Settings(anthropic_api_key=API_KEY, redis_url=redis_url)
    store, sender = JobStore.from_url(redis_url), ChunkSender.for_url(redis_url)

    def run_jobs(count: int) -> list[str]:
        jobs = []
        for _ in range(count):  # as `submit` does, without a process per job
            spec = build_spec(settings, data, pipeline, "anthropic", out_dir=tmp_path / "out" / str(len(jobs)))
            create_job(store, spec, None)
            enqueue(store, spec, sender, None)
            jobs.append(spec.job_id)
        wait_until(lambda: all(finished(store, job_id, 2) for job_id in jobs), 240, f"{count} jobs to finish")
        return jobs

    def held() -> tuple[float, set[str]]:
        """The worker's count of jobs it keeps state for, and the jobs its metric series name."""
        scraped = scrape(port)
        jobs = {dict(labels)["job"] for (_, labels) in scraped if "job" in dict(labels)}
        return scraped.get(("promptmill_worker_jobs_held", ()), -1), jobs

    try:
        run_jobs(2)
        wait_until(lambda: held() == (0, set()), 60, "the 2 ended jobs let go")
        after_two = held()
        jobs = run_jobs(200)
        wait_until(lambda: held() == (0, set()), 60, "the 200 ended jobs let go")
        assert held() == after_two == (0, set())
        assert len(fake_api.log()) == 404  # the jobs did run through this worker
        assert all(store.status(job_id).ok == 2 for job_id in jobs)
    finally:
        sender.close()
        stop(worker)
