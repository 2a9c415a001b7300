"""Redis memory during a long job: it must follow the work in flight, not the size of the dataset.

    .venv/bin/python bench/redis_memory.py                 # 100,000 rows (about two minutes)
    .venv/bin/python bench/redis_memory.py --rows 20000 --max-pending-rows 4096

A real `promptmill run` (2 API workers, the anthropic SDK, an instant local Anthropic-protocol
server) on an embedded Redis of its own, whose `used_memory` is sampled four times a second. Prints
the baseline, the peak and where it came, the rows in Redis at the peak (enqueued and not yet
flushed to a shard) and the bytes each costs, and what Redis holds once the job is done.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from promptmill.jobs.state.store import JobStore  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.support import PROMPTMILL, user_env, write_dataset  # noqa: E402

API_KEY = "bench-key"
PIPELINE = """
name = "memory"
model = "claude-haiku-4-5"
system = "You label customer reviews as positive or negative."
prompt = "Review {id}: {text} [[reply:{answer}]]"
max_tokens = 16
"""


def write_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    filler = "the delivery was quick and the product matches the description " * 3
    rows_ = ({"id": i, "text": f"{filler} (review {i})", "answer": "positive" if i % 2 else "negative"} for i in range(rows))
    return write_dataset(folder, rows_, PIPELINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-pending-rows", type=int, default=None, help="PROMPTMILL_MAX_PENDING_ROWS")
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="promptmill-memory-"))
    redis_server = EmbeddedRedis(folder / "redis")
    url = redis_server.start()
    client = redis.Redis.from_url(url)
    store = JobStore.from_url(url)
    server = ServerControl.start(API_KEY)
    data, pipeline = write_inputs(folder, options.rows)
    env = user_env(folder, url, server.url, API_KEY)
    if options.max_pending_rows:
        env["PROMPTMILL_MAX_PENDING_ROWS"] = str(options.max_pending_rows)

    baseline = int(client.info("memory")["used_memory"])
    samples: list[tuple[float, int, int]] = []  # (seconds, used_memory, rows held in Redis)
    done = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not done.is_set():
            used = int(client.info("memory")["used_memory"])
            samples.append((time.monotonic() - started, used, rows_held(store)))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    command = [PROMPTMILL, "run", str(data), "--pipeline", str(pipeline), "--out", str(folder / "out")]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    after = int(client.info("memory")["used_memory"])
    server.stop()
    redis_server.stop()
    if finished.returncode != 0:
        raise SystemExit(f"the job failed:\n{finished.stderr[-3000:]}")

    at, peak, held = max(samples, key=lambda s: s[1])
    most_held = max(s[2] for s in samples)
    per_row = (peak - baseline) / max(held, 1)
    print(f"{options.rows:,} rows in {wall:.1f}s; max pending rows {options.max_pending_rows or 65536:,}")
    print(f"Redis used_memory: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB at {at:.1f}s, after {after / 2**20:.1f} MiB")
    print(f"rows held in Redis at the peak {held:,} (most at any sample {most_held:,}); {per_row:,.0f} bytes per row held")
    print(f"a dataset held whole would take about {per_row * options.rows / 2**20:,.0f} MiB at that rate")


def rows_held(store: JobStore) -> int:
    """Rows enqueued and not yet flushed to a shard, over every job in this Redis."""
    return sum(store.chunks.rows_in_redis(job_id) for job_id in store.job_ids())


if __name__ == "__main__":
    main()
