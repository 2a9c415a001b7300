"""The batch path at scale: a 100,000-row job's enqueue-to-first-batch time and its Redis memory.

    .venv/bin/python bench/batch.py                 # 100,000 rows (about two minutes)
    .venv/bin/python bench/batch.py --rows 20000
    .venv/bin/python bench/batch.py --backend openai-batch   # the OpenAI Batch API's path

A real `promptmill submit --backend anthropic-batch` (or `openai-batch`) and one `promptmill worker --queues batch
--chunks N` (the default gathering and 1,000-row chunks; N holds every chunk at once) on an
embedded Redis of their own, against the local server, whose batches do not end while the bench
runs. Every row may wait in Redis at once (MAX_PENDING_ROWS above the rows), as they do while their
batches are in progress. Prints the
seconds from `submit` to the first batch created and to the last row in a batch, the batches, and
Redis's `used_memory` once every row waits in a batch, per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.support import PROMPTMILL, user_env, write_dataset  # noqa: E402

API_KEY = "bench-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--backend", choices=["anthropic-batch", "openai-batch"], default="anthropic-batch")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pm-batch-bench-"))
    reviews = [json.loads(line) for line in (ROOT / "examples" / "reviews.jsonl").read_text().splitlines()]
    rows = ({**reviews[n % len(reviews)], "id": n} for n in range(options.rows))
    data, _ = write_dataset(folder, rows, name="reviews.jsonl")
    redis_server = EmbeddedRedis(folder / "redis")
    server = ServerControl.start(API_KEY)
    server.configure(batch_delay_s=86_400)
    url = redis_server.start()
    env = user_env(folder, url, server.url, API_KEY, PROMPTMILL_MAX_PENDING_ROWS=str(options.rows + 1),
                   OPENAI_BASE_URL=server.url + "/v1", OPENAI_API_KEY=API_KEY)  # fmt: skip
    model = ["--model", "gpt-4.1-mini"] if options.backend == "openai-batch" else []
    batches_of = server.openai_batches if options.backend == "openai-batch" else server.batches
    client = redis.Redis.from_url(url)
    baseline = int(client.info("memory")["used_memory"])
    chunks = str(-(-options.rows // 1000))
    worker = subprocess.Popen([PROMPTMILL, "worker", "--queues", "batch", "--chunks", chunks], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(5)  # the worker is up before the clock starts
        started = time.monotonic()
        submit = subprocess.Popen(
            [PROMPTMILL, "submit", str(data), "--pipeline", str(ROOT / "examples" / "sentiment.toml"),
             "--backend", options.backend, *model, "--out", str(folder / "out")],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        first = None
        while True:
            batches = batches_of()
            sent = sum(batch["requests"] for batch in batches)
            if batches and first is None:
                first = time.monotonic() - started
            if sent >= options.rows:
                break
            if time.monotonic() - started > 900:
                raise SystemExit(f"only {sent:,} of {options.rows:,} rows went into batches in 15 minutes")
            time.sleep(0.2)
        everything = time.monotonic() - started
        submit.wait(timeout=60)
        used = int(client.info("memory")["used_memory"])
        sizes = sorted(batch["requests"] for batch in batches)
        print(f"{options.rows:,} rows, examples/sentiment.toml, --backend {options.backend}, 1 batch worker:")
        print(f"  submit to the first batch created: {first:.1f}s; to every row in a batch: {everything:.1f}s")
        print(f"  {len(batches)} batches of {sizes[0]:,} to {sizes[-1]:,} requests")
        print(f"  Redis used_memory with every row waiting on its batch: {(used - baseline) / 2**20:.1f} MiB "
              f"over a {baseline / 2**20:.1f} MiB baseline = {(used - baseline) / options.rows:.0f} bytes per row")
    finally:
        worker.kill()  # its chunks wait on batches that never end: a warm shutdown would wait out their hold
        worker.wait(timeout=60)
        server.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
