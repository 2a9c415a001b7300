"""What a job was estimated to cost, what it cost, and what prompt caching saves, in dollars.

    .venv/bin/python bench/cost.py                 # 2,000 rows (about 2 min)

Against the local Anthropic-protocol server (it counts tokens as words, bills as the API does, and
caches a system prompt sent with `cache_control`), with `promptmill estimate`, `run` and `cost`:
1. the example reviews cycled to 2,000 rows with `examples/sentiment.toml`: the estimate (the API's
   counter on 100 sampled rows) beside the ledger's actual tokens and dollars;
2. the same rows with a 1,500-token system prompt on Sonnet 4.5, sent plain and then with
   `cache_system = true`: the two jobs' costs and what `cost` says caching saved;
3. the cached job again through `--backend anthropic-batch` (batches that end after 5 s): its cost
   beside the real-time one, the batches it took, and the server's bill at the batch discount.
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

from promptmill.config.prices import PriceTable  # noqa: E402
from promptmill.config.settings import Settings  # noqa: E402
from promptmill.jobs.state.embedded import EmbeddedRedis  # noqa: E402
from tests.anthropic_server import ServerControl  # noqa: E402
from tests.support import PROMPTMILL, user_env, write_dataset  # noqa: E402

API_KEY = "bench-key"
# Caching needs a prefix of at least the model's minimum: 1,024 tokens on Sonnet 4.5, 4,096 on Haiku 4.5
# (which would bill a 1,500-token system prompt as plain input, cache_control or not).
CACHING_MODEL = "claude-sonnet-4-5"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([PROMPTMILL, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"promptmill {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def run_and_cost(env: dict[str, str], data: Path, pipeline: Path, out: Path, *options: str) -> dict:
    ran = cli(env, "run", str(data), "--pipeline", str(pipeline), "--out", str(out), *options)
    job_id = ran.stdout.split()[1]
    return json.loads(cli(env, "cost", job_id, "--json").stdout)


def billed_at_batch_prices(log: list[dict], model: str) -> float:
    price = PriceTable.load(Settings()).price_for(model + "@batch")
    total = 0
    for usage in (entry["usage"] for entry in log if entry["status"] == 200):
        tokens = {name: value for name, value in usage.items() if name != "cache_creation"}
        total += price.cost_usd(**tokens, cache_creation_1h_input_tokens=usage["cache_creation"]["ephemeral_1h_input_tokens"])
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pm-cost-bench-"))
    reviews = (ROOT / "examples" / "reviews.jsonl").read_text().splitlines()
    data, _ = write_dataset(folder, (json.loads(reviews[n % len(reviews)]) for n in range(options.rows)), name="reviews.jsonl")
    redis_server = EmbeddedRedis(folder / "redis")
    server = ServerControl.start(API_KEY)
    env = user_env(folder, redis_server.start(), server.url, API_KEY)
    try:
        sentiment = ROOT / "examples" / "sentiment.toml"
        estimate = json.loads(cli(env, "estimate", str(data), "--pipeline", str(sentiment), "--json").stdout)
        actual = run_and_cost(env, data, sentiment, folder / "out-sentiment")
        [model] = actual["models"]
        billed_input = model["input_tokens"] + model["cache_creation_input_tokens"] + model["cache_read_input_tokens"]
        print(f"{options.rows:,} rows, {model['model']}:")
        print(f"  input tokens   estimated {estimate['input_tokens']:,} (±{estimate['input_tokens_error_pct']}%, "
              f"{estimate['rows_counted']} rows counted), actual {billed_input:,} "
              f"({(estimate['input_tokens'] - billed_input) / billed_input:+.2%})")
        print(f"  output tokens  estimated {estimate['output_tokens_low']:,} to {estimate['output_tokens_max']:,}, "
              f"actual {model['output_tokens']:,}")
        print(f"  cost           estimated ${estimate['cost_usd_low']:.6f} to ${estimate['cost_usd_high']:.6f}, "
              f"actual ${actual['cost_usd']:.6f}")

        system = " ".join(f"rule{n}" for n in range(1500))  # 1,500 tokens on the local server
        costs = {}
        for cached in (False, True):
            server.reset()
            pipeline = folder / f"cached-{cached}.toml"
            text = sentiment.read_text().replace('system = "', f'system = "{system} ', 1)
            pipeline.write_text(text.replace("max_tokens = 8\n", "max_tokens = 8\ncache_system = true\n" if cached else "max_tokens = 8\n"))
            costs[cached] = run_and_cost(env, data, pipeline, folder / f"out-cached-{cached}", "--model", CACHING_MODEL)
        plain, cached_cost = costs[False]["cost_usd"], costs[True]["cost_usd"]
        print(f"1,500-token system prompt, {options.rows:,} rows, {CACHING_MODEL}: plain ${plain:.6f}, cached ${cached_cost:.6f} "
              f"(saved ${plain - cached_cost:.6f} = {(plain - cached_cost) / plain:.1%}); "
              f"`cost` says caching saved ${costs[True]['caching_saved_usd']:.6f}")

        server.reset()
        server.configure(batch_delay_s=5)
        started = time.monotonic()
        batch = run_and_cost(env, data, folder / "cached-True.toml", folder / "out-batch", "--model", CACHING_MODEL,
                             "--backend", "anthropic-batch")  # fmt: skip
        took = time.monotonic() - started
        billed = billed_at_batch_prices(server.log(), CACHING_MODEL)
        print(f"the cached job through Message Batches: ${batch['cost_usd']:.6f} "
              f"({batch['cost_usd'] / cached_cost:.3f} of real time; the server billed ${billed:.6f}) "
              f"in {len(server.batches())} batches, {took:.1f}s with 5s batches; ledger model {batch['models'][0]['model']}")
    finally:
        server.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
