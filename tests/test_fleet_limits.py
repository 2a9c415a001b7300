"""The fleet's limit with real parts: several Celery worker processes, the real SDK, and the local
server enforcing an account's limit as the API does."""

from __future__ import annotations

import json
from collections import Counter

from promptmill.jobs.state.store import JobStore
from tests.conftest import promptmill, read_jsonl
from tests.test_api_jobs import job_id_of, write_job

RPM, BURST_S = 1200, 2


def test_four_worker_processes_stay_inside_a_limit_they_learn_from_headers(tmp_path, env, fake_api):
    fake_api.configure(rpm=RPM, burst_s=BURST_S, latency_ms=50)
    data, pipeline = write_job(tmp_path, 500)
    out = tmp_path / "out"
    # No --rpm: the workers start by probing and learn the limit from the answers' headers.
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "4", env=env)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["ok"] * 500

    log = fake_api.log()
    statuses = Counter(entry["status"] for entry in log)
    assert statuses[429] <= 0.01 * len(log), statuses
    # Every request the fleet sent, refused or not, counted per second of arrival at the server.
    per_second = Counter(int(entry["t"]) for entry in log)
    assert max(per_second.values()) <= RPM / 60 + RPM / 60 * BURST_S, sorted(per_second.items())

    status = json.loads(promptmill("status", job_id_of(result), "--json", env=env).stdout)
    assert status["limits"]["requests_per_minute"] == RPM
    assert status["limits"]["learned"]["requests_per_minute"] == RPM


def test_a_resumed_row_keeps_its_failed_attempts(tmp_path, env, fake_api):
    fake_api.configure(p500=1.0)
    env["PROMPTMILL_MAX_ATTEMPTS"] = "4"
    data, pipeline = write_job(tmp_path, 5)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    chunk_id = store.chunks.ids(job_id)[0]
    for _ in range(3):  # as if a worker had failed row 0 three times, then died
        store.chunks.add_failed_attempt(job_id, chunk_id, 0, "claude-haiku-4-5")

    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 1 and "every row failed (5)" in resumed.stderr, resumed.stderr  # said loudly
    records = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert [(r["status"], r["attempts"]) for r in records] == [("failed", 4)] * 5
    assert all("after 4 attempts" in r["error"]["message"] for r in records)
    sent = Counter(entry["prompt"].split(":")[0] for entry in fake_api.log())
    assert sent == {"Item 0": 1, "Item 1": 4, "Item 2": 4, "Item 3": 4, "Item 4": 4}
