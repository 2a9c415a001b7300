"""Streamed answers that break off: the connection drops after the first words, or the stream closes
cleanly before its end. Neither is an answer nor a job's failure: the row is sent again, and what the
provider billed for the broken attempt stays in the ledger. The real CLI and workers, the real SDKs
against the local server, which breaks its streams on request and logs what it billed."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from tests.conftest import promptmill, read_jsonl
from tests.support import write_dataset
from tests.test_api_jobs import job_id_of

ROWS = 200
REPLY = "The item is positive."
PIPELINE = f"""
name = "streamed"
model = "claude-haiku-4-5"
prompt = "Item {{id}}: {{text}} [[reply:{REPLY}]]"
max_tokens = 16
stream = true
"""
BROKEN = ("stream_dropped", "stream_cut")


def run_streamed(tmp_path, env, backend: str, model: str):
    data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(ROWS)), PIPELINE)
    out = tmp_path / backend
    result = promptmill("run", str(data), "-p", str(pipeline), "--backend", backend, "--model", model,
                        "--out", str(out), env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return job_id_of(result), read_jsonl(out / "results.jsonl")


def assert_every_row_answered_once_whole(records: list[dict], log: list[dict]) -> None:
    """Each row ends ok with the whole reply, its broken attempts counted as dropped connections."""
    assert [r["status"] for r in records] == ["ok"] * ROWS
    assert all(r["text"] == REPLY for r in records), "a broken stream's first words were taken for the answer"
    broken = Counter(e["status"] for e in log if e["status"] in BROKEN)
    assert broken["stream_dropped"] > 0 and broken["stream_cut"] > 0, broken
    errors = [error for r in records for error in r["errors"]]
    assert len(errors) == sum(broken.values()) and all(error["status"] == "dropped" for error in errors)
    ended_early = [e for e in errors if "stream ended before" in e["message"]]
    assert len(ended_early) == broken["stream_cut"]
    assert all(r["attempts"] == len(r["errors"]) + 1 for r in records)
    assert sum(r["attempts"] for r in records) == len(log)  # nothing sent but these attempts


def test_anthropic_streams_that_break_are_retried_and_the_ledger_equals_the_servers_bill(tmp_path, env, fake_api):
    fake_api.configure(p_stream_drop=0.1, p_stream_cut=0.05)
    job_id, records = run_streamed(tmp_path, env, "anthropic", "claude-haiku-4-5")
    log = fake_api.log()
    assert_every_row_answered_once_whole(records, log)

    # The server billed every answer and every broken one (its input, the output it had said); the
    # ledger and paid_twice hold exactly that.
    billed = [e["usage"] for e in log if e["status"] == 200 or e["status"] in BROKEN]
    tokens = {name: sum(u[name] for u in billed) for name in ("input_tokens", "output_tokens")}
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    report = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    (model,) = report["models"]
    twice = report["paid_twice"]["models"].get("claude-haiku-4-5", {})
    assert {name: model[name] + twice.get(name, 0) for name in tokens} == tokens
    assert model["requests"] + twice.get("requests", 0) == len(billed)
    assert model["failed_attempts"] == len(billed) - ROWS
    paid = Decimal(str(report["cost_usd"])) + Decimal(str(report["paid_twice"]["cost_usd"]))
    assert abs(paid - price.cost_usd(**tokens)) < Decimal("1e-9")
    assert promptmill("verify", job_id, env=env).returncode == 0  # the broken attempts' usage is accounted for


def test_openai_streams_that_break_are_retried_never_taken_for_a_free_answer(tmp_path, env, fake_api):
    """OpenAI sends a stream's usage in its last chunk: a broken one's bill is out of the client's
    sight, so the ledger holds the whole answers', exactly, and never a $0 half answer."""
    fake_api.configure(p_stream_drop=0.1, p_stream_cut=0.05)
    both = {**env, "OPENAI_BASE_URL": env["ANTHROPIC_BASE_URL"] + "/v1", "OPENAI_API_KEY": env["ANTHROPIC_API_KEY"]}
    job_id, records = run_streamed(tmp_path, both, "openai", "gpt-4.1-mini")
    log = fake_api.log()
    assert_every_row_answered_once_whole(records, log)
    answered = [e["usage"] for e in log if e["status"] == 200]
    assert all(r["usage"]["output_tokens"] == 4 for r in records)  # never usage 0 from a stream cut short
    report = json.loads(promptmill("cost", job_id, "--json", env=both).stdout)
    (model,) = report["models"]
    assert (model["input_tokens"], model["output_tokens"], model["requests"]) == (
        sum(u["prompt_tokens"] for u in answered), sum(u["completion_tokens"] for u in answered), ROWS
    )  # fmt: skip
    assert promptmill("verify", job_id, env=both).returncode == 0
