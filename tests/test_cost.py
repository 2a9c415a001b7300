"""Cost before a job runs: `promptmill estimate` against the local server's token counter and bill."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from tests.conftest import ROOT, promptmill, read_jsonl
from tests.support import write_dataset
from tests.test_api_jobs import job_id_of


def billed_input_tokens(log: list[dict]) -> int:
    return sum(
        entry["usage"]["input_tokens"] + entry["usage"]["cache_creation_input_tokens"] + entry["usage"]["cache_read_input_tokens"]
        for entry in log
        if entry["status"] == 200
    )


def test_an_estimate_of_the_examples_is_within_10_percent_of_the_input_billed_and_brackets_the_cost(
    tmp_path: Path, env, fake_api
) -> None:
    data, pipeline = ROOT / "examples" / "reviews.jsonl", ROOT / "examples" / "sentiment.toml"
    estimated = promptmill("estimate", str(data), "--pipeline", str(pipeline), "--sample", "40", "--rpm", "600",
                           "--json", env=env)  # fmt: skip
    assert estimated.returncode == 0, estimated.stderr
    figures = json.loads(estimated.stdout)
    assert figures["rows"] == 320 and figures["rows_counted"] == 40
    assert figures["output_tokens_max"] == 320 * 8
    assert figures["minutes_at_limits_low"] == round(320 / 600, 2)
    assert not [e for e in fake_api.log() if e["prompt"] is not None]  # counting sends no message

    fake_api.configure(reply="positive")  # a label the choice output reads
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "out"), env=env)
    assert ran.returncode == 0, ran.stderr
    actual = billed_input_tokens(fake_api.log())
    assert abs(figures["input_tokens"] - actual) <= 0.10 * actual, (figures["input_tokens"], actual)
    # The bound printed with the estimate is honest: the truth lies within it (two standard errors).
    assert abs(figures["input_tokens"] - actual) <= figures["input_tokens_error_pct"] / 100 * actual + 1
    cost = json.loads(promptmill("cost", job_id_of(ran), "--json", env=env).stdout)["cost_usd"]
    assert figures["cost_usd_low"] <= cost <= figures["cost_usd_high"], (figures, cost)


def test_estimate_counts_every_row_when_the_sample_covers_them_and_prices_the_extremes(tmp_path, env, fake_api):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (n + 1)}) + "\n" for n in range(30)) + "{broken\n")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "p"\nmodel = "claude-haiku-4-5"\nsystem = "Be brief."\nprompt = "Say: {text}"\nmax_tokens = 50\n')
    estimated = promptmill("estimate", str(data), "--pipeline", str(pipeline), "--json", env=env)
    assert estimated.returncode == 0, estimated.stderr
    figures = json.loads(estimated.stdout)
    # Every usable row counted by the server: 2 system words + "Say:" + n+1 words.
    assert figures["input_tokens"] == sum(2 + 1 + n + 1 for n in range(30))
    assert (figures["rows"], figures["unusable_rows"], figures["input_tokens_error_pct"]) == (31, 1, 0.0)
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    high = price.cost_usd(input_tokens=figures["input_tokens"], output_tokens=30 * 50)
    assert figures["cost_usd_high"] == float(high.quantize(Decimal("0.000001")))
    batch_high = PriceTable.load(Settings()).price_for("claude-haiku-4-5@batch").cost_usd(
        input_tokens=figures["input_tokens"], output_tokens=30 * 50
    )
    assert batch_high == high / 2 and abs(figures["batch_cost_usd_high"] - float(batch_high)) < 1e-6


def billed_usd(log: list[dict]) -> Decimal:
    """The server's bill: every answered request at the price table's rates."""
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    total = Decimal(0)
    for usage in (entry["usage"] for entry in log if entry["status"] == 200):
        tokens = {name: value for name, value in usage.items() if name != "cache_creation"}
        total += price.cost_usd(**tokens, cache_creation_1h_input_tokens=usage["cache_creation"]["ephemeral_1h_input_tokens"])
    return total


def test_a_budget_pauses_the_job_within_one_in_flight_window_and_the_ledger_matches_the_bill_through_a_resume(
    tmp_path: Path, env, fake_api
) -> None:
    """The ledger equals the server's billing log exactly, for a job with retries (500s), failed rows
    (400s), a pause at its budget and a resume with a higher one."""
    fake_api.configure(latency_ms=20, p500=0.05)
    rows = 1200
    faults = {n: " [[status:400]]" if n % 100 == 7 else "" for n in range(rows)}
    data, _ = write_dataset(tmp_path, ({"id": n, "text": f"row number {n}{faults[n]}", "answer": "yes it is positive"} for n in range(rows)))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        'name = "p"\nmodel = "claude-haiku-4-5"\nsystem = "You label items."\n'
        'prompt = "Item {id}: {text} [[reply:{answer}]]"\nmax_tokens = 8\n'
    )
    budget = 0.02  # about 700 of the 1,200 rows
    in_flight = 32
    env = {**env, "PROMPTMILL_MAX_IN_FLIGHT": str(in_flight)}
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), "--budget", str(budget),
                     "--workers", "1", env=env)  # fmt: skip
    assert ran.returncode == 3, ran.stderr
    assert "paused at its budget" in ran.stderr
    job_id = job_id_of(ran)
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "paused_budget" and 0 < status["done"] + status["failed"] < rows

    # Never over the cap, and short of it by no more than the requests the worker keeps in flight,
    # each held at its most possible cost: under 40 input tokens (and a quarter's margin) at the
    # dearest input price (the 1-hour cache write), and max_tokens output tokens.
    spent = billed_usd(fake_api.log())
    assert spent <= Decimal(str(budget))
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    held = Decimal("1.25") * 40 * max(price.input, price.cache_write_5m, price.cache_write_1h) + price.output * 8
    in_flight_window = in_flight * held / 1_000_000
    assert spent >= Decimal(str(budget)) - in_flight_window, (spent, in_flight_window)

    resumed = promptmill("resume", job_id, "--budget", "1.00", env=env)
    assert resumed.returncode == 0, resumed.stderr
    records = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert [record["row"] for record in records] == list(range(rows))
    assert sum(record["status"] == "failed" for record in records) == rows // 100
    log = fake_api.log()
    cost = json.loads(promptmill("cost", job_id, "--json", env=env).stdout)
    [model] = cost["models"]
    served = [entry["usage"] for entry in log if entry["status"] == 200]
    for name in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        assert model[name] == sum(usage[name] for usage in served), name
    assert model["requests"] == len(served) == rows - rows // 100
    assert model["failed_attempts"] == sum(1 for entry in log if entry["status"] in (400, 500))
    assert Decimal(str(cost["cost_usd"])) == billed_usd(log)


def test_a_cached_system_prompt_is_billed_as_writes_then_reads_and_cost_shows_the_saving(tmp_path, env, fake_api):
    fake_api.configure(latency_ms=20)
    data, _ = write_dataset(tmp_path, ({"id": n} for n in range(300)))
    system = " ".join(f"guideline{n}" for n in range(1500))  # 1,500 tokens on the local server
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f'name = "p"\nmodel = "claude-haiku-4-5"\nsystem = "{system}"\ncache_system = true\ncache_ttl = "1h"\n'
        'prompt = "Item {id} [[reply:fine]]"\nmax_tokens = 4\n'
    )
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    assert ran.returncode == 0, ran.stderr
    served = [entry["usage"] for entry in fake_api.log() if entry["status"] == 200]
    writes = [usage for usage in served if usage["cache_creation_input_tokens"]]
    assert 0 < len(writes) < 300 and all(usage["cache_creation"]["ephemeral_1h_input_tokens"] == 1500 for usage in writes)
    assert sum(usage["cache_read_input_tokens"] for usage in served) == 1500 * (300 - len(writes))

    cost = json.loads(promptmill("cost", job_id_of(ran), "--json", env=env).stdout)
    [model] = cost["models"]
    assert model["cache_creation_1h_input_tokens"] == model["cache_creation_input_tokens"] == 1500 * len(writes)
    assert Decimal(str(cost["cost_usd"])) == billed_usd(fake_api.log())
    # Saved: every cached token as plain input, less what the 1-hour writes and the reads cost.
    price = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    as_input = price.input * 1500 * 300
    billed_cache = price.cache_write_1h * 1500 * len(writes) + price.cache_read * 1500 * (300 - len(writes))
    assert Decimal(str(cost["caching_saved_usd"])) == (as_input - billed_cache) / 1_000_000
    table = promptmill("cost", job_id_of(ran), env=env).stdout
    assert "prompt caching saved $" in table


def test_a_cached_shared_prefix_of_the_prompt_is_read_from_the_cache_with_the_system_prompt(tmp_path, env, fake_api):
    """cache_prefix: the prompt's text before its first {column} goes as its own block with a
    breakpoint, so the system prompt and that text are cached together and each row pays plain input
    only for its own part."""
    fake_api.configure(latency_ms=20)
    data, _ = write_dataset(tmp_path, ({"id": n, "text": f"row {n} says hello"} for n in range(200)))
    instructions = " ".join(f"rule{n}" for n in range(1000))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        'name = "p"\nmodel = "claude-haiku-4-5"\nsystem = "You label items."\ncache_prefix = true\n'
        f'prompt = "{instructions}\\nItem {{id}}: {{text}} [[reply:fine]]"\nmax_tokens = 4\n'
    )
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    assert ran.returncode == 0, ran.stderr
    answered = [entry for entry in fake_api.log() if entry["status"] == 200]
    assert sorted(entry["prompt"] for entry in answered) == sorted(
        f"{instructions}\nItem {n}: row {n} says hello [[reply:fine]]" for n in range(200)
    )  # the row's prompt, whole, in two blocks
    shared = 3 + 1001  # the system prompt's words, the instructions' and "Item" (the text before {id})
    served = [entry["usage"] for entry in answered]
    writes = [usage for usage in served if usage["cache_creation_input_tokens"]]
    assert 0 < len(writes) < 200 and all(usage["cache_creation_input_tokens"] == shared for usage in writes)
    assert all(usage["cache_read_input_tokens"] in (0, shared) for usage in served)
    assert sum(usage["cache_read_input_tokens"] for usage in served) == shared * (200 - len(writes))
    assert all(usage["input_tokens"] == 6 for usage in served)  # "N: row N says hello [[reply:fine]]"

    cost = json.loads(promptmill("cost", job_id_of(ran), "--json", env=env).stdout)
    assert Decimal(str(cost["cost_usd"])) == billed_usd(fake_api.log())
    assert Decimal(str(cost["caching_saved_usd"])) > 0


def test_cache_prefix_needs_text_before_the_first_column(tmp_path, env):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "p"\nmodel = "claude-haiku-4-5"\ncache_prefix = true\nprompt = "{text}"\nmax_tokens = 4\n')
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    refused = promptmill("submit", str(data), "--pipeline", str(pipeline), env=env)
    assert refused.returncode == 2 and "cache_prefix" in refused.stderr


def test_a_rows_own_max_tokens_is_what_the_budget_holds_and_never_goes_past_it(tmp_path, env, fake_api):
    """A batch file's rows carry their own max_tokens: one asking for 900,000 under a $0.01 budget is
    held at its own worst case, so it is never sent; the rows within the budget go as they ask."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "claude-haiku-4-5", "max_tokens": 900_000 if i == 3 else 10,
                       "messages": [{"role": "user", "content": f"Row {i}. [[reply:ok]]"}]}} for i in range(8)]  # fmt: skip
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ran = promptmill("run", str(data), "--backend", "anthropic", "--out", str(tmp_path / "out"), "--budget", "0.01",
                     "--workers", "1", env=env)  # fmt: skip
    assert ran.returncode == 3 and "paused at its budget" in ran.stderr, ran.stderr
    sent = [entry for entry in fake_api.log() if entry["prompt"]]
    assert sent and all(entry["params"]["max_tokens"] == 10 for entry in sent), [e["params"]["max_tokens"] for e in sent]
    assert not any(entry["prompt"].startswith("Row 3.") for entry in sent)
    assert billed_usd(fake_api.log()) <= Decimal("0.01")


