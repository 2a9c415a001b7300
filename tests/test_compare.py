"""`promptmill compare` through the real CLI: contenders on the local server's Messages and chat
completions APIs and on the local vLLM engine, each a real job on real workers and Redis."""

from __future__ import annotations

import json
import signal
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from tests.conftest import API_KEY, ROOT, promptmill, read_jsonl
from tests.support import start_cli, wait_until, write_dataset
from tests.test_api_jobs import LABELS

PIPELINE = """
name = "sentiment"
model = "claude-haiku-4-5"
prompt = "Review {id}: {text}"
max_tokens = 8

[output]
type = "choice"
choices = ["positive", "negative"]
"""
FIRST, SECOND = "anthropic:claude-haiku-4-5", "openai:gpt-4.1-mini"


def both_apis(env: dict[str, str]) -> dict[str, str]:
    return {**env, "OPENAI_BASE_URL": env["ANTHROPIC_BASE_URL"] + "/v1", "OPENAI_API_KEY": API_KEY}


def review(i: int) -> dict:
    """Row i's label alternates; both models answer it, except that gpt-4.1-mini answers the opposite on
    every fifth row, and row 7 is refused (400) by both."""
    label = LABELS[i % 2]
    text = f"row {i} [[reply:{label}]]"
    if i % 5 == 0:
        text += f" [[reply@gpt-4.1-mini:{LABELS[(i + 1) % 2]}]]"
    if i == 7:
        text += " [[status:400]]"
    return {"id": i, "text": text, "label": label}


def compare(tmp_path: Path, env: dict[str, str], *extra: str, rows: int = 40, timeout: float = 240):
    data, pipeline = write_dataset(tmp_path, (review(i) for i in range(rows)), PIPELINE)
    args = ["compare", str(data), "--pipeline", str(pipeline), "--against", FIRST, "--against", SECOND]
    return promptmill(*args, "--label", "label", "--out", str(tmp_path / "cmp"), *extra, env=env, timeout=timeout)


def bill(log: list[dict], model: str) -> Decimal:
    """What the server billed for the model's answers, at the price table's prices."""
    price = PriceTable.load(Settings()).price_for(model)
    total = Decimal(0)
    for entry in (e for e in log if e["status"] == 200 and e["model"] == model):
        usage = entry["usage"]
        if entry.get("route") == "chat":
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            total += price.cost_usd(usage["prompt_tokens"] - cached, usage["completion_tokens"], 0, cached)
        else:
            total += price.cost_usd(usage["input_tokens"], usage["output_tokens"])
    return total


def test_two_contenders_on_one_server_have_exact_accuracy_agreement_costs_and_confusion(tmp_path, env, fake_api):
    result = compare(tmp_path, both_apis(env), "--json")
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["contenders"]
    assert (first["backend"], first["model"], second["backend"], second["model"]) == (
        "anthropic", "claude-haiku-4-5", "openai", "gpt-4.1-mini",
    )  # fmt: skip

    answers = {
        FIRST: [None if i == 7 else LABELS[i % 2] for i in range(40)],
        SECOND: [None if i == 7 else LABELS[(i + (i % 5 == 0)) % 2] for i in range(40)],
    }
    for figures, name in ((first, FIRST), (second, SECOND)):
        assert (figures["rows"], figures["ok"], figures["failed"]) == (40, 39, 1)
        assert figures["failures"] == {"invalid_request": 1}
        right = sum(1 for i, answer in enumerate(answers[name]) if answer == LABELS[i % 2])
        assert figures["accuracy"] == round(right / 40, 4)
        assert figures["latency_ms_p95"] >= figures["latency_ms_p50"] > 0 and figures["output_tokens_per_s"] > 0
    assert (first["accuracy"], second["accuracy"]) == (39 / 40, 31 / 40)
    same = sum(1 for a, b in zip(answers[FIRST], answers[SECOND]) if a is not None and a == b)
    assert (first["agreement"], second["agreement"]) == (round(39 / 40, 4), round(same / 40, 4))

    # Costs are the server's bill for each model, at the table's prices (a 400 bills nothing).
    log = fake_api.log()
    for figures, model in ((first, "claude-haiku-4-5"), (second, "gpt-4.1-mini")):
        assert abs(Decimal(str(figures["cost_usd"])) - bill(log, model)) < Decimal("1e-6")
        assert figures["cost_per_1000_rows_usd"] == pytest.approx(figures["cost_usd"] / 40 * 1000, rel=1e-6)

    expected = Counter((str(a or "(failed)"), str(b or "(failed)")) for a, b in zip(answers[FIRST], answers[SECOND]))
    confusion = {(row, column): n for row, counts in second["confusion"].items() for column, n in counts.items()}
    assert confusion == dict(expected)
    assert confusion[("positive", "negative")] == 4 and confusion[("negative", "positive")] == 4

    folder = tmp_path / "cmp"
    side_by_side = read_jsonl(folder / "rows.jsonl")
    assert [line["row"] for line in side_by_side] == list(range(40))
    assert [line["answers"][SECOND] for line in side_by_side][:2] == ["negative", "negative"]
    assert [line["agree"] for line in side_by_side].count(False) == 8
    page = (folder / "compare.html").read_text()
    assert "gpt-4.1-mini" in page and "plotly" in page and 'src="plotly-' in page  # opens offline

    table = promptmill(*compare_args(tmp_path), env=both_apis(env))  # run again: nothing sent, same figures
    assert table.returncode == 0, table.stderr
    assert "resuming the compare" in table.stderr and len(fake_api.log()) == len(log)
    assert "97.5%" in table.stdout and "77.5%" in table.stdout and "projected for all 40 rows" in table.stdout


