"""Whole jobs through the OpenAI Batch API (`--backend openai-batch`): the real CLI, real Celery
workers and Redis, the real openai SDK against the local server's `/v1/files` and `/v1/batches`."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from decimal import Decimal

import pytest

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from tests.chaos import kill_tree
from tests.conftest import promptmill, read_jsonl
from tests.support import fast_recovery, start_cli, wait_until, write_dataset
from tests.test_api_jobs import LABELS, job_id_of
from tests.test_openai import openai_env

PIPELINE = """
name = "label"
model = "gpt-4.1-mini"
system = "You label items with one word."
prompt = "Item {id}: {text} [[reply:{answer}]]"
max_tokens = 8

[output]
type = "choice"
choices = ["positive", "negative"]
"""


@pytest.fixture
def batch_env(env):
    """An OpenAI user whose batches are gathered, polled and held on a test's clock instead of minutes."""
    return openai_env(
        env,
        PROMPTMILL_BATCH_GATHER_S="0.5",
        PROMPTMILL_BATCH_POLL_MIN_S="0.3",
        PROMPTMILL_BATCH_POLL_MAX_S="0.6",
        PROMPTMILL_BATCH_HOLD_S="3",
    )


def write_rows(tmp_path, rows: int, marker=lambda i: ""):
    answers = (
        {"id": i, "text": f"row number {i}{marker(i)}", "answer": LABELS[i % 2]} for i in range(rows)
    )
    return write_dataset(tmp_path, answers, PIPELINE)


def batch_run(data, pipeline, out, *extra: str) -> list[str]:
    return ["run", str(data), "--pipeline", str(pipeline), "--backend", "openai-batch", "--out", str(out), *extra]


def batch_entries(log: list[dict]) -> list[dict]:
    assert all(entry.get("route") == "openai_batch" for entry in log), "a batch job sent a real-time request"
    return log


def row_of(entry: dict) -> int:
    return int(entry["custom_id"].rsplit("-", 1)[-1])


def test_3000_rows_with_errors_and_an_expired_batch_are_all_answered_at_half_price_equal_to_the_bill(
    tmp_path, batch_env, fake_api
):
    """2% of the requests error once (a 5xx), and the first batch expires half answered: every row
    still ends ok, the retried ones with their attempts counted, and the ledger is the server's bill
    at the batch discount."""
    fake_api.configure(batch_delay_s=1.0, batch_expire_next=1)
    erring = set(range(0, 3000, 50))  # 60 rows, 2%
    data, pipeline = write_rows(tmp_path, 3000, lambda i: " [[batch_error_once:api_error]]" if i in erring else "")
    out = tmp_path / "out"
    result = promptmill(*batch_run(data, pipeline, out, "--chunk-size", "500"), env=batch_env, timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)

    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(3000))
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(3000)]
    log = batch_entries(fake_api.log())
    expired = {row_of(entry) for entry in log if entry["status"] == "expired"}
    assert expired and not expired & erring or expired  # some rows expired in the first batch
    attempts = {record["row"]: record["attempts"] for record in records}
    assert all(attempts[row] >= 2 for row in erring | expired)
    sends = Counter(row_of(entry) for entry in log)
    assert all(sends[row] == attempts[row] for row in range(3000))  # one send per counted attempt
    answered = [entry for entry in log if entry["status"] == 200]
    assert sorted(row_of(entry) for entry in answered) == list(range(3000))  # each row answered once

    batches = fake_api.openai_batches()
    assert all(batch["metadata"]["promptmill_intent"] for batch in batches)
    status = json.loads(promptmill("status", job_id, "--json", env=batch_env).stdout)
    assert {b["id"] for b in status["batches"]} == {b["id"] for b in batches}
    assert Counter(b["status"] for b in status["batches"])["expired"] == 1
    assert all(b["processing"] == 0 for b in status["batches"])

    prices = PriceTable.load(Settings())
    usage = [entry["usage"] for entry in answered]
    tokens = {"input_tokens": sum(u["prompt_tokens"] for u in usage), "output_tokens": sum(u["completion_tokens"] for u in usage)}
    listed = prices.price_for("gpt-4.1-mini").cost_usd(**tokens)
    report = json.loads(promptmill("cost", job_id, "--json", env=batch_env).stdout)
    assert [model["model"] for model in report["models"]] == ["gpt-4.1-mini@batch"], report["models"]
    assert report["models"][0]["requests"] == 3000
    assert listed > 0 and abs(Decimal(str(report["cost_usd"])) - listed * prices.batch_discount) < Decimal("1e-9")
    assert prices.batch_discount == Decimal("0.5")


