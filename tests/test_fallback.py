"""Fallback chains through the real CLI and workers: a pipeline's model on the local server's Messages
API falling back on a model of its chat completions API, with faults the server is told to make."""

from __future__ import annotations

import json
from collections import Counter
import math
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from promptmill.jobs.state.fallback import READ_EVERY_S as FALLBACK_READ_EVERY_S
from promptmill.jobs.state.fallback import fallback_status
from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.state.store import JobStore
from tests.conftest import promptmill, read_jsonl
from tests.support import start_cli, stop, wait_until, write_dataset
from tests.test_api_jobs import job_id_of
from tests.test_compare import bill, both_apis

HAIKU, MINI = "claude-haiku-4-5", "gpt-4.1-mini"
AFTER_S = 2.0


def pipeline(after_s: float = AFTER_S, fallback: str = f'["openai:{MINI}"]') -> str:
    return f"""
name = "fallback"
model = "{HAIKU}"
prompt = "Item {{id}}: {{text}}"
max_tokens = 8
fallback = {fallback}
fallback_after_s = {after_s}
"""


def chain_env(env: dict[str, str]) -> dict[str, str]:
    """Both APIs, three attempts a model, four requests in flight per worker (so a job takes seconds)."""
    return {**both_apis(env), "PROMPTMILL_MAX_ATTEMPTS": "3", "PROMPTMILL_MAX_IN_FLIGHT": "4"}


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def test_a_model_that_always_answers_529_sends_every_row_to_the_next_within_fallback_after_s(tmp_path, env, fake_api):
    fake_api.configure(down={HAIKU: 529}, latency_ms=50)
    data, pipeline_path = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(400)), pipeline())
    result = promptmill("run", str(data), "-p", str(pipeline_path), "--out", str(tmp_path / "out"),
                        "--workers", "1", env=chain_env(env))  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert all(r["status"] == "ok" and r["model"] == MINI and r["models_tried"][-1] == MINI for r in records)

    # Before the fleet moves, a row spends its three attempts on Haiku, then goes on; after, it goes
    # straight to the next model, but for one probe of Haiku (one attempt) per fallback_after_s.
    own = {f"Item {i}: row {i}" for i in range(400)}  # the server's log is the whole session's: this job's part
    log = [e for e in fake_api.log() if e["prompt"] in own]
    to_haiku = sorted(e["t"] for e in log if e["model"] == HAIKU)
    straight = [r for r in records if r["models_tried"] == [MINI]]
    assert len(straight) >= 300
    assert all(r["attempts"] == 1 for r in straight)
    spent = [r for r in records if r["models_tried"] == [HAIKU, MINI]]
    assert all(r["attempts"] in (2, 4) for r in spent)  # a probe's one attempt, or all three, on Haiku
    assert [e["status"] for e in spent[0]["errors"]] == [529] * (spent[0]["attempts"] - 1)
    # Every request to Haiku is one of these (the message names the requests none of them accounts for).
    haiku_prompts = Counter(e["prompt"] for e in log if e["model"] == HAIKU)
    unaccounted = haiku_prompts - Counter({f"Item {r['row']}: row {r['row']}": r["attempts"] - 1 for r in spent})
    assert sum(r["attempts"] - 1 for r in spent) == len(to_haiku), (len(to_haiku), unaccounted.most_common(8))
    # By the fleet's own record, not a window on the server's clock (a loaded machine stretches the
    # retries of rows under way): a row that starts once the fleet has moved (Haiku failing for
    # fallback_after_s, as Redis holds it, and a worker's cached read of that) touches Haiku only as a
    # probe, one attempt, and probes take one fleet-wide turn per fallback_after_s.
    failing_since = float(redis.Redis.from_url(env["PROMPTMILL_REDIS_URL"]).hget(JobKeys(job_id).fallback, "failing_since:0"))
    moved_at = failing_since + AFTER_S + FALLBACK_READ_EVERY_S
    after_move = [r for r in records if epoch(r["started_at"]) > moved_at]
    probes = [r for r in after_move if r["models_tried"][0] == HAIKU]
    assert after_move and all(r["attempts"] == 2 for r in probes)  # one attempt on Haiku, then Mini
    last_start = max(epoch(r["started_at"]) for r in records)
    assert len(probes) <= math.ceil((last_start - moved_at) / AFTER_S) + 1, len(probes)

    # Costs by model: the answers at the next model's price; Haiku's 529s are failed attempts, unbilled.
    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    by_model = {m["model"]: m for m in report["models"]}
    assert by_model[MINI]["requests"] == 400
    assert abs(Decimal(str(by_model[MINI]["cost_usd"])) - bill(log, MINI)) < Decimal("1e-9")
    assert by_model[HAIKU]["failed_attempts"] == len(to_haiku) and by_model[HAIKU]["cost_usd"] == 0
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["fallback"]["chain"] == [f"anthropic:{HAIKU}", f"openai:{MINI}"]
    assert status["fallback"]["on"] == f"openai:{MINI}" and f"anthropic:{HAIKU} failing for" in status["fallback"]["reason"]
    assert promptmill("verify", job_id, env=env).returncode == 0