def compare_args(tmp_path: Path) -> list[str]:
    return [
        "compare", str(tmp_path / "rows.jsonl"), "--pipeline", str(tmp_path / "rows.toml"),
        "--against", FIRST, "--against", SECOND, "--label", "label", "--out", str(tmp_path / "cmp"),
    ]  # fmt: skip


JSON_PIPELINE = """
name = "extract"
model = "claude-haiku-4-5"
prompt = "Review {id}: {text}"
max_tokens = 64

[output]
type = "json"
schema = { type = "object", properties = { stars = { type = "integer" }, recommend = { type = "boolean" } } }
"""


def test_json_outputs_are_scored_field_by_field_against_a_label_object(tmp_path, env, fake_api):
    """A label object of two fields: haiku answers it exactly; gpt-4.1-mini gets `stars` wrong on every
    fourth row, so it has 35 of 40 fields right (not 15 of 20 rows)."""

    def row(i: int) -> dict:
        label = {"stars": i % 5 + 1, "recommend": i % 2 == 0}
        wrong = {**label, "stars": 6 - label["stars"] if label["stars"] != 3 else 1}
        mini = wrong if i % 4 == 0 else label
        text = f"[[reply:{json.dumps(label)}]] [[reply@gpt-4.1-mini:{json.dumps(mini)}]]"
        return {"id": i, "text": text, "label": label}

    data, pipeline = write_dataset(tmp_path, (row(i) for i in range(20)), JSON_PIPELINE)
    result = promptmill("compare", str(data), "--pipeline", str(pipeline), "--against", FIRST, "--against", SECOND,
                        "--label", "label", "--out", str(tmp_path / "cmp"), "--json", env=both_apis(env))  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["contenders"]
    assert (first["ok"], second["ok"]) == (20, 20)
    assert (first["accuracy"], second["accuracy"]) == (1.0, round(35 / 40, 4))
    assert (first["agreement"], second["agreement"]) == (1.0, round(35 / 40, 4))


def test_a_message_batches_contender_answers_the_same_rows_at_half_the_price(tmp_path, env, fake_api):
    """Any backend is a contender: the same model through Message Batches, billed at the batch discount."""
    batches = {**env, "PROMPTMILL_BATCH_GATHER_S": "0.5", "PROMPTMILL_BATCH_POLL_MIN_S": "0.3",
               "PROMPTMILL_BATCH_POLL_MAX_S": "0.6", "PROMPTMILL_BATCH_HOLD_S": "3"}  # fmt: skip
    data, pipeline = write_dataset(tmp_path, (review(i) for i in range(20)), PIPELINE)
    batch = "anthropic-batch:claude-haiku-4-5"
    result = promptmill("compare", str(data), "--pipeline", str(pipeline), "--against", "anthropic:claude-haiku-4-5",
                        "--against", batch, "--label", "label", "--out", str(tmp_path / "cmp"), "--json", env=batches)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["contenders"]
    # The server's batch route answers row 7 (its 400 marker is the Messages route's): 20 ok, all right;
    # the first contender's refused row 7 counts as a disagreement.
    assert (second["backend"], second["rows"], second["ok"], second["failed"]) == ("anthropic-batch", 20, 20, 0)
    assert (first["accuracy"], second["accuracy"], second["agreement"]) == (19 / 20, 1.0, 19 / 20)
    served = [e["usage"] for e in fake_api.log() if e.get("route") == "batch"]
    assert len(served) == 20
    tokens = {name: sum(u[name] for u in served) for name in ("input_tokens", "output_tokens")}
    prices = PriceTable.load(Settings())
    billed = prices.price_for("claude-haiku-4-5").cost_usd(**tokens) * prices.batch_discount
    assert abs(Decimal(str(second["cost_usd"])) - billed) < Decimal("1e-9")