def test_a_run_killed_after_its_first_batch_exists_resumes_without_a_batch_or_an_answer_twice(
    tmp_path, batch_env, fake_api
):
    fake_api.configure(batch_delay_s=3600)  # batches stay in progress until the test lets them end
    data, pipeline = write_rows(tmp_path, 400)
    out = tmp_path / "out"
    run = start_cli(batch_env, *batch_run(data, pipeline, out, "--chunk-size", "100"))
    try:
        job_id = run.stdout.readline().split()[1]
        wait_until(lambda: sum(b["requests"] for b in fake_api.openai_batches()) == 400, 120, "every row in a batch")
        time.sleep(1.0)
    finally:
        kill_tree(run)
        run.communicate()
    created = {batch["id"]: batch["input_file_id"] for batch in fake_api.openai_batches()}
    status = json.loads(promptmill("status", job_id, "--json", env=batch_env).stdout)
    # Recorded the moment they existed: each batch, and the file it was made of.
    assert {batch["id"]: batch["files"]["input"] for batch in status["batches"]} == created

    fake_api.configure(batch_delay_s=0)
    resumed = promptmill("resume", job_id, env=batch_env, timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    assert {batch["id"] for batch in fake_api.openai_batches()} == set(created)  # no batch made again
    log = batch_entries(fake_api.log())
    assert sorted(row_of(entry) for entry in log) == list(range(400))  # no row sent twice
    records = read_jsonl(out / "results.jsonl")
    assert all(record["status"] == "ok" and record["attempts"] == 1 for record in records)
    report = json.loads(promptmill("cost", job_id, "--json", env=batch_env).stdout)
    assert report["models"][0]["requests"] == 400 and report["paid_twice"]["cost_usd"] == 0


@pytest.mark.parametrize("fault", ["drop", "kill"])
def test_a_batch_whose_create_answer_was_lost_is_found_by_its_intent_never_made_twice(
    tmp_path, batch_env, fake_api, fault
):
    fake_api.configure(batch_delay_s=1.0, batch_create_fault=fault)
    data, pipeline = write_rows(tmp_path, 300)
    out = tmp_path / "out"
    env = fast_recovery(batch_env)
    result = promptmill(*batch_run(data, pipeline, out, "--chunk-size", "100"), env=env, timeout=200)
    assert result.returncode == 0, result.stderr
    assert fake_api.config()["batch_create_fault"] == ""  # the fault happened
    log = batch_entries(fake_api.log())
    assert sorted(row_of(entry) for entry in log) == list(range(300))  # each row in one batch, once
    assert all(batch["retrieved"] > 0 for batch in fake_api.openai_batches())  # none made and left unread
    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 300


@pytest.mark.timeout(300)
def test_cancel_cancels_the_batches_and_a_4xx_fails_its_row_with_the_message(tmp_path, batch_env, fake_api):
    fake_api.configure(batch_delay_s=3600)
    data, pipeline = write_rows(tmp_path, 100, lambda i: " [[batch_error:invalid_request_error]]" if i == 7 else "")
    out = tmp_path / "out"
    run = start_cli(batch_env, *batch_run(data, pipeline, out))
    try:
        job_id = run.stdout.readline().split()[1]
        wait_until(lambda: sum(b["requests"] for b in fake_api.openai_batches()) == 100, 120, "every row in a batch")
        cancelled = promptmill("cancel", job_id, env=batch_env)
        assert cancelled.returncode == 0, cancelled.stderr
        first = {batch["id"] for batch in fake_api.openai_batches()}
        assert all(f"batch {batch_id} cancelled" in cancelled.stdout for batch_id in first)
        run.wait(timeout=60)
    finally:
        kill_tree(run)
    fake_api.configure(batch_delay_s=0)
    resumed = promptmill("resume", job_id, env=batch_env, timeout=200)
    assert resumed.returncode == 0, resumed.stderr
    assert {batch["id"] for batch in fake_api.openai_batches()} - first, "the cancelled rows were never sent again"
    records = read_jsonl(out / "results.jsonl")
    assert [record["status"] for i, record in enumerate(records) if i != 7] == ["ok"] * 99
    assert records[7]["status"] == "failed" and "invalid_request_error" in records[7]["error"]["message"]


# -- OpenAI batch files in and out -------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}


def write_batch_file(path, requests: int, model: str = "gpt-4.1-mini", bad_row: int | None = None):
    """A batch file as teams hold it: a system turn, sampling, a stop, a seed; every third request asks
    for JSON by schema. `bad_row`'s messages hold system turns only (it fails alone, at its render)."""
    with path.open("w") as handle:
        for i in range(requests):
            user = f"Request {i}. [[reply:" + ('{"total": %d}' % i if i % 3 == 0 else LABELS[i % 2]) + "]]"
            messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": user}]
            if i == bad_row:
                messages = messages[:1]
            body = {"model": model, "messages": messages, "max_tokens": 12, "temperature": 0.2, "top_p": 0.9,
                    "stop": "END", "seed": 3}  # fmt: skip
            if i % 3 == 0:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "total", "schema": SCHEMA}}
            line = {"custom_id": f"req-{i:03d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(line) + "\n")
    return path


def export_batch(job_id: str, env, folder) -> tuple[list[dict], list[dict]]:
    exported = promptmill("export", job_id, "--format", "openai-batch", "--out", str(folder), env=env)
    assert exported.returncode == 0, exported.stderr
    return read_jsonl(folder / "output.jsonl"), read_jsonl(folder / "errors.jsonl")


def check_output_lines(output: list[dict], errors: list[dict], requests: int, bad_row: int) -> None:
    """One line per custom_id in the Batch API's shapes; answers as chat.completions."""
    assert sorted(line["custom_id"] for line in output + errors) == [f"req-{i:03d}" for i in range(requests)]
    assert [line["custom_id"] for line in errors] == [f"req-{bad_row:03d}"]
    assert errors[0]["response"]["status_code"] == 400 and errors[0]["response"]["body"]["error"]["message"]
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        i = int(line["custom_id"].split("-")[1])
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "stop"
        content = body["choices"][0]["message"]["content"]
        assert (json.loads(content) == {"total": i}) if i % 3 == 0 else content == LABELS[i % 2]
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_batch_file_runs_through_openai_as_it_is_and_exports_in_the_batch_apis_shapes(tmp_path, env, fake_api):
    requests, bad = 30, 4
    data = write_batch_file(tmp_path / "requests.jsonl", requests, bad_row=bad)
    env = openai_env(env)
    result = promptmill("run", str(data), "--backend", "openai", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr  # no pipeline: the file's lines are the requests
    output, errors = export_batch(job_id_of(result), env, tmp_path / "export")
    check_output_lines(output, errors, requests, bad)
    sent = {entry["prompt"]: entry for entry in fake_api.log()}
    assert len(sent) == requests - 1
    for entry in sent.values():
        params = entry["params"]
        i = int(entry["prompt"].split()[1].rstrip("."))
        assert entry["system"] == "Answer briefly." and params["model"] == "gpt-4.1-mini"
        assert (params["max_completion_tokens"] if "max_completion_tokens" in params else params["max_tokens"]) == 12
        assert (params["temperature"], params["top_p"], params["stop"], params["seed"]) == (0.2, 0.9, ["END"], 3)
        assert ("response_format" in params) == (i % 3 == 0)
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [record["custom_id"] for record in records] == [f"req-{i:03d}" for i in range(requests)]


def test_a_batch_file_runs_through_anthropic_translated(tmp_path, env, fake_api):
    requests, bad = 12, 5
    data = write_batch_file(tmp_path / "requests.jsonl", requests, bad_row=bad)
    result = promptmill("run", str(data), "--backend", "anthropic", "--model", "claude-haiku-4-5",
                        "--out", str(tmp_path / "out"), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    output, errors = export_batch(job_id_of(result), env, tmp_path / "export")
    check_output_lines(output, errors, requests, bad)
    assert all(line["response"]["body"]["model"] == "claude-haiku-4-5" for line in output)
    for entry in fake_api.log():
        params = entry["params"]
        i = int(entry["prompt"].split()[1].rstrip("."))
        assert params["system"] == "Answer briefly." and params["max_tokens"] == 12
        assert (params["temperature"], params["top_p"], params["stop_sequences"]) == (0.2, 0.9, ["END"])
        assert "seed" not in params and "response_format" not in params
        if i % 3 == 0:
            assert params["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
        else:
            assert "output_config" not in params


def test_a_batch_file_with_bad_lines_is_refused_at_submit_naming_them(tmp_path, env, fake_api):
    data = write_batch_file(tmp_path / "requests.jsonl", 30)
    lines = data.read_text().splitlines()
    for number in range(3, 30, 2):  # 14 lines: another endpoint
        lines[number - 1] = lines[number - 1].replace("/v1/chat/completions", "/v1/embeddings")
    lines[1] = lines[0]  # a custom_id twice
    data.write_text("\n".join(lines) + "\n")
    result = promptmill("run", str(data), "--input-format", "openai-batch", "--backend", "openai",
                        "--out", str(tmp_path / "out"), env=openai_env(env))  # fmt: skip
    assert result.returncode != 0
    message = result.stderr
    assert "15 of 30 lines are not batch requests" in message
    assert "line 2: custom_id 'req-000' is used twice" in message
    assert "line 3: url is '/v1/embeddings'" in message and "and 5 more" in message
    assert fake_api.log() == []  # nothing sent


def test_run_batch_killed_and_run_again_writes_every_request_once_and_pays_none_twice(tmp_path, env, fake_api):
    """`promptmill run-batch` (here on the openai backend) is SIGKILLed, workers and all, a third of
    the way in; the same command again finds its job by the input's hash and the output path and
    sends only what was left: the output holds one line per request, in vLLM's shape."""
    requests = 300
    data = write_batch_file(tmp_path / "requests.jsonl", requests)
    output = tmp_path / "results.jsonl"
    env = openai_env(env)
    fake_api.configure(latency_ms=150)
    command = ["run-batch", "-i", str(data), "-o", str(output), "--backend", "openai"]
    run = start_cli(env, *command)
    try:
        wait_until(lambda: sum(entry["status"] == 200 and "done" in entry for entry in fake_api.log()) >= requests // 3,
                   120, "a third of the requests answered")  # fmt: skip
    finally:
        killed_at = time.monotonic()  # the server's log is on the same clock
        kill_tree(run)
        run.communicate()
    at_kill = fake_api.log()
    assert not output.exists() and len(at_kill) < requests

    fake_api.configure(latency_ms=0)
    again = promptmill(*command, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and again.stdout.strip() == str(output)
    lines = read_jsonl(output)
    assert [line["custom_id"] for line in lines] == [f"req-{i:03d}" for i in range(requests)]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    assert all(line["id"].startswith("vllm-") and line["response"]["body"]["object"] == "chat.completion" for line in lines)
    answered = Counter(entry["prompt"] for entry in fake_api.log() if entry["status"] == 200)
    assert len(answered) == requests
    # Paid twice: only answers on the wire when the workers died (sent before, answered within the
    # last second: not yet committed); an answer committed before the kill is never asked again.
    on_the_wire = {entry["prompt"] for entry in at_kill if entry["t"] < killed_at and entry.get("done", killed_at) > killed_at - 1.0}
    assert {prompt for prompt, count in answered.items() if count > 1} <= on_the_wire
    assert all(count <= 2 for count in answered.values())

    sent = len(fake_api.log())
    third = promptmill(*command, env=env)  # done: nothing is sent again
    assert third.returncode == 0, third.stderr
    assert len(fake_api.log()) == sent and len(read_jsonl(output)) == requests


def test_a_deadline_crossing_sends_the_rows_left_in_real_time_before_it_and_pays_none_twice(
    tmp_path, batch_env, fake_api
):
    """Batches that would not end in time: once the rows left need, at the real-time limit, all the
    time before the deadline but the margin, the batch is cancelled (the half it answered is kept, at
    the batch price) and the rest go through chat completions, before the deadline, at full price."""
    rows = 200
    fake_api.configure(batch_delay_s=3600)
    data, pipeline = write_rows(tmp_path, rows)
    out = tmp_path / "out"
    env = {**batch_env, "PROMPTMILL_DEADLINE_RPM": "6000", "PROMPTMILL_DEADLINE_MARGIN_S": "3"}
    result = promptmill(*batch_run(data, pipeline, out, "--deadline", "40s"), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)

    records = read_jsonl(out / "results.jsonl")
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(rows)]
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    deadline = status["deadline"]
    assert deadline["realtime_since"] is not None and deadline["realtime_since"] < deadline["at"]
    assert max(record["finished_at"] for record in records) < deadline["at"]

    log = fake_api.log()
    in_batches = {entry["prompt"] for entry in log if entry["route"] == "openai_batch" and entry["status"] == 200}
    in_real_time = [entry["prompt"] for entry in log if entry.get("route") == "chat" and entry["status"] == 200]
    assert in_batches and in_real_time and not in_batches & set(in_real_time)  # none paid twice
    assert len(in_batches) + len(in_real_time) == rows and len(set(in_real_time)) == len(in_real_time)
    assert all(b["status"] == "cancelled" for b in fake_api.openai_batches())
    assert (deadline["rows_batch"], deadline["rows_realtime"]) == (len(in_batches), len(in_real_time))
    priced = Counter(record["priced_as"] for record in records)  # each row says how it was priced
    assert priced == {"gpt-4.1-mini@batch": len(in_batches), "gpt-4.1-mini": len(in_real_time)}

    prices = PriceTable.load(Settings())
    price = prices.price_for("gpt-4.1-mini")

    def cost(route: str) -> Decimal:
        usage = [e["usage"] for e in log if e.get("route") == route and e["status"] == 200]
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)  # the system prompt, in real time
        return price.cost_usd(input_tokens=sum(u["prompt_tokens"] for u in usage) - cached, cache_read_input_tokens=cached,
                              output_tokens=sum(u["completion_tokens"] for u in usage))  # fmt: skip

    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    requests = {model["model"]: model["requests"] for model in report["models"] if model["requests"]}
    assert requests == {"gpt-4.1-mini@batch": len(in_batches), "gpt-4.1-mini": len(in_real_time)}
    billed = cost("openai_batch") * prices.batch_discount + cost("chat")
    assert abs(Decimal(str(report["cost_usd"])) - billed) < Decimal("1e-9")


def test_pm_run_batch_is_the_same_run_from_python_and_a_second_call_sends_nothing(tmp_path, env, fake_api, monkeypatch):
    import promptmill as pm
    from promptmill.config.settings import get_settings

    for name in list(os.environ):
        if name.startswith(("PROMPTMILL_", "ANTHROPIC_", "OPENAI_")):
            monkeypatch.delenv(name)
    for name, value in openai_env(env).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        data = write_batch_file(tmp_path / "requests.jsonl", 20, bad_row=3)
        ran = pm.run_batch(data, tmp_path / "results.jsonl", backend="openai", progress=False)
        assert (ran.requests, ran.failed, ran.resumed) == (20, 1, False)
        lines = read_jsonl(tmp_path / "results.jsonl")
        assert [line["custom_id"] for line in lines] == [f"req-{i:03d}" for i in range(20)]
        assert lines[3]["response"]["status_code"] == 400 and "system turns only" in lines[3]["error"]
        sent = len(fake_api.log())
        again = pm.run_batch(data, tmp_path / "results.jsonl", backend="openai", progress=False)
        assert again.job_id == ran.job_id and len(fake_api.log()) == sent
        with pytest.raises(pm.JobError, match="lines are not batch requests"):
            (tmp_path / "bad.jsonl").write_text('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n')
            pm.run_batch(tmp_path / "bad.jsonl", tmp_path / "bad-out.jsonl", backend="openai", progress=False)
    finally:
        get_settings.cache_clear()


def test_rows_are_packed_into_openai_batches_of_at_most_50000_requests_and_200_mb():
    from promptmill.workers.backends.batch_rows import Arrival, packed
    from promptmill.workers.backends.openai_batch import OpenAIBatchBackend as Batches

    small = [Arrival(None, None, {}, size=10) for _ in range(120_001)]  # type: ignore[arg-type]
    assert [len(group) for group in packed(small, Batches.max_requests, Batches.max_bytes)] == [50_000, 50_000, 20_001]
    big = [Arrival(None, None, {}, size=Batches.max_bytes // 2 + 1) for _ in range(3)]  # type: ignore[arg-type]
    groups = packed(big, Batches.max_requests, Batches.max_bytes)
    assert [len(group) for group in groups] == [1, 1, 1]
    assert all(sum(a.size for a in group) <= Batches.max_bytes < 200 * 1024 * 1024 for group in groups)


def test_paths_are_printed_as_they_are_never_read_as_markup(tmp_path, env, fake_api):
    """A folder named like terminal markup (`[red]…`) is printed as its name: the output path of
    `run-batch`, the results of `run` and the page `report` wrote."""
    odd = tmp_path / "[red]out[bold]"
    odd.mkdir()
    data = write_batch_file(odd / "requests.jsonl", 3)
    output = odd / "results.jsonl"
    ran = promptmill("run-batch", "-i", str(data), "-o", str(output), "--backend", "openai", env=openai_env(env))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(output)
    result = promptmill("run", str(data), "--backend", "openai", "--out", str(odd / "run"), env=openai_env(env))
    assert result.returncode == 0, result.stderr
    assert f"results: {odd / 'run' / 'results.jsonl'}" in result.stderr.replace("\n", "")
    report = promptmill("report", job_id_of(result), "--out", str(odd / "report"), env=openai_env(env))
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == str(odd / "report" / "report.html")


@pytest.mark.parametrize("keep", [False, True])
def test_a_batchs_input_file_is_deleted_at_the_provider_once_its_results_are_read(tmp_path, batch_env, fake_api, keep):
    """Every row's prompt sits in a batch's input file at OpenAI: once the batch ends and its results
    are read, the file goes, unless the pipeline keeps it (`keep_batch_files = true`)."""
    import openai as sdk

    fake_api.configure(batch_delay_s=0.3)
    pipeline_text = PIPELINE.replace("max_tokens = 8\n", "max_tokens = 8\nkeep_batch_files = true\n") if keep else PIPELINE
    rows = ({"id": i, "text": f"row {i}", "answer": LABELS[i % 2]} for i in range(6))
    data, pipeline = write_dataset(tmp_path, rows, pipeline_text)
    ran = promptmill(*batch_run(data, pipeline, tmp_path / "out"), env=batch_env)
    assert ran.returncode == 0, ran.stderr
    assert [r["status"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["ok"] * 6
    client = sdk.OpenAI(base_url=batch_env["OPENAI_BASE_URL"], api_key=batch_env["OPENAI_API_KEY"])
    inputs = [file for file in client.files.list().data if file.filename.startswith("promptmill-")]
    assert len(inputs) == (1 if keep else 0), [file.filename for file in inputs]
