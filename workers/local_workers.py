"""`run`'s local Celery worker processes: started for a job, kept alive, stopped when it ends (and, if the
`run` dies first, they end by themselves: workers/lifetime.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from promptmill.jobs.shards import worker_log


def promptmill_command() -> list[str]:
    """The installed `promptmill` entry point, as a user runs it: never `python -m` from the current
    folder, whose own packages would then stand first on the worker's import path."""
    script = Path(sysconfig.get_path("scripts")) / "promptmill"
    if script.exists():
        return [str(script)]
    found = shutil.which("promptmill")
    if found is not None:
        return [found]
    return [sys.executable, "-P", "-m", "promptmill"]  # -P: the current folder stays off sys.path


PARENT_PID = "PROMPTMILL_PARENT_PID"  # a local worker's: the process it lives for
WARM_JOB = "PROMPTMILL_WARM_JOB"  # a local worker's: the job whose engine it starts as it boots
EARLY_DEATH_S = 5.0  # a worker that dies sooner than this after starting did not really start
MAX_EARLY_DEATHS = 5  # that many in a row is a crash loop: the run stops instead of spinning


@dataclass
class LocalWorkers:
    """Celery worker processes started by `promptmill run` / `resume` and stopped when it ends."""

    redis_url: str
    queues: list[str]  # each process's queue
    log_dir: Path
    job_id: str  # whose workers: their logs are named by it
    metrics_dir: Path | None = None  # where they write their Prometheus metrics for `run` to serve
    children: list[subprocess.Popen] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    early_deaths: int = 0

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = [0.0] * len(self.queues)
        self.children = [self._spawn(index) for index in range(len(self.queues))]

    def _spawn(self, index: int) -> subprocess.Popen:
        self.started_at[index] = time.monotonic()
        # The worker ends when this process does, however it ends (workers/lifetime.py).
        env = dict(os.environ, PROMPTMILL_REDIS_URL=self.redis_url, **{PARENT_PID: str(os.getpid()), WARM_JOB: self.job_id})
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)  # `run` serves them all on its port
        queue = self.queues[index]
        log = worker_log(self.log_dir, self.job_id, queue, index).open("ab")
        return subprocess.Popen(
            [*promptmill_command(), "worker", "--queues", queue],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def keep_alive(self) -> bool:
        """Restart any worker that died (killed, out of memory); False when they die as they start.

        The chunks a dead worker held are sent again by the other workers' sweeper.
        """
        for index, child in enumerate(self.children):
            if child.poll() is None:
                continue
            lived_s = time.monotonic() - self.started_at[index]
            self.early_deaths = self.early_deaths + 1 if lived_s < EARLY_DEATH_S else 0
            if self.early_deaths > MAX_EARLY_DEATHS:
                return False  # a crash loop (a bad install, an unreachable Redis): stop, resumable
            self.children[index] = self._spawn(index)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM: finish the chunk in hand), then SIGKILL what is left."""
        for child in self.children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        self.children.clear()