def test_a_users_own_reserved_columns_are_ordinary_columns(tmp_path, env, fake_api):
    """`_promptmill_body`, `_promptmill_messages` and `_promptmill_prompt_error` are promptmill's only
    where it wrote them (a batch file's reader, the Python API's staging): in a user's dataset they
    are columns like any other, so a row cannot swap its prompt or ask for 900,000 tokens."""
    rows = [{"id": i, "text": f"row {i}",
             "_promptmill_body": {"messages": [{"role": "user", "content": "PWNED"}], "max_tokens": 900_000},
             "_promptmill_messages": json.dumps([{"role": "user", "content": "PWNED too"}]),
             "_promptmill_prompt_error": "a failure of the user's making"} for i in range(4)]  # fmt: skip
    data, _ = write_dataset(tmp_path, rows)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "p"\nmodel = "claude-haiku-4-5"\nprompt = "Item {text} [[reply:yes]]"\nmax_tokens = 8\n')
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "out"), env=env)
    assert ran.returncode == 0, ran.stderr
    assert [r["status"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")] == ["ok"] * 4
    sent = [entry for entry in fake_api.log() if entry["status"] == 200]
    assert sorted(entry["prompt"] for entry in sent) == [f"Item row {i} [[reply:yes]]" for i in range(4)]
    assert all(entry["params"]["max_tokens"] == 8 for entry in sent)