def test_a_model_that_recovers_gets_its_rows_back(tmp_path, env, fake_api, redis_url):
    fake_api.configure(down={HAIKU: 529}, latency_ms=20)
    data, pipeline_path = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(2000)), pipeline())
    store = JobStore.from_url(redis_url)
    before = set(store.job_ids())
    run = start_cli(chain_env(env), "run", str(data), "-p", str(pipeline_path), "--out", str(tmp_path / "out"),
                    "--workers", "1")  # fmt: skip
    try:
        wait_until(lambda: set(store.job_ids()) - before, 60, "the job")
        (job_id,) = set(store.job_ids()) - before
        spec = store.spec(job_id)
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: fallback_status(client, spec)["on"] == f"openai:{MINI}", 60, "the fleet to move on")
        assert store.status(job_id).terminal < 1500, "the job must still be running for the model to recover"
        fake_api.configure(down={})
        recovered = time.time()
        _, stderr = run.communicate(timeout=180)
        assert run.returncode == 0, stderr
    finally:
        stop(run)
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert all(r["status"] == "ok" for r in records)
    back = [r for r in records if r["model"] == HAIKU and epoch(r["started_at"]) > recovered]
    assert len(back) >= 100, len(back)  # rows went back to Haiku once it answered a probe
    assert fallback_status(client, spec) == {"chain": [f"anthropic:{HAIKU}", f"openai:{MINI}"],
                                             "on": f"anthropic:{HAIKU}", "reason": None}  # fmt: skip


def test_a_404_falls_back_at_once_and_a_400_does_not(tmp_path, env, fake_api):
    def text(i: int) -> str:
        return f"row {i}" + (f" [[status@{HAIKU}:404]]" if i % 4 == 0 else "") + (" [[status:400]]" if i == 5 else "")

    rows = ({"id": i, "text": text(i)} for i in range(40))
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline(after_s=600))
    result = promptmill("run", str(data), "-p", str(pipeline_path), "--out", str(tmp_path / "out"), env=chain_env(env))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    for i, record in enumerate(records):
        if i % 4 == 0:  # retired on Haiku: one 404, then the next model
            assert (record["status"], record["model"], record["models_tried"]) == ("ok", MINI, [HAIKU, MINI])
            assert record["attempts"] == 2 and [e["status"] for e in record["errors"]] == [404]
        elif i == 5:  # the row's own fault: no other model sees it
            assert (record["status"], record["error"]["kind"], record["models_tried"]) == ("failed", "invalid_request", [HAIKU])
        else:
            assert (record["status"], record["model"], record["models_tried"]) == ("ok", HAIKU, [HAIKU])
    to_mini = [e["prompt"] for e in fake_api.log() if e["model"] == MINI]
    assert sorted(to_mini) == sorted(f"Item {i}: {text(i)}" for i in range(0, 40, 4))


def test_a_chain_crosses_queues_to_the_local_engine_when_the_api_model_is_down(tmp_path, env, fake_api):
    """The issue's chain ends on a local model: an api worker hands its rows to a gpu worker's engine,
    which commits them into their chunks with what they went through first."""
    fake_api.configure(down={HAIKU: 529, MINI: 503}, latency_ms=20)
    local = "smollm2-135m-instruct"
    rows = ({"id": i, "text": f"row {i}"} for i in range(60))
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline(fallback=f'["openai:{MINI}", "vllm:{local}"]'))
    result = promptmill("run", str(data), "-p", str(pipeline_path), "--out", str(tmp_path / "out"),
                        "--workers", "1", "--chunk-size", "10", env=chain_env(env), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["row"] for r in records] == list(range(60))
    assert all(r["status"] == "ok" and r["model"] == local and r["models_tried"][-1] == local for r in records)
    assert any(r["models_tried"] == [HAIKU, MINI, local] for r in records), "the first rows went down the chain"
    # What a row went through on the API models travels with it to the engine: every failed attempt
    # the server saw is in some row's record, and the engine's answer is its last attempt.
    log = fake_api.log()
    to_haiku, to_mini = ([e for e in log if e["model"] == model] for model in (HAIKU, MINI))
    statuses = [e["status"] for r in records for e in r["errors"]]
    assert (statuses.count(529), statuses.count(503), len(statuses)) == (len(to_haiku), len(to_mini), len(log))
    assert all(r["attempts"] == len(r["errors"]) + 1 for r in records)

    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    by_model = {m["model"]: m for m in report["models"]}
    assert by_model[local]["requests"] == 60 and by_model[local]["output_tokens"] == sum(
        r["usage"]["output_tokens"] for r in records
    )
    to_haiku = [e for e in fake_api.log() if e["model"] == HAIKU]
    assert by_model[HAIKU]["failed_attempts"] == len(to_haiku) and by_model[HAIKU]["cost_usd"] == 0
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["fallback"]["chain"] == [f"anthropic:{HAIKU}", f"openai:{MINI}", f"vllm:{local}"]
    assert status["fallback"]["on"] == f"vllm:{local}"
    assert status["done"] == 60 and status["failed"] == 0
    assert promptmill("verify", job_id, env=env).returncode == 0
    logs = {path.name for path in (tmp_path / "out" / "logs").iterdir()}
    assert {f"{job_id}.worker-api-0.log", f"{job_id}.worker-gpu-1.log"} <= logs


@pytest.mark.parametrize(
    "fallback, message",
    [
        ('["anthropic-batch:claude-haiku-4-5"]', "fallback: anthropic-batch:claude-haiku-4-5 runs on the 'batch' queue"),
        ('["openai:no-such-model"]', "fallback: openai:no-such-model: "),
    ],
)
def test_a_chain_that_cannot_run_fails_at_submit_naming_it(tmp_path: Path, env, fallback, message):
    data, pipeline_path = write_dataset(tmp_path, [{"id": 1, "text": "x"}], pipeline(fallback=fallback))
    result = promptmill("run", str(data), "-p", str(pipeline_path), env=both_apis(env))
    assert result.returncode == 2 and message in result.stderr, result.stderr
