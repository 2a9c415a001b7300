"""Output tokens per second on the local engine: raw vLLM, `vllm run-batch`, and promptmill end to end.

    .venv/bin/python bench/vllm_throughput.py                  # 2,000 prompts, every method (about 20 min here)
    .venv/bin/python bench/vllm_throughput.py --rows 400 --methods raw promptmill   # and time to first row

The prompts are the example reviews, half asking for a one-word label and half for a short summary
(varied output lengths, as a real job has), each made unique. Every method gets the same chat
messages, the same sampling (greedy, max_tokens 48) and the same engine arguments (promptmill's own
`engine_args`), in a process of its own, and each time includes the engine's start:
- `raw`: one `LLM.chat` over all prompts, the engine's best case (no checkpointing at all);
- `run-batch`: `python -m vllm.entrypoints.openai.run_batch` over the same requests in OpenAI batch JSONL;
- `promptmill`: `promptmill run --backend vllm --workers 1`: Redis, a Celery worker, per-row commits, export;
- `killed`: the same, SIGKILLed (run, worker and engine) when half the rows are done, then `promptmill
  resume`: the wall time is both runs together.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promptmill.config.settings import Settings  # noqa: E402
from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from promptmill.jobs.state.store import JobStore  # noqa: E402
from promptmill.pipelines import load_pipeline, render_request  # noqa: E402
from promptmill.pipelines.spec import EngineOptions  # noqa: E402
from tests.support import PROMPTMILL, write_dataset  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 48
PIPELINE = f"""name = "mixed"
model = "{MODEL}"
prompt = "{{task}}\\n\\nReview: {{text}}"
max_tokens = {MAX_TOKENS}
temperature = 0.0
"""
TASKS = ["Is this review positive or negative? Answer with one word.", "Summarise this review in one short sentence."]


def write_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    reviews = [json.loads(line)["text"] for line in (ROOT / "examples" / "reviews.jsonl").open()]
    prompts = ({"task": TASKS[n % 2], "text": f"{reviews[n % len(reviews)]} (ticket {n})"} for n in range(rows))
    return write_dataset(folder, prompts, PIPELINE, name="prompts.jsonl")


def messages(data: Path, pipeline_path: Path) -> list[list[dict[str, str]]]:
    pipeline = load_pipeline(pipeline_path)
    rows = [json.loads(line) for line in data.open()]
    return [[{"role": "user", "content": render_request(pipeline, n, row).prompt}] for n, row in enumerate(rows)]


def raw(data: Path, pipeline: Path) -> dict:
    """In its own process: vLLM's engine starts worker processes and must be freed after."""
    started = time.monotonic()
    from vllm import LLM, SamplingParams

    from promptmill.workers.backends.vllm import engine_args

    llm = LLM(**engine_args(MODEL, EngineOptions(), Settings()))
    ready = time.monotonic()
    outputs = llm.chat(messages(data, pipeline), SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    generate_s = time.monotonic() - ready
    return {"output_tokens": sum(len(output.outputs[0].token_ids) for output in outputs), "generate_s": generate_s,
            "ready_s": ready - started}  # fmt: skip


def run_batch(data: Path, pipeline: Path, folder: Path) -> dict:
    from promptmill.workers.backends.vllm import engine_args

    args = engine_args(MODEL, EngineOptions(), Settings())
    bodies = ({"model": args["model"], "messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0.0}
              for chat in messages(data, pipeline))  # fmt: skip
    batch = ({"custom_id": str(n), "method": "POST", "url": "/v1/chat/completions", "body": body} for n, body in enumerate(bodies))
    requests, _ = write_dataset(folder, batch, name="batch.jsonl")
    results = folder / "batch-out.jsonl"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests), "-o", str(results),
        "--model", args["model"], "--dtype", args["dtype"], "--max-model-len", str(args["max_model_len"]),
        "--gpu-memory-utilization", str(args["gpu_memory_utilization"]), "--enable-prefix-caching",
        *(["--enforce-eager"] if args["enforce_eager"] else []),
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine_env())
    wall = time.monotonic() - started
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in results.open())
    return {"output_tokens": tokens, "wall_s": wall}


