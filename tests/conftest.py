"""Real parts for every test: an embedded Redis, the local Anthropic-protocol server, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis
from tests.anthropic_server import ServerControl

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def api_server() -> ServerControl:
    server = ServerControl.start(API_KEY)
    yield server
    server.stop()


@pytest.fixture
def fake_api(api_server: ServerControl, redis_url: str) -> ServerControl:
    """The local server, reset: no faults, no limits, and no limits learned from it in Redis."""
    api_server.reset()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("pm:limit:*"):
        client.delete(key)
    return api_server


@pytest.fixture
def env(redis_url: str, api_server: ServerControl, tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose workers share `redis_url` and whose API is the local server."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTMILL_", "ANTHROPIC_"))}
    return {
        **base,
        "PROMPTMILL_REDIS_URL": redis_url,
        "PROMPTMILL_DATA_DIR": str(tmp_path / "data"),
        "PROMPTMILL_BACKOFF_BASE_S": "0.05",
        "PROMPTMILL_BACKOFF_CAP_S": "0.5",
        "ANTHROPIC_BASE_URL": api_server.url,
        "ANTHROPIC_API_KEY": API_KEY,
    }


def promptmill(
    *args: str, env: dict[str, str], timeout: float = 240, cwd: Path = ROOT, **kwargs
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
