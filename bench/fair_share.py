"""Two jobs on one fleet: how long a small job waits behind a large one, and how much of the limit
the fleet uses while both run.

    .venv/bin/python bench/fair_share.py                       # 9,000 + 150 rows, weights 1 and 1 (about 4 min)
    .venv/bin/python bench/fair_share.py --large 4000 --small-priority 3

Everything is real: two `promptmill worker` processes on an embedded Redis, `promptmill submit` for
both jobs, the anthropic SDK, and the local Anthropic-protocol server holding the account's limit (a
token bucket, true `anthropic-ratelimit-*` headers, 429s past it). The large job is submitted first;
once it has run for `--small-after` seconds the small one is submitted. Figures come from the
server's log:

- the small job's wait: from its submit to its last answer, in seconds and in the large job's
  requests sent meanwhile (first in, first out, it would wait for the large job's whole backlog);
- the fleet's use of the limit: answered requests per minute between the first request and the last
  answer, as a share of the limit, and the 429s among all requests.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from promptmill.jobs.state.status import JobState  # noqa: E402
from promptmill.jobs.state.store import JobStore  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.chaos import kill_tree  # noqa: E402
from tests.support import PROMPTMILL, stop, user_env, write_dataset  # noqa: E402

API_KEY = "bench-key"
PIPELINE = """
name = "{job}"
model = "claude-haiku-4-5"
prompt = "{job} row {{id}} [[reply:ok {{id}}]]"
max_tokens = 8
"""


def submit(env: dict[str, str], folder: Path, job: str, rows: int, rpm: int, priority: int) -> str:
    data, pipeline = write_dataset(folder / job, ({"id": i} for i in range(rows)), PIPELINE.format(job=job))
    command = [PROMPTMILL, "submit", str(data), "-p", str(pipeline), "--out", str(folder / job / "out")]
    command += ["--rpm", str(rpm), "--priority", str(priority)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"submit failed:\n{done.stderr[-3000:]}")
    return done.stdout.split()[-1]


def wait_for(condition, what: str, workers: list[subprocess.Popen], timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline or any(worker.poll() is not None for worker in workers):
            raise SystemExit(f"a worker ended or timed out waiting for {what}: see the worker logs")
        time.sleep(0.2)


def of_job(log: list[dict], job: str) -> list[dict]:
    return [entry for entry in log if (entry["prompt"] or "").startswith(f"{job} row ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=9000, help="rows of the job submitted first")
    parser.add_argument("--small", type=int, default=150, help="rows of the job submitted while it runs")
    parser.add_argument("--small-after", type=float, default=20, help="seconds the large job runs alone")
    parser.add_argument("--large-priority", type=int, default=1)
    parser.add_argument("--small-priority", type=int, default=1)
    parser.add_argument("--rpm", type=int, default=3000, help="the limit the server holds (and the jobs are told)")
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args()
    # Killed (SIGTERM) as when interrupted: the `finally` below stops the workers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    folder = Path(tempfile.mkdtemp(prefix="promptmill-fair-"))
    redis_server = EmbeddedRedis(folder / "redis")
    redis_url = redis_server.start()
    server = ServerControl.start(API_KEY)
    server.configure(rpm=options.rpm, burst_s=1, latency_ms=100)
    env = user_env(folder, redis_url, server.url, API_KEY)
    store = JobStore.from_url(redis_url)
    print(f"in {folder}: limit {options.rpm} requests/min, latency 100 ms, {options.workers} workers; large job "
          f"{options.large:,} rows (weight {options.large_priority}), small job {options.small:,} rows "
          f"(weight {options.small_priority}) submitted after {options.small_after:.0f} s", flush=True)  # fmt: skip
    workers = []
    try:
        large = submit(env, folder, "large", options.large, options.rpm, options.large_priority)
        for n in range(options.workers):
            log_file = (folder / f"worker-{n}.log").open("w")
            workers.append(subprocess.Popen([PROMPTMILL, "worker", "--queues", "api"], env=env, cwd=ROOT,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        wait_for(lambda: of_job(server.log(), "large"), "the large job's first request", workers)
        time.sleep(options.small_after)
        submitted_at = time.monotonic()  # the server logs on the monotonic clock
        small = submit(env, folder, "small", options.small, options.rpm, options.small_priority)
        done = lambda job: store.status(job).state is JobState.complete  # noqa: E731
        wait_for(lambda: done(small), "the small job", workers)
        large_left = store.status(large).total - store.status(large).terminal
        wait_for(lambda: done(large), "the large job", workers)
        log = server.log()
    finally:
        try:
            stop(*workers, timeout=30)
        except subprocess.TimeoutExpired:  # a warm shutdown that cannot finish (the server went first)
            for worker in workers:
                kill_tree(worker)
        finally:
            server.stop()
            redis_server.stop()

    small_log, large_log = of_job(log, "small"), of_job(log, "large")
    small_end = max(entry["done"] for entry in small_log if entry["status"] == 200)
    large_meanwhile = [entry for entry in large_log if submitted_at <= entry["t"] <= small_end]
    served = [entry for entry in log if entry["status"] == 200]
    span_min = (max(entry["done"] for entry in served) - min(entry["t"] for entry in log)) / 60
    both = [entry for entry in served if min(e["t"] for e in small_log) <= entry["t"] <= small_end]
    both_min = (small_end - min(e["t"] for e in small_log)) / 60
    alone_s = options.small / options.rpm * 60
    print(f"small job: {small_end - submitted_at:.1f} s from submit to its last answer "
          f"(alone at the full limit: {alone_s:.1f} s); the large job sent {len(large_meanwhile):,} requests "
          f"meanwhile and had {large_left:,} rows left when it ended", flush=True)  # fmt: skip
    print(f"while both ran: {len(both) / both_min:,.0f} answered/min = {len(both) / both_min / options.rpm:.1%} "
          f"of the limit, small:large requests {len(of_job(both, 'small'))}:{len(of_job(both, 'large'))}")  # fmt: skip
    start = min(entry["t"] for entry in log)
    refused = [f"{entry['t'] - start:.0f}" for entry in log if entry["status"] == 429]
    print(f"whole run: {len(served) / span_min:,.0f} answered/min = {len(served) / span_min / options.rpm:.1%} "
          f"of the limit over {span_min * 60:.0f} s; 429s {len(refused)} of {len(log):,} requests"
          + (f" (at {', '.join(refused)} s)" if refused else ""))  # fmt: skip


if __name__ == "__main__":
    main()