def engine_env() -> dict[str, str]:
    # What `promptmill worker` sets on a machine this small, so every method runs the same engine.
    env = dict(os.environ)
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def promptmill(data: Path, pipeline: Path, folder: Path, redis_url: str, kill_at: float | None) -> dict:
    env = {**engine_env(), "PROMPTMILL_REDIS_URL": redis_url, "PROMPTMILL_DATA_DIR": str(folder / "data")}
    out = folder / ("out-killed" if kill_at else "out")
    command = [PROMPTMILL, "run", str(data), "--pipeline", str(pipeline), "--backend", "vllm",
               "--workers", "1", "--out", str(out)]  # fmt: skip
    store = JobStore.from_url(redis_url)
    before = set(store.job_ids())
    started, started_at = time.monotonic(), time.time()
    run = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    figures: dict = {}
    if kill_at is not None:
        rows = sum(1 for _ in data.open())
        while not (set(store.job_ids()) - before):
            time.sleep(0.2)
        job_id = (set(store.job_ids()) - before).pop()
        while store.status(job_id).terminal < rows * kill_at:
            time.sleep(0.05)
        # The run, its worker (a session of its own) and the engine's processes, all at once.
        doomed = [run.pid] + [child.pid for child in psutil.Process(run.pid).children(recursive=True)]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        run.wait()
        figures["done_at_kill"] = store.status(job_id).terminal
        figures["killed_after_s"] = time.monotonic() - started
        resumed = subprocess.run([PROMPTMILL, "resume", job_id], env=env, cwd=ROOT,
                                 capture_output=True, text=True)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        figures["resume_said"] = next(line for line in resumed.stderr.splitlines() if line.startswith("resuming"))
    else:
        run.communicate()
        assert run.returncode == 0
    wall = time.monotonic() - started
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert [record["row"] for record in records] == list(range(len(records)))
    first_done = min(datetime.fromisoformat(record["finished_at"]).timestamp() for record in records)
    figures.update(
        first_row_s=first_done - started_at,
        output_tokens=sum(record["usage"]["output_tokens"] for record in records),
        wall_s=wall,
        ok=sum(record["status"] == "ok" for record in records),
        rows=len(records),
    )
    return figures


_RESULT = "bench-result: "


def in_own_process(method: str, data: Path, pipeline: Path) -> dict:
    """The whole process's wall time, imports included, as the other methods' are."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", method, str(data), str(pipeline)], env=engine_env(),
                          capture_output=True, text=True, check=True)  # fmt: skip
    wall = time.monotonic() - started
    line = next(line for line in done.stdout.splitlines() if line.startswith(_RESULT))  # vLLM logs to stdout too
    return {**json.loads(line.removeprefix(_RESULT)), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--methods", nargs="+", default=["raw", "run-batch", "promptmill", "killed"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _, data, pipeline = options.child
        print(_RESULT + json.dumps(raw(Path(data), Path(pipeline))), flush=True)
        return
    folder = Path(tempfile.mkdtemp(prefix="pm-vllm-bench-"))
    data, pipeline = write_inputs(folder, options.rows)
    redis_server = EmbeddedRedis(folder / "redis")
    redis_url = redis_server.start()
    results: dict[str, dict] = {}
    try:
        for method in options.methods:
            if method == "raw":
                results[method] = in_own_process("raw", data, pipeline)
            elif method == "run-batch":
                results[method] = run_batch(data, pipeline, folder)
            else:
                results[method] = promptmill(data, pipeline, folder, redis_url, 0.5 if method == "killed" else None)
            figures = results[method]
            rate = figures["output_tokens"] / figures["wall_s"]
            line = f"{method:<11} {figures['output_tokens']:>7,} output tokens in {figures['wall_s']:6.1f}s = {rate:6.1f} tokens/s"
            if "raw" in results and method != "raw":
                line += f"   ratio to raw {rate / (results['raw']['output_tokens'] / results['raw']['wall_s']):.3f}"
            if "generate_s" in figures:
                line += f"   (engine ready at {figures['ready_s']:.1f}s; generation alone {figures['generate_s']:.1f}s, {figures['output_tokens'] / figures['generate_s']:.1f} tokens/s)"
            if "first_row_s" in figures:
                line += f"\n            first row at {figures['first_row_s']:.1f}s"
                if "raw" in results and method == "promptmill":
                    line += f"; wall {figures['wall_s'] - results['raw']['wall_s']:+.1f}s over raw vLLM's"
            if "done_at_kill" in figures:
                line += f"\n            killed at {figures['killed_after_s']:.1f}s with {figures['done_at_kill']:,} rows done; {figures['resume_said']}"
            print(line, flush=True)
    finally:
        redis_server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
