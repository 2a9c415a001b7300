"""A gpu worker killed mid-job (with its engine's processes): another finishes the job, every row once.

Apart from `test_vllm.py`, whose module-wide worker would otherwise take this test's chunks.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from promptmill.jobs.store import JobStore
from tests.test_crash_safety import start_cli, wait_until
from tests.test_vllm import REVIEWS, finish, submit, summary_pipeline, write_rows

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def test_a_killed_gpu_worker_s_chunks_complete_after_restart_with_no_duplicates(tmp_path: Path, env) -> None:
    env = {**env, "PROMPTMILL_LEASE_TTL_S": "3", "PROMPTMILL_SWEEP_EVERY_S": "1"}
    pipeline = summary_pipeline(tmp_path)
    job_id = submit(env, write_rows(tmp_path, REVIEWS[:64]), pipeline, tmp_path / "out", "--chunk-size", "8")
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    first = start_cli(env, "worker", "--queues", "gpu", quiet=True)
    try:
        wait_until(lambda: store.status(job_id).terminal >= 16, 300, "16 rows")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its engine's processes, with no warning
        first.wait(timeout=30)
    killed_at = store.status(job_id).terminal
    assert killed_at < 64
    second = start_cli(env, "worker", "--queues", "gpu", quiet=True)
    try:
        records = finish(env, job_id)
    finally:
        second.terminate()
        second.wait(timeout=120)
    assert [record["row"] for record in records] == list(range(64))  # every row once: no duplicates
    assert all(record["status"] == "ok" for record in records)
    assert store.status(job_id).ok == 64
