"""Helpers shared by the tests and the benches: the installed CLI, and writing a dataset and its pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
# The installed entry point, as a user runs it: never `-m` from the repo, so the current folder's
# packages cannot stand in for ours.
PROMPTMILL = str(Path(sysconfig.get_path("scripts")) / "promptmill")
if not Path(PROMPTMILL).exists():  # a venv whose scripts folder is beside its python
    PROMPTMILL = str(Path(sys.executable).parent / "promptmill")


def promptmill(
    *args: str, env: dict[str, str], timeout: float | None = 240, cwd: Path = ROOT, **kwargs
) -> subprocess.CompletedProcess:
    """Run the `promptmill` command to its end and capture what it printed."""
    return subprocess.run(
        [PROMPTMILL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def promptmill_process(*args: str, env: dict[str, str], cwd: Path = ROOT, **kwargs) -> subprocess.Popen:
    """Start the `promptmill` command (a worker, a run to be killed) and leave it running."""
    return subprocess.Popen([PROMPTMILL, *args], env=env, cwd=cwd, **kwargs)


def stop(*processes: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM each process still running (its whole group where it leads one: a worker's pool, Flower
    under `promptmill flower`) and wait for it to end."""
    for process in processes:
        if process.poll() is None:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout)


def write_dataset(
    folder: Path, rows: Iterable[dict], pipeline: str | None = None, name: str = "rows.jsonl"
) -> tuple[Path, Path | None]:
    """Write rows as JSONL (and the pipeline's TOML beside them, when given); returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / name
    with data.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    if pipeline is None:
        return data, None
    pipeline_path = folder / f"{Path(name).stem}.toml"
    pipeline_path.write_text(pipeline)
    return data, pipeline_path


def user_env(folder: Path, redis_url: str, api_url: str, api_key: str, **extra: str) -> dict[str, str]:
    """The environment of a user whose jobs go to this Redis and whose Anthropic API is `api_url` (a
    bench's local server): none of the caller's own promptmill or Anthropic settings, data in `folder`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTMILL_", "ANTHROPIC_"))}
    return {**base, "PROMPTMILL_REDIS_URL": redis_url, "PROMPTMILL_DATA_DIR": str(folder / "data"),
            "ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": api_key, **extra}  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fast_recovery(env: dict[str, str]) -> dict[str, str]:
    """A dead worker's chunks go out again within seconds instead of the default 15 to 25."""
    return {**env, "PROMPTMILL_LEASE_TTL_S": "2", "PROMPTMILL_SWEEP_EVERY_S": "1"}


def interruptible() -> None:
    """In a child about to run: Ctrl-C (SIGINT) as a terminal delivers it. A suite started in the
    background by a non-interactive shell (`make test &`) inherits SIGINT ignored, and Python keeps
    an ignored SIGINT ignored: the test's Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(env: dict[str, str], *args: str, quiet: bool = False) -> subprocess.Popen:
    """A `promptmill` command left running, for a test to interrupt or kill around it; a quiet one
    (a worker, whose log nobody reads) writes nowhere, so it can never block on a full pipe."""
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        [PROMPTMILL, *args],
        env=env, cwd=ROOT, stdout=output, stderr=output, text=True, start_new_session=quiet,
        preexec_fn=interruptible,
    )  # fmt: skip


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
