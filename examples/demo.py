"""`make demo`: the example sentiment job on the local engine, end to end, scored against its labels.

Runs `promptmill run` exactly as a user would (embedded Redis, a local GPU/CPU worker, the local
Gemma 3 270M model, few-shot), then prints the accuracy of the answers against the dataset's labels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from promptmill.workers.local_workers import promptmill_command

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "demo-out"


def main() -> int:
    started = time.monotonic()
    command = [
        *promptmill_command(), "run", str(HERE / "reviews.jsonl"),
        "--pipeline", str(HERE / "sentiment.toml"),
        "--backend", "vllm", "--model", "gemma3-270m",
        "--out", str(OUT),
    ]  # fmt: skip
    print("$ promptmill " + " ".join(command[command.index("run"):]), flush=True)
    finished = subprocess.run(command)
    if finished.returncode != 0:
        return finished.returncode
    labels = [json.loads(line)["label"] for line in (HERE / "reviews.jsonl").open()]
    results = [json.loads(line) for line in (OUT / "results.jsonl").open()]
    right = sum(1 for label, record in zip(labels, results) if record["output"] == label)
    ok = sum(1 for record in results if record["status"] == "ok")
    tokens_in = sum(record["usage"]["input_tokens"] + record["usage"]["cache_read_input_tokens"] for record in results)
    tokens_out = sum(record["usage"]["output_tokens"] for record in results)
    print(
        f"\naccuracy: {right}/{len(labels)} = {right / len(labels):.1%} against the labels "
        f"({ok} answers parsed, {len(results) - ok} failed)\n"
        f"tokens: {tokens_in:,} prompt, {tokens_out:,} generated; wall time {time.monotonic() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