def test_a_sample_is_seeded_and_a_bad_contender_fails_before_anything_runs(tmp_path, env, fake_api):
    result = compare(tmp_path, both_apis(env), "--sample", "10", "--seed", "3", "--json", rows=100)
    assert result.returncode == 0, result.stderr
    sampled = [line["row"] for line in read_jsonl(tmp_path / "cmp" / "rows.jsonl")]
    assert len(sampled) == 10 and sampled == sorted(sampled) and len(set(sampled)) == 10
    compare(tmp_path / "again", both_apis(env), "--sample", "10", "--seed", "3", rows=100)
    assert [line["row"] for line in read_jsonl(tmp_path / "again" / "cmp" / "rows.jsonl")] == sampled
    assert json.loads(result.stdout)["contenders"][0]["projection"]["rows"] == 100

    sent = len(fake_api.log())
    data = str(tmp_path / "rows.jsonl")
    for contender, message in (
        ("anthropic:no-such-model", "--against anthropic:no-such-model: model:"),
        ("gemini:pro", "backend 'gemini' is not one of"),
        ("openai:gpt-4.1-mini,temperature=hot", "temperature must be a number"),
        ("openai:gpt-4.1-mini,temperature=9", "--against openai:gpt-4.1-mini,temperature=9.0: temperature:"),
    ):
        out = str(tmp_path / contender.replace(":", "_"))
        bad = promptmill("compare", data, "-p", str(tmp_path / "rows.toml"), "--against", FIRST, "--against",
                         contender, "--out", out, env=both_apis(env))  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert len(fake_api.log()) == sent

    other = promptmill("compare", data, "-p", str(tmp_path / "rows.toml"), "--against", FIRST, "--against", SECOND,
                       "--sample", "11", "--out", str(tmp_path / "cmp"), env=both_apis(env))  # fmt: skip
    assert other.returncode == 2 and "holds another compare" in other.stderr


def test_a_compare_stopped_in_its_second_contender_resumes_and_pays_for_no_row_twice(tmp_path, env, fake_api):
    fake_api.configure(latency_ms=40)
    write_dataset(tmp_path, (review(i) for i in range(120)), PIPELINE)
    args = [*compare_args(tmp_path), "--workers", "1"]
    run = start_cli({**both_apis(env), "PROMPTMILL_CHUNK_SIZE": "5"}, *args)

    def answered(model: str) -> int:
        return sum(1 for e in fake_api.log() if e["status"] == 200 and e["model"] == model)

    wait_until(lambda: answered("gpt-4.1-mini") >= 20 or run.poll() is not None, 180, "the second contender")
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert "go on with the same promptmill compare command" in stderr
    stopped_at = answered("gpt-4.1-mini")
    assert answered("claude-haiku-4-5") == 119 and stopped_at < 119

    resumed = promptmill(*args, "--json", env=both_apis(env))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the compare" in resumed.stderr
    served = Counter((e["model"], e["prompt"]) for e in fake_api.log() if e["status"] == 200)
    assert len(served) == 2 * 119 and set(served.values()) == {1}  # every row answered once per model
    first, second = json.loads(resumed.stdout)["contenders"]
    assert (first["ok"], second["ok"]) == (119, 119)
    log = fake_api.log()
    assert abs(Decimal(str(second["cost_usd"])) - bill(log, "gpt-4.1-mini")) < Decimal("1e-6")


@pytest.mark.vllm
@pytest.mark.timeout(900)  # an engine's start and 40 rows, on a machine other test processes' engines load too
def test_a_server_model_against_the_local_engine_on_the_examples(tmp_path, env, fake_api):
    """The examples' pipeline on a sample of their reviews: a server model that calls every review
    positive against the demo's local model, which must be right on at least 80% of them."""
    fake_api.configure(reply="positive")
    result = promptmill(
        "compare", str(ROOT / "examples" / "reviews.jsonl"), "--pipeline", str(ROOT / "examples" / "sentiment.toml"),
        "--sample", "40", "--against", "anthropic:claude-haiku-4-5", "--against", "vllm:gemma3-270m",
        "--label", "label", "--out", str(tmp_path / "cmp"), "--json", env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    server, engine = json.loads(result.stdout)["contenders"]
    side_by_side = read_jsonl(tmp_path / "cmp" / "rows.jsonl")
    labels = [line["label"] for line in side_by_side]
    engine_answers = [line["answers"]["vllm:gemma3-270m"] for line in side_by_side]
    assert (server["ok"], server["accuracy"]) == (40, round(labels.count("positive") / 40, 4))
    right = sum(1 for label, answer in zip(labels, engine_answers) if answer == label)
    assert engine["accuracy"] == round(right / 40, 4) >= 0.8
    assert engine["agreement"] == round(engine_answers.count("positive") / 40, 4)
    assert engine["confusion"] == {"positive": dict(sorted(Counter(engine_answers).items()))}
    assert engine["output_tokens_per_s"] > 0 and engine["latency_ms_p50"] > 0
    assert engine["cost_usd"] > 0 and server["cost_usd"] > 0  # the engine's device time, the server's bill


def test_an_error_that_looks_like_markup_is_printed_as_it_is_and_the_compare_ends(tmp_path, env, fake_api):
    """A contender stopped by an error whose text holds rich's markup ("[/...]") is told as it is; the
    compare still scores the others and writes its page, then names the failed contender and exits 1
    (never a 0% accuracy with exit 0)."""
    message = "key [/bold] refused [/] here [red]"
    fake_api.configure(down={"gpt-4.1-mini": 401}, error_message=message)
    result = compare(tmp_path, both_apis(env))
    assert "MarkupError" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert f"{SECOND} stopped failed:" in result.stderr and message in result.stderr
    assert f"error: {SECOND}: its job failed" in result.stderr
    assert FIRST not in result.stderr.split("error:")[1]  # the contender that answered is not named
    assert (tmp_path / "cmp" / "compare.html").exists()
