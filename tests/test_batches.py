"""Whole jobs through Anthropic's Message Batches (`--backend anthropic-batch`): the real CLI, real
Celery workers and Redis, the real anthropic SDK against the local server's batches endpoints."""

from __future__ import annotations

import json
import time
from collections import Counter
from decimal import Decimal

import pytest
import redis

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.state.keys import JobKeys
from tests.chaos import kill_tree
from tests.conftest import promptmill, read_jsonl
from tests.support import fast_recovery, start_cli, wait_until, write_dataset
from tests.test_api_jobs import LABELS, job_id_of

PIPELINE = """
name = "label"
model = "claude-haiku-4-5"
system = "You label items with one word, after reading these instructions with care."
cache_system = true
prompt = "Item {id}: {text} [[reply:{answer}]]"
max_tokens = 8

[output]
type = "choice"
choices = ["positive", "negative"]
"""


@pytest.fixture
def batch_env(env):
    """Batches gathered, polled and held on a test's clock instead of minutes."""
    return {
        **env,
        "PROMPTMILL_BATCH_GATHER_S": "0.5",
        "PROMPTMILL_BATCH_POLL_MIN_S": "0.3",
        "PROMPTMILL_BATCH_POLL_MAX_S": "0.6",
        "PROMPTMILL_BATCH_HOLD_S": "3",
    }


def write_rows(tmp_path, rows: int, marker=lambda i: ""):
    answers = (
        {"id": i, "text": f"row number {i}{marker(i)}", "answer": f"The item is {LABELS[i % 2]}."} for i in range(rows)
    )
    return write_dataset(tmp_path, answers, PIPELINE)


def batch_run(data, pipeline, out, *extra: str) -> list[str]:
    """The arguments of `run` for a batch job."""
    return ["run", str(data), "--pipeline", str(pipeline), "--backend", "anthropic-batch", "--out", str(out), *extra]


def start_batch_run_until_every_row_is_in_a_batch(env, fake_api, data, pipeline, out, rows: int, *extra: str):
    """A batch job's `run` left running (its batches never end) once every row waits in a batch; and its job id."""
    run = start_cli(env, *batch_run(data, pipeline, out, *extra))
    try:
        job_id = run.stdout.readline().split()[1]  # "job JOB ..."
        wait_until(lambda: sum(b["requests"] for b in fake_api.batches()) == rows, 120, "every row in a batch")
    except BaseException:
        kill_tree(run)
        raise
    return run, job_id


def batch_entries(log: list[dict]) -> list[dict]:
    assert all(entry.get("route") == "batch" for entry in log), "a batch job sent a real-time request"
    return log


def row_of(entry: dict) -> int:
    """The row a batch request was for: its custom_id is "INTENT-ROW"."""
    return int(entry["custom_id"].rsplit("-", 1)[-1])


def test_a_batch_job_answers_every_row_through_batches_at_half_price_equal_to_the_servers_billing(
    tmp_path, batch_env, fake_api
):
    fake_api.configure(batch_delay_s=1.0)
    data, pipeline = write_rows(tmp_path, 1500)
    out = tmp_path / "out"
    result = promptmill(*batch_run(data, pipeline, out, "--chunk-size", "100"), env=batch_env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)

    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(1500))
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(1500)]
    assert all(record["attempts"] == 1 and record["request_id"].startswith("msg_") for record in records)

    log = batch_entries(fake_api.log())
    assert sorted(row_of(entry) for entry in log) == list(range(1500))  # each row sent once, by its row
    batches = fake_api.batches()
    assert 1 <= len(batches) <= 15 and sum(batch["requests"] for batch in batches) == 1500
    status = json.loads(promptmill("status", job_id, "--json", env=batch_env).stdout)
    assert {b["id"]: (b["status"], b["requests"], b["succeeded"]) for b in status["batches"]} == {
        b["id"]: ("ended", b["requests"], b["requests"]) for b in batches
    }

    # The server bills every token at the batch discount; the ledger says so, apart from list prices.
    served = [entry["usage"] for entry in log]
    tokens = {
        "input_tokens": sum(u["input_tokens"] for u in served),
        "output_tokens": sum(u["output_tokens"] for u in served),
        "cache_creation_input_tokens": sum(u["cache_creation_input_tokens"] for u in served),
        "cache_read_input_tokens": sum(u["cache_read_input_tokens"] for u in served),
    }
    assert tokens["cache_read_input_tokens"] > 0  # caching is priced at the discount too
    prices = PriceTable.load(Settings())
    billed = prices.price_for("claude-haiku-4-5").cost_usd(**tokens) * prices.batch_discount
    report = json.loads(promptmill("cost", job_id, "--json", env=batch_env).stdout)
    assert [model["model"] for model in report["models"]] == ["claude-haiku-4-5@batch"]
    assert report["models"][0]["requests"] == 1500
    assert billed > 0 and abs(Decimal(str(report["cost_usd"])) - billed) < Decimal("1e-9")
    assert promptmill("verify", job_id, env=batch_env).returncode == 0


