"""The Python API's overhead over the CLI on the ceiling bench: the same job (no limit, an instant
local server, 2 workers, chunks of 256) run by `promptmill run` and by `pm.run` in a fresh Python
process, in turns, each run on a flushed Redis.

    .venv/bin/python bench/api_overhead.py                  # 20,000 rows, 3 runs each
    .venv/bin/python bench/api_overhead.py --rows 5000 --repeat 5

Prints each run's wall time (process start to exit, as a user waits for it) and the server's
requests per second, then the medians and the API's wall over the CLI's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.rate_limit import API_KEY, measure, write_inputs  # noqa: E402
from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.support import PROMPTMILL, user_env  # noqa: E402

API_SCRIPT = """
import sys
import promptmill as pm

pm.run(sys.argv[1], sys.argv[2], out=sys.argv[3], workers=2, chunk_size=256, progress=False, name=sys.argv[3])
"""


def one_run(face: str, env: dict[str, str], data: Path, pipeline: Path, out: Path) -> float:
    if face == "cli":
        command = [PROMPTMILL, "run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "2",
                   "--chunk-size", "256"]  # fmt: skip
    else:
        command = [sys.executable, "-c", textwrap.dedent(API_SCRIPT), str(data), str(pipeline), str(out)]
    started = time.monotonic()
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if finished.returncode != 0:
        raise SystemExit(f"the {face} run failed:\n{finished.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="promptmill-api-bench-"))
    redis_server = EmbeddedRedis(folder / "redis")
    redis_url = redis_server.start()
    server = ServerControl.start(API_KEY)
    env = user_env(folder, redis_url, server.url, API_KEY)
    data, pipeline = write_inputs(folder, options.rows, "anthropic")
    walls: dict[str, list[float]] = {"cli": [], "api": []}
    print(f"ceiling: {options.rows:,} rows, 2 workers, chunks of 256, no limit, an instant server\n", flush=True)
    try:
        for turn in range(options.repeat):
            for face in ("cli", "api"):
                redis.Redis.from_url(redis_url).flushdb()
                server.reset()
                out = folder / f"out-{face}-{turn}"
                wall = one_run(face, env, data, pipeline, out)
                figures = measure(server.log(), [])
                walls[face].append(wall)
                print(f"{face} run {turn + 1}: wall {wall:6.1f}s, {figures['rps']:,.0f} requests/s "
                      f"({figures['requests']:,} requests)", flush=True)  # fmt: skip
    finally:
        server.stop()
        redis_server.stop()
    cli, api = statistics.median(walls["cli"]), statistics.median(walls["api"])
    print(f"\nmedian wall: cli {cli:.1f}s, api {api:.1f}s; api over cli {api / cli - 1:+.1%}")


if __name__ == "__main__":
    main()
