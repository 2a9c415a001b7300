"""How close to the account's limit a job runs, and how many 429s it earns, with 1, 4 and 8 workers.

    .venv/bin/python bench/rate_limit.py                 # every scenario, 4,000 rows each (about 35 min)
    .venv/bin/python bench/rate_limit.py --rows 1000 --scenarios exact --workers 4
    .venv/bin/python bench/rate_limit.py --backend openai   # the same through chat completions
    .venv/bin/python bench/rate_limit.py --scenarios ceiling --metrics-port 9477   # metrics on: their cost

Everything is real: `promptmill run` with its Celery workers and embedded Redis, the anthropic SDK,
and the local Anthropic-protocol server enforcing the limits as the API does (token buckets, true
`anthropic-ratelimit-*` headers, `retry-after` in whole seconds). Figures come from the server's log:
the achieved rate is answered requests (and output tokens) per minute between the first request and
the last answer, as a share of the enforced limit; 429s are the share of all requests answered 429.

Scenarios: `exact` (--rpm given right), `high` (--rpm 10% too high), `none` (no limit given: the
headers must teach it), `faults` (exact, plus 10% of answers 500/529 and 2% timing out), `ceiling`
(no limit, an instant server: the runner's own requests per second through Redis, Celery, commits).

`--backend openai` runs them through the openai SDK and the server's chat completions, which enforce
the requests limit and one token budget (prompt plus `max_tokens`, set high enough not to bind) and
send OpenAI's `x-ratelimit-*` headers and `retry-after-ms`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.support import PROMPTMILL, user_env, write_dataset  # noqa: E402

API_KEY = "bench-key"
RPM, OUTPUT_TPM = 1200, 100_000
LATENCY_MS, LATENCY_PER_TOKEN_MS = 100, 4  # answers average 50 words: about 300 ms each
OPENAI_TPM = 1_000_000  # the token budget of the openai runs: above what 1,200 requests of ~150 tokens use
MODEL = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}
PIPELINE = """
name = "bench"
model = "{model}"
prompt = "Row {{id}}: {{text}} [[reply:{{answer}}]]"
max_tokens = 128
"""


def write_inputs(folder: Path, rows: int, backend: str) -> tuple[Path, Path]:
    rng = random.Random(7)
    answers = (" ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(10, 90))) for _ in range(rows))
    items = ({"id": i, "text": f"text of row {i}", "answer": a} for i, a in enumerate(answers))
    return write_dataset(folder, items, PIPELINE.format(model=MODEL[backend]))


def run_job(env: dict[str, str], data: Path, pipeline: Path, out: Path, workers: int, extra: list[str]) -> dict:
    started = time.monotonic()
    command = [PROMPTMILL, "run", str(data), "--pipeline", str(pipeline), "--out", str(out)]
    command += ["--backend", env["BENCH_BACKEND"]]
    command += ["--workers", str(workers), *extra]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"the job failed:\n{finished.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "results.jsonl").open()]
    job_id = finished.stdout.splitlines()[0].split()[1]
    return {"records": records, "wall_s": time.monotonic() - started, "job_id": job_id}


def measure(log: list[dict], records: list[dict]) -> dict:
    served = [entry for entry in log if entry["status"] == 200]
    statuses = Counter(str(entry["status"]) for entry in log)
    first = min(entry["t"] for entry in log)
    last = max(entry["t"] for entry in served)
    span_min = max(last - first, 1e-9) / 60
    output_tokens = sum(entry["usage"].get("output_tokens", entry["usage"].get("completion_tokens", 0)) for entry in served)
    answered = Counter(entry["prompt"] for entry in served)
    return {
        "requests": len(log),
        "ok_rows": sum(1 for record in records if record["status"] == "ok"),
        "rows": len(records),
        "rpm": len(served) / span_min,
        "all_rpm": len(log) / span_min,
        "otpm": output_tokens / span_min,
        "share_429": statuses.get("429", 0) / len(log),
        "statuses": dict(statuses),
        "answered_twice": sum(1 for count in answered.values() if count > 1),
        "attempts": Counter(record["attempts"] for record in records),
        "span_s": last - first,
        "rps": len(served) / max(last - first, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--scenarios", nargs="+", default=["exact", "high", "none", "faults", "ceiling"])
    parser.add_argument("--ceiling-rows", type=int, default=20000)
    parser.add_argument("--backend", choices=sorted(MODEL), default="anthropic")
    parser.add_argument("--metrics-port", type=int, help="Serve the run's Prometheus metrics: their cost, measured.")
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="promptmill-bench-"))
    redis_server = EmbeddedRedis(folder / "redis")
    redis_url = redis_server.start()
    server = ServerControl.start(API_KEY)
    env = {
        **user_env(folder, redis_url, server.url, API_KEY),
        "OPENAI_BASE_URL": server.url + "/v1",
        "OPENAI_API_KEY": API_KEY,
        "BENCH_BACKEND": options.backend,
        **({"PROMPTMILL_METRICS_PORT": str(options.metrics_port)} if options.metrics_port else {}),
    }
    data, pipeline = write_inputs(folder, options.rows, options.backend)
    print(
        f"{options.backend}: limit {RPM} requests and "
        + (f"{OPENAI_TPM:,} tokens (prompt + max_tokens)" if options.backend == "openai" else f"{OUTPUT_TPM:,} output tokens")
        + " per minute; answers 10-90 words, "
        f"latency {LATENCY_MS} ms + {LATENCY_PER_TOKEN_MS} ms per output token; {options.rows:,} rows\n",
        flush=True,
    )
    try:
        for scenario in options.scenarios:
            # The limiter's memory of earlier runs goes: each scenario learns from scratch.
            flush_redis(redis_url)
            if scenario == "ceiling":
                ceiling(server, env, folder, options.ceiling_rows, options.backend)
                continue
            for workers in options.workers:
                server.reset()
                token_limits = {"input_tpm": OPENAI_TPM} if options.backend == "openai" else {"output_tpm": OUTPUT_TPM}
                server.configure(
                    rpm=RPM, burst_s=2, latency_ms=LATENCY_MS, latency_per_token_ms=LATENCY_PER_TOKEN_MS,
                    **token_limits,
                )  # fmt: skip
                extra = {"exact": ["--rpm", str(RPM)], "high": ["--rpm", str(int(RPM * 1.1))], "none": []}.get(
                    scenario, ["--rpm", str(RPM)]
                )
                job_env = dict(env)
                if scenario == "faults":
                    server.configure(p500=0.05, p529=0.05, p_timeout=0.02)
                    job_env.update(PROMPTMILL_REQUEST_TIMEOUT_S="3", PROMPTMILL_MAX_ATTEMPTS="12")
                flush_redis(redis_url)
                job = run_job(job_env, data, pipeline, folder / f"out-{scenario}-{workers}", workers, extra)
                figures = measure(server.log(), job["records"])
                report(scenario, workers, figures)
    finally:
        server.stop()
        redis_server.stop()


def flush_redis(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()


def report(scenario: str, workers: int, figures: dict) -> None:
    line = (
        f"{scenario:<7} workers={workers}  rate {figures['rpm']:7.1f}/min = {figures['rpm'] / RPM:6.1%} of rpm, "
        f"output {figures['otpm']:8.0f}/min = {figures['otpm'] / OUTPUT_TPM:6.1%} of otpm; "
        f"429s {figures['share_429']:.2%} of {figures['requests']:,} requests; "
        f"rows ok {figures['ok_rows']}/{figures['rows']}; answered twice {figures['answered_twice']}"
    )
    if scenario == "faults":
        attempts = ", ".join(f"{n} attempts: {count}" for n, count in sorted(figures["attempts"].items()))
        line += (
            f"\n        all requests {figures['all_rpm']:.1f}/min = {figures['all_rpm'] / RPM:.1%} of rpm; "
            f"statuses {figures['statuses']}; rows by attempts: {attempts}"
        )
    print(line, flush=True)


def ceiling(server: ServerControl, env: dict[str, str], folder: Path, rows: int, backend: str) -> None:
    (folder / "ceiling").mkdir()
    data, pipeline = write_inputs(folder / "ceiling", rows, backend)
    server.reset()
    job = run_job(env, data, pipeline, folder / "out-ceiling", 2, ["--chunk-size", "256"])
    figures = measure(server.log(), job["records"])
    print(
        f"ceiling workers=2  {figures['rps']:,.0f} requests/s through the whole path "
        f"({figures['requests']:,} requests in {figures['span_s']:.1f}s; job wall time {job['wall_s']:.1f}s; "
        f"rows ok {figures['ok_rows']}/{figures['rows']})",
        flush=True,
    )


if __name__ == "__main__":
    main()