def test_errored_and_expired_rows_go_in_a_later_batch_with_their_attempts_counted(tmp_path, batch_env, fake_api):
    markers = {3: " [[batch_error_once:overloaded_error]]", 5: " [[batch_expire_once]]",
               8: " [[batch_error:invalid_request_error]]", 13: " [[batch_error_once:api_error]]"}  # fmt: skip
    data, pipeline = write_rows(tmp_path, 40, lambda i: markers.get(i, ""))
    out = tmp_path / "out"
    result = promptmill(*batch_run(data, pipeline, out), env=batch_env)
    assert result.returncode == 0, result.stderr
    records = {record["row"]: record for record in read_jsonl(out / "results.jsonl")}

    for row in (3, 5, 13):  # answered by their second batch, the first attempt counted
        assert records[row]["status"] == "ok" and records[row]["attempts"] == 2, records[row]
        assert len(records[row]["errors"]) == 1
    assert records[5]["errors"][0]["status"] == "expired"
    assert records[3]["errors"][0]["status"] == 529
    failed = records[8]  # a request the API refuses is the row's fault: no second batch
    assert failed["status"] == "failed" and failed["error"]["kind"] == "invalid_request" and failed["attempts"] == 1
    others = [record for row, record in records.items() if row not in markers]
    assert all(record["status"] == "ok" and record["attempts"] == 1 for record in others)

    log = batch_entries(fake_api.log())
    sent = Counter(row_of(entry) for entry in log)
    assert {row: count for row, count in sent.items() if count > 1} == {3: 2, 5: 2, 13: 2}
    batch_of = {}
    for entry in log:
        batch_of.setdefault(row_of(entry), []).append(entry["batch_id"])
    assert all(first != second for first, second in (batch_of[row] for row in (3, 5, 13)))


@pytest.mark.timeout(300)
def test_a_batch_job_killed_after_its_batch_exists_resumes_by_polling_it_and_sends_nothing_twice(
    tmp_path, batch_env, fake_api
):
    fake_api.configure(batch_delay_s=3600)  # the batch stays in progress until the test lets it end
    data, pipeline = write_rows(tmp_path, 600)
    out = tmp_path / "out"
    run, job_id = start_batch_run_until_every_row_is_in_a_batch(
        batch_env, fake_api, data, pipeline, out, 600, "--chunk-size", "50"
    )
    try:
        time.sleep(1.0)  # past any hold: the chunks were sent again and found their rows in the batches
    finally:
        kill_tree(run)
        run.communicate()
    created = {batch["id"] for batch in fake_api.batches()}
    status = json.loads(promptmill("status", job_id, "--json", env=batch_env).stdout)
    assert {batch["id"] for batch in status["batches"]} == created  # recorded the moment they existed

    fake_api.configure(batch_delay_s=0)
    resumed = promptmill("resume", job_id, env=batch_env, timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    assert {batch["id"] for batch in fake_api.batches()} == created  # no batch sent again
    log = batch_entries(fake_api.log())
    assert sorted(row_of(entry) for entry in log) == list(range(600))
    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(600))
    assert all(record["status"] == "ok" and record["attempts"] == 1 for record in records)
    report = json.loads(promptmill("cost", job_id, "--json", env=batch_env).stdout)
    assert report["models"][0]["requests"] == 600 and report["paid_twice"]["cost_usd"] == 0


