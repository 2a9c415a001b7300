"""How fast the viewer's rows browser answers on a 1,000,000-row job (issue 27: a page of 50 rows in
under 300 ms).

The job is made as the fleet leaves one: its spec and chunks in a Redis (an embedded one of its own),
every chunk's outcomes flushed to a shard and the chunk marked flushed, as workers do; the outcomes
are made up (every tenth row failed, latencies and usage spread) instead of sent through a fake API,
which would take hours. Then `promptmill ui`'s server (pm.ui, in this process) is asked over HTTP for:
pages in input order (first, middle, last), the first filtered page (which builds the rows index),
filtered and sorted pages after it, a search, and one row's page. Each figure is the median of 5 asks
(the first-filter figure is one ask: it happens once per viewer).

    .venv/bin/python bench/ui_rows.py [--rows 1000000] [--chunk-size 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _outcome(row: int) -> bytes:
    failed = row % 10 == 3
    usage = {"input_tokens": 40 + row % 17, "output_tokens": 0 if failed else 3 + row % 5}
    return orjson.dumps({
        "row": row, "status": "failed" if failed else "ok", "output": None if failed else ("positive", "negative")[row % 2],
        "text": None if failed else f"answer {row}", "usage": usage if not failed else {},
        "error": {"kind": "invalid_request", "message": f"400 bad row {row}"} if failed else None,
        "attempts": 1 + row % 3, "model": "claude-haiku-4-5", "latency_ms": 100.0 + (row * 7919) % 900,
        "finish_reason": None if failed else "end_turn", "request_id": f"req_{row}", "line": row, "errors": [],
    }) + b"\n"  # fmt: skip


def make_job(folder: Path, rows: int, chunk_size: int) -> str:
    from promptmill.config.settings import get_settings
    from promptmill.jobs.shards import prepare_shards, shard_dir
    from promptmill.jobs.state.chunks import ChunkPayload, chunk_id_for
    from promptmill.jobs.state.store import JobStore
    from promptmill.jobs.submission import build_spec

    settings = get_settings()
    data = folder / "reviews.jsonl"
    with data.open("wb") as handle:
        for row in range(rows):
            handle.write(orjson.dumps({"text": f"review number {row}"}) + b"\n")
    pipeline = folder / "sentiment.toml"
    pipeline.write_text('name = "sentiment"\nmodel = "claude-haiku-4-5"\nprompt = "Sentiment of: {text}"\n'
                        'max_tokens = 5\n[output]\ntype = "choice"\nchoices = ["positive", "negative"]\n')  # fmt: skip
    spec = build_spec(settings, data, pipeline, "anthropic", out_dir=folder / "out", chunk_size=chunk_size)
    store = JobStore.from_url(settings.redis_url)
    store.create_job(spec)
    prepare_shards(spec)
    for first in range(0, rows, chunk_size):
        chunk_id, count = chunk_id_for(first), min(chunk_size, rows - first)
        store.chunks.add(spec.job_id, ChunkPayload(chunk_id=chunk_id, first_row=first, row_count=count, requests=[]))
        (shard_dir(spec) / f"{spec.job_id}.{chunk_id}.jsonl").write_bytes(b"".join(map(_outcome, range(first, first + count))))
        store.chunks.mark_flushed(spec.job_id, chunk_id)
    return spec.job_id


def timed(url: str, token: str, times: int = 5) -> tuple[float, int]:
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"token {token}"})) as answer:
            body = answer.read()
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent), len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=100)
    options = parser.parse_args()
    from promptmill.jobs.state.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        redis_server = EmbeddedRedis(folder / "redis")
        # A key is only checked for at submit: nothing is sent anywhere.
        os.environ.update(PROMPTMILL_REDIS_URL=redis_server.start(), PROMPTMILL_DATA_DIR=str(folder / "data"),
                          ANTHROPIC_API_KEY="not-used")
        try:
            started = time.perf_counter()
            job_id = make_job(folder, options.rows, options.chunk_size)
            print(f"made job {job_id}: {options.rows:,} rows in chunks of {options.chunk_size} "
                  f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
            import promptmill as pm

            viewer = pm.ui(port=0)
            base, token = viewer.url.split("/?token=")
            rows = f"{base}/jobs/{job_id}/rows"
            last_page = (options.rows + 49) // 50
            asks = [
                ("page 1, input order", rows, 5),
                (f"page {last_page // 2:,}, input order", f"{rows}?page={last_page // 2}", 5),
                (f"page {last_page:,} (the last), input order", f"{rows}?page={last_page}", 5),
                ("first filter: failed rows (builds the index)", f"{rows}?status=failed", 1),
                ("failed rows, page 2", f"{rows}?status=failed&page=2", 5),
                ("sorted by cost, most first", f"{rows}?sort=cost&order=desc", 5),
                ("sorted by latency, attempts >= 3", f"{rows}?sort=latency&order=desc&attempts=3", 5),
                ("search 'bad row 99993' (first time)", f"{rows}?q=bad+row+99993", 1),
                ("search 'bad row 99993' (again)", f"{rows}?q=bad+row+99993", 5),
                (f"row {options.rows - 1:,}'s page (input read to its line)", f"{rows}/{options.rows - 1}", 5),
            ]
            print(f"{'ask':<52} {'ms':>9} {'bytes':>9}")
            for name, url, times in asks:
                ms, size = timed(url, token, times)
                print(f"{name:<52} {ms:>9.1f} {size:>9,}")
            viewer.stop()
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
