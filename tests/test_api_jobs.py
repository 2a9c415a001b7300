"""Whole jobs through the API backend: the real CLI, real Celery workers, the real anthropic SDK
against the local Anthropic-protocol server, and a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.state.store import JobStore
from tests.conftest import ROOT, promptmill, read_jsonl
from tests.support import PROMPTMILL, write_dataset

LABELS = ("positive", "negative")
PIPELINE = """
name = "label"
model = "claude-haiku-4-5"
system = "You label items with one word."
prompt = "Item {id}: {text} [[reply:{answer}]]"
max_tokens = 8

[output]
type = "choice"
choices = ["positive", "negative"]
"""


def write_job(tmp_path: Path, rows: int) -> tuple[Path, Path]:
    answers = ({"id": i, "text": f"row number {i}", "answer": f"The item is {LABELS[i % 2]}."} for i in range(rows))
    return write_dataset(tmp_path, answers, PIPELINE)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    first = result.stdout.splitlines()[0]
    assert first.startswith("job "), result.stdout + result.stderr
    return first.split()[1]


def successes_by_prompt(log: list[dict]) -> Counter:
    return Counter(entry["prompt"] for entry in log if entry["status"] == 200)


def test_2000_rows_with_4_workers_end_complete_in_order_with_exact_tokens_and_cost(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 2000)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "4", env=env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)

    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(2000))
    assert all(record["status"] == "ok" for record in records)
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(2000)]
    assert read_jsonl(out / "failures.jsonl") == []

    served = [entry["usage"] for entry in fake_api.log() if entry["status"] == 200]
    assert len(served) == 2000
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "complete"
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (2000, 2000, 0, 0)
    expected = {
        "input": sum(u["input_tokens"] for u in served),
        "output": sum(u["output_tokens"] for u in served),
        "cache_read": sum(u["cache_read_input_tokens"] for u in served),
        "cache_creation": sum(u["cache_creation_input_tokens"] for u in served),
    }
    assert status["tokens"] == expected
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    cost = price.cost_usd(expected["input"], expected["output"], expected["cache_creation"], expected["cache_read"])
    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    assert cost > 0 and abs(Decimal(str(report["cost_usd"])) - cost) < Decimal("1e-9")
    assert report["models"][0]["requests"] == 2000


def test_injected_429_500_529_timeouts_and_drops_still_end_complete_with_no_row_answered_twice(
    tmp_path, env, fake_api
):
    fake_api.configure(p429=0.1, p500=0.08, p529=0.04, p_timeout=0.01, p_drop=0.01, retry_after=0.01)
    # 24% of attempts fail: with the default 6 attempts one row in ~10 runs would exhaust them.
    env["PROMPTMILL_MAX_ATTEMPTS"] = "12"
    env["PROMPTMILL_REQUEST_TIMEOUT_S"] = "1"
    data, pipeline = write_job(tmp_path, 600)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "2", env=env)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(600))
    assert [r for r in records if r["status"] != "ok"] == []
    log = fake_api.log()
    assert {entry["status"] for entry in log} >= {200, 429, 500, 529, "timeout", "dropped"}
    assert max(successes_by_prompt(log).values()) == 1
    assert len(successes_by_prompt(log)) == 600
    assert sum(record["attempts"] for record in records) == len(log)


def test_malformed_rows_become_failed_items_with_reasons_and_the_job_goes_on(tmp_path, env, fake_api):
    data = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": 0, "text": "fine", "answer": "positive"}).encode(),
        b'{"id": 1, "text": "broken',  # bad JSON
        json.dumps({"id": 2, "answer": "negative"}).encode(),  # no "text" column
        b"[1, 2, 3]",  # not an object
        b'{"id": 4, "text": "caf\xe9", "answer": "positive"}',  # not UTF-8
        json.dumps({"id": 5, "text": "poisoned [[status:400]]", "answer": "positive"}).encode(),
        json.dumps({"id": 6, "text": "rambles", "answer": "I cannot tell"}).encode(),
        json.dumps({"id": 7, "text": "fine too", "answer": "negative"}).encode(),
    ]
    data.write_bytes(b"\n".join(lines) + b"\n")
    pipeline = tmp_path / "label.toml"
    pipeline.write_text(PIPELINE)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--chunk-size", "3", env=env)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(8))
    kinds = {r["row"]: (r["error"] or {}).get("kind") for r in records}
    assert kinds == {
        0: None,
        1: "invalid_row",
        2: "render_error",
        3: "invalid_row",
        4: "invalid_row",
        5: "invalid_request",
        6: "unparseable_output",
        7: None,
    }
    assert "not valid JSON" in records[1]["error"]["message"]
    assert "no column 'text'" in records[2]["error"]["message"]
    assert "UTF-8" in records[4]["error"]["message"]
    assert "poisoned" in records[5]["error"]["message"]
    assert [r["row"] for r in read_jsonl(out / "failures.jsonl")] == [1, 2, 3, 4, 5, 6]

    job_id = job_id_of(result)
    for fmt in ("parquet", "csv"):
        exported = promptmill("export", job_id, "--format", fmt, "--out", str(out / fmt), env=env)
        assert exported.returncode == 0, exported.stderr
    import csv

    import pyarrow.parquet as pq

    table = pq.read_table(out / "parquet" / "results.parquet").to_pylist()
    assert [r["row"] for r in table] == list(range(8))
    assert [r["error_kind"] for r in table] == [kinds[i] for i in range(8)]
    with (out / "csv" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["row"]) for r in rows] == list(range(8)) and rows[0]["output"] == '"positive"'


def test_a_refused_api_key_stops_the_job_with_a_clear_message_and_loses_nothing(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 300)
    bad_env = {**env, "ANTHROPIC_API_KEY": "wrong-key"}
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=bad_env)
    assert result.returncode == 1
    assert "refused the job" in result.stderr and "authentication_error" in result.stderr
    job_id = job_id_of(result)
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "failed" and "401" in status["error"]
    assert status["done"] == 0 and status["pending"] == 300 - status["failed"]
    # With the right key the same job resumes and completes.
    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_jsonl(tmp_path / "o" / "results.jsonl")) == 300


def test_bad_config_fails_at_submit_naming_the_field(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 3)
    unknown = promptmill("submit", str(data), "--pipeline", str(pipeline), "--model", "claude-nonesuch-9", env=env)
    assert unknown.returncode == 2 and "model" in unknown.stderr and "claude-nonesuch-9" in unknown.stderr
    no_key = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    keyless = promptmill("submit", str(data), "--pipeline", str(pipeline), env=no_key)
    assert keyless.returncode == 2 and "anthropic_api_key" in keyless.stderr


def test_worker_killed_mid_job_then_resume_completes_without_paying_twice(tmp_path, env, fake_api):
    fake_api.configure(latency_ms=20)
    data, pipeline = write_job(tmp_path, 1500)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    workers = [
        subprocess.Popen(
            [PROMPTMILL, "worker", "--queues", "api", "--chunks", "2"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    deadline = time.monotonic() + 120
    while store.status(job_id).terminal < 400:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    for worker in workers:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    done_at_kill = store.status(job_id).terminal
    assert done_at_kill < 1500

    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    records = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert [r["row"] for r in records] == list(range(1500))
    assert all(r["status"] == "ok" for r in records)
    twice = sum(count - 1 for count in successes_by_prompt(fake_api.log()).values() if count > 1)
    # Only answers on the wire when the workers died may be paid twice: 2 processes x 2 chunks a process.
    assert twice <= 2 * 2 * Settings().chunk_size
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["done"] == 1500


def test_a_csv_export_shows_a_formula_like_cell_as_text_in_a_spreadsheet(tmp_path, env, fake_api):
    """An input's text or a model's answer that starts like a formula (`=HYPERLINK(...)`, `+`, `-`,
    `@`) is written to CSV with a leading apostrophe, as spreadsheet programs take it; the JSONL
    results keep the text as it came."""
    import csv

    evil = ["=HYPERLINK(\"http://x\",\"y\")", "+1+cmd", "-2+3", "@SUM(A1)", "fine"]
    rows = [{"id": i, "text": f"row {i}", "note": text, "answer": text} for i, text in enumerate(evil)]
    free_text = 'name = "echo"\nmodel = "claude-haiku-4-5"\nprompt = "Item {id}: {text} [[reply:{answer}]]"\nmax_tokens = 20\n'
    data, pipeline = write_dataset(tmp_path, rows, free_text)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--keep-columns", "note", env=env)
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in read_jsonl(out / "results.jsonl")] == evil  # the answers, as they came
    exported = promptmill("export", job_id_of(result), "--format", "csv", "--out", str(out / "csv"), env=env)
    assert exported.returncode == 0, exported.stderr
    with (out / "csv" / "results.csv").open(newline="") as handle:
        cells = list(csv.DictReader(handle))
    shown = [("'" + text if text != "fine" else text) for text in evil]
    assert [cell["text"] for cell in cells] == [cell["note"] for cell in cells] == shown
    assert all(not value.startswith(("=", "+", "-", "@")) for cell in cells for value in cell.values())
