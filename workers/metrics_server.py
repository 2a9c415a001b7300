"""`run`'s metrics endpoint: its local workers' Prometheus metrics, added up, on one port
(prometheus-client's multiprocess mode; the metrics themselves are workers/metrics.py)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def serving(port: int | None, address: str = "127.0.0.1") -> Iterator[Path | None]:
    """While `run` runs: its local workers' metrics, added up, on `address:port`. Yields the folder the
    workers write to (their PROMETHEUS_MULTIPROC_DIR), or None without a port."""
    if port is None:
        yield None
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = Path(tempfile.mkdtemp(prefix="promptmill-metrics-"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    server, thread = start_http_server(port, addr=address, registry=registry)
    try:
        yield folder
    finally:
        server.shutdown()
        thread.join(timeout=5)
        shutil.rmtree(folder, ignore_errors=True)
