#!/usr/bin/env bash
# `make compare`: choosing a model, with no key. The demo's local model against itself, greedy and at
# temperature 1.0, on a seeded sample of 100 of the examples' reviews: each contender a resumable job,
# then their accuracy, agreement, latency, speed and cost side by side (compare-out/compare.html).
# Any contender can be an API model instead: --against anthropic:claude-haiku-4-5 --against openai:gpt-4.1-mini
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTMILL="${PROMPTMILL:-.venv/bin/promptmill}"
exec "$PROMPTMILL" compare examples/reviews.jsonl --pipeline examples/sentiment.toml \
    --against vllm:gemma3-270m --against vllm:gemma3-270m,temperature=1.0 \
    --sample 100 --label label --out compare-out "$@"