@pytest.mark.timeout(300)
def test_cancel_cancels_the_providers_batches_and_a_resume_sends_their_rows_in_a_new_one(
    tmp_path, batch_env, fake_api
):
    fake_api.configure(batch_delay_s=3600)
    data, pipeline = write_rows(tmp_path, 200)
    out = tmp_path / "out"
    run, job_id = start_batch_run_until_every_row_is_in_a_batch(batch_env, fake_api, data, pipeline, out, 200)
    try:
        cancelled = promptmill("cancel", job_id, env=batch_env)
        assert cancelled.returncode == 0, cancelled.stderr
        first = {batch["id"] for batch in fake_api.batches()}
        assert all(f"batch {batch_id} cancelled" in cancelled.stdout for batch_id in first)
        run.wait(timeout=60)  # the run sees its job cancelled and stops
    finally:
        kill_tree(run)
    status = json.loads(promptmill("status", job_id, "--json", env=batch_env).stdout)
    assert status["state"] == "cancelled" and status["done"] == 0

    fake_api.configure(batch_delay_s=0)
    resumed = promptmill("resume", job_id, env=batch_env, timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    second = {batch["id"] for batch in fake_api.batches()} - first
    assert second, "the canceled rows were never sent again"
    answered = [entry for entry in fake_api.log() if entry["status"] == 200]
    assert sorted(row_of(entry) for entry in answered) == list(range(200))
    assert all(entry["batch_id"] in second for entry in answered)
    assert [record["status"] for record in read_jsonl(out / "results.jsonl")] == ["ok"] * 200


@pytest.mark.parametrize("fault", ["drop", "kill"])
def test_a_batch_whose_create_was_answered_too_late_is_found_and_read_never_made_twice(
    tmp_path, batch_env, fake_api, fault
):
    """The server makes the batch, then its answer is lost: the connection drops, or the worker that
    sent it is killed before it could record it. The batch is found among the provider's and read; no
    row goes in a second one."""
    fake_api.configure(batch_delay_s=1.0, batch_create_fault=fault)
    data, pipeline = write_rows(tmp_path, 300)
    out = tmp_path / "out"
    env = fast_recovery(batch_env)  # a killed worker's chunks go out again within seconds
    result = promptmill(*batch_run(data, pipeline, out, "--chunk-size", "100"), env=env, timeout=200)
    assert result.returncode == 0, result.stderr
    assert fake_api.config()["batch_create_fault"] == ""  # the fault happened

    log = batch_entries(fake_api.log())
    assert sorted(row_of(entry) for entry in log) == list(range(300))  # each row in one batch, once
    batches = fake_api.batches()
    assert all(batch["retrieved"] > 0 for batch in batches), batches  # none made and left unread
    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 300 and all(r["attempts"] == 1 for r in records)
    job_id = job_id_of(result)
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert {b["id"] for b in status["batches"]} == {b["id"] for b in batches}
    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    assert report["models"][0]["requests"] == 300 and report["paid_twice"]["cost_usd"] == 0


def test_a_redis_error_while_a_batch_is_polled_is_polled_through_not_the_jobs_end(tmp_path, batch_env, fake_api):
    """Redis refuses the poller's commands for a while (the batches' hash is another type meanwhile):
    the poller logs it and polls on, as any Redis error is retried; the job ends complete."""
    fake_api.configure(batch_delay_s=3600)
    data, pipeline = write_rows(tmp_path, 100)
    run, job_id = start_batch_run_until_every_row_is_in_a_batch(batch_env, fake_api, data, pipeline, tmp_path / "out", 100)
    client = redis.Redis.from_url(batch_env["PROMPTMILL_REDIS_URL"])
    batches_key, aside = JobKeys(job_id).batches, JobKeys(job_id).batches + ":aside"
    try:
        wait_until(lambda: client.exists(batches_key), 30, "the batch recorded")
        polled = sum(batch["retrieved"] for batch in fake_api.batches())
        client.rename(batches_key, aside)
        client.set(batches_key, "not a hash")  # every poller's command on it fails
        wait_until(lambda: sum(b["retrieved"] for b in fake_api.batches()) >= polled + 3, 60, "polls while Redis refuses")
        client.delete(batches_key)
        client.rename(aside, batches_key)
        fake_api.configure(batch_delay_s=0)
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    finally:
        kill_tree(run)
    assert sorted(row_of(entry) for entry in batch_entries(fake_api.log())) == list(range(100))
    assert [r["status"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["ok"] * 100


def test_a_batch_that_outlasts_many_holds_is_waited_on_to_its_end(tmp_path, batch_env, fake_api):
    """A chunk gives its worker back every BATCH_HOLD_S (3 s here) while its batch runs: sent again as
    often as that takes (Celery's default of 3 retries ended the fourth with MaxRetriesExceededError)."""
    fake_api.configure(batch_delay_s=16)
    data, pipeline = write_rows(tmp_path, 30)
    out = tmp_path / "out"
    result = promptmill(*batch_run(data, pipeline, out), env=batch_env, timeout=200)
    assert result.returncode == 0, result.stderr
    logs = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    assert logs.count("retry: Retry in") >= 4 and "MaxRetriesExceededError" not in logs
    assert len(fake_api.batches()) == 1 and [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["ok"] * 30


def test_batch_prices_are_the_list_prices_at_the_tables_discount_cache_and_long_context_included():
    prices = PriceTable.load(Settings())
    assert prices.batch_discount == Decimal("0.50")
    for model in ("claude-haiku-4-5", "claude-sonnet-4-5@long"):
        listed, batch = prices.price_for(model), prices.price_for(model + "@batch")
        for rate in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"):
            assert getattr(batch, rate) == getattr(listed, rate) / 2, (model, rate)
    assert prices.price_for("claude-sonnet-4-5@long").input > prices.price_for("claude-sonnet-4-5").input


def test_rows_are_packed_into_batches_of_at_most_100000_requests_and_256_mb():
    from promptmill.workers.backends.anthropic_batch import AnthropicBatchBackend as Batches
    from promptmill.workers.backends.batch_rows import Arrival, packed

    MAX_BATCH_BYTES = Batches.max_bytes

    small = [Arrival(None, None, {}, size=10) for _ in range(250_001)]  # type: ignore[arg-type]
    assert [len(group) for group in packed(small, Batches.max_requests, Batches.max_bytes)] == [100_000, 100_000, 50_001]
    big = [Arrival(None, None, {}, size=MAX_BATCH_BYTES // 3 + 1) for _ in range(7)]  # type: ignore[arg-type]
    groups = packed(big, Batches.max_requests, Batches.max_bytes)
    assert [len(group) for group in groups] == [2, 2, 2, 1]
    assert all(sum(a.size for a in group) <= MAX_BATCH_BYTES < 256 * 1024 * 1024 for group in groups)


def test_polls_back_off_from_the_shortest_wait_to_the_longest_as_a_batch_ages():
    from promptmill.workers.backends.anthropic_batch import AnthropicBatchBackend
    from promptmill.workers.backends.batch_rows import WaitedBatch

    settings = Settings(
        anthropic_api_key="k", redis_url="redis://127.0.0.1:1/0", batch_poll_min_s=10, batch_poll_max_s=60
    )
    backend = AnthropicBatchBackend(None, settings)  # type: ignore[arg-type]  # nothing connects until used
    ages = (0, 60, 120, 300, 3600, 86_400)
    waits = [backend._interval_s(WaitedBatch("b", None, time.time() - age)) for age in ages]  # type: ignore[arg-type]
    assert waits[0] == 10 and waits[-1] == 60
    assert waits == sorted(waits) and 10 < waits[2] < 60


def test_a_batch_job_draws_nothing_from_the_fleets_rate_limit(tmp_path, batch_env, fake_api):
    data, pipeline = write_rows(tmp_path, 30)
    # At 1 request a minute, 30 real-time rows would take half an hour: past the command's timeout.
    result = promptmill(*batch_run(data, pipeline, tmp_path / "out", "--rpm", "1"), env=batch_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["ok"] * 30
    status = json.loads(promptmill("status", job_id_of(result), "--json", env=batch_env).stdout)
    assert status["limits"] is None  # no worker drew on (or even named) a fleet limit for the job


def test_a_deadline_crossing_sends_message_batch_rows_in_real_time_before_it(tmp_path, batch_env, fake_api):
    """The same deadline on Message Batches: the batch is cancelled (it had answered nothing) and
    every row is answered once through /v1/messages, before the deadline, at the real-time price."""
    fake_api.configure(batch_delay_s=3600)
    data, pipeline = write_rows(tmp_path, 120)
    out = tmp_path / "out"
    env = {**batch_env, "PROMPTMILL_DEADLINE_RPM": "6000", "PROMPTMILL_DEADLINE_MARGIN_S": "3"}
    result = promptmill(*batch_run(data, pipeline, out, "--deadline", "30s"), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    records = read_jsonl(out / "results.jsonl")
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(120)]
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert max(record["finished_at"] for record in records) < status["deadline"]["at"]
    assert (status["deadline"]["rows_batch"], status["deadline"]["rows_realtime"]) == (0, 120)
    log = fake_api.log()
    assert {b["status"] for b in fake_api.batches()} == {"ended"} and all(
        entry["status"] == "canceled" for entry in log if entry.get("route") == "batch"
    )
    answered = Counter(entry["prompt"] for entry in log if entry.get("route") != "batch" and entry["status"] == 200)
    assert len(answered) == 120 and set(answered.values()) == {1}
    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    assert {m["model"]: m["requests"] for m in report["models"] if m["requests"]} == {"claude-haiku-4-5": 120}


def test_a_batch_taken_after_a_lost_create_that_holds_none_of_its_rows_is_dropped_for_its_own(tmp_path, batch_env, fake_api):
    """Another client of the account made a batch of the same size just before: after our create's
    answer is lost, the provider's list offers both, and the earlier (another's) is taken first. Its
    results name none of our rows: it is dropped (and never taken again), the batch our create did
    make is found and read, and no row is sent or paid twice."""
    import anthropic

    fake_api.configure(batch_delay_s=1.0)
    client = anthropic.Anthropic(base_url=batch_env["ANTHROPIC_BASE_URL"], api_key=batch_env["ANTHROPIC_API_KEY"])
    requests = [{"custom_id": f"someone-{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 8,
                 "messages": [{"role": "user", "content": f"someone else's {i}"}]}} for i in range(5)]  # fmt: skip
    foreign = client.messages.batches.create(requests=requests)
    fake_api.configure(batch_create_fault="drop")  # the next create (ours) is made, its answer lost
    data, pipeline = write_rows(tmp_path, 5)
    out = tmp_path / "out"
    result = promptmill(*batch_run(data, pipeline, out, "--chunk-size", "5"), env=fast_recovery(batch_env), timeout=200)
    assert result.returncode == 0, result.stderr
    assert fake_api.config()["batch_create_fault"] == ""  # the create's answer was lost

    ours = [entry for entry in batch_entries(fake_api.log()) if not entry["custom_id"].startswith("someone-")]
    assert sorted(row_of(entry) for entry in ours) == list(range(5))  # each row in one batch, once
    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 5 and all(r["attempts"] == 1 for r in records)
    status = json.loads(promptmill("status", job_id_of(result), "--json", env=batch_env).stdout)
    assert foreign.id not in {b["id"] for b in status["batches"]} and len(status["batches"]) == 1
    report = json.loads(promptmill("cost", job_id_of(result), "--json", env=batch_env).stdout)
    assert report["models"][0]["requests"] == 5 and report["paid_twice"]["cost_usd"] == 0
