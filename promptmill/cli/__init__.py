"""The `promptmill` command line: the entry point, above every layer it drives."""

from __future__ import annotations

from promptmill.cli import batch_files, comparing, init, inspecting, listing, managing, running, viewer, worker  # noqa: F401 - each registers its commands
from promptmill.cli.app import app
from promptmill.jobs.files import make_private

# An example for every command, shown at the end of its --help (one table: a command without one fails
# the tests).
EXAMPLES: dict[str, list[str]] = {
    "run": [
        "promptmill run reviews.jsonl --pipeline sentiment.toml --backend vllm",
        "promptmill run tickets.csv -p extract.toml --id-column ticket_id --budget 20 --json",
        "promptmill run big.jsonl -p extract.toml --backend openai-batch --deadline 8h",
    ],
    "run-batch": [
        "promptmill run-batch -i requests.jsonl -o results.jsonl --model smollm2-135m-instruct",
        "promptmill run-batch -i requests.jsonl -o results.jsonl --backend openai-batch",
    ],
    "submit": ["PROMPTMILL_REDIS_URL=redis://queue:6379/0 promptmill submit big.parquet -p extract.toml"],
    "resume": ["promptmill resume JOB", "promptmill resume JOB --retry-failed --budget 50"],
    "compare": ["promptmill compare reviews.jsonl -p sentiment.toml -a vllm:gemma3-270m -a anthropic:claude-haiku-4-5 --label label"],
    "status": ["promptmill status JOB --json"],
    "report": ["promptmill report JOB --out reports/"],
    "verify": ["promptmill verify JOB --json"],
    "estimate": ["promptmill estimate tickets.csv -p extract.toml --sample 50"],
    "cost": ["promptmill cost JOB --json"],
    "jobs": ["promptmill jobs --json"],
    "cancel": ["promptmill cancel JOB"],
    "pause": ["promptmill pause JOB", "promptmill resume JOB"],
    "budget": ["promptmill budget JOB 25", "promptmill budget JOB none"],
    "ui": ["promptmill ui", "promptmill ui --port 9000"],
    "export": ["promptmill export JOB --format parquet --out results/", "promptmill export JOB --format openai-batch"],
    "delete": ["promptmill delete JOB --files"],
    "gc": ["promptmill gc --older-than 7d --dry-run"],
    "worker": ["PROMPTMILL_REDIS_URL=redis://queue:6379/0 promptmill worker --queues api --chunks 4"],
    "flower": ["promptmill flower --port 5555"],
    "prepare-model": ["promptmill prepare-model"],
    "init": ["promptmill init extract.toml --output json", "promptmill init sentiment.toml --output choice"],
}

for _command in app.registered_commands:
    _name = _command.name or (_command.callback.__name__.replace("_", "-") if _command.callback else "")
    if _name in EXAMPLES:
        _command.epilog = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in EXAMPLES[_name])


def main() -> None:
    make_private()  # what it writes, and its workers write, is the user's alone
    app()
