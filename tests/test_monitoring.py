"""What Flower shows, seen as Flower sees it: Celery's event receiver on the job's Redis while a real
job runs on real workers."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import threading
import urllib.request
from urllib.parse import urlsplit

import psutil
from celery import Celery

from tests.conftest import promptmill
from tests.support import promptmill_process, stop, wait_until, write_dataset
from tests.test_api_jobs import job_id_of

PIPELINE = """
name = "events"
model = "claude-haiku-4-5"
prompt = "Item {id}: {text}"
max_tokens = 8
"""


def test_workers_send_task_events_naming_each_chunk_by_job_and_chunk(tmp_path, env, fake_api, redis_url):
    events: list[dict] = []
    app = Celery(broker=redis_url)
    listening = threading.Event()

    def capture() -> None:
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": events.append})
            listening.set()
            for _ in receiver.itercapture(limit=None, timeout=None, wakeup=True):
                if stop.is_set():
                    break

    stop = threading.Event()
    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert listening.wait(10)
    data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(50)), PIPELINE)
    out = str(tmp_path / "out")
    result = promptmill("run", str(data), "-p", str(pipeline), "--chunk-size", "10", "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    stop.set()
    app.events.Dispatcher(app.connection()).send("worker-heartbeat")  # wakes the receiver up to stop
    thread.join(10)

    # Each chunk's task: sent by the run, received and succeeded on a worker, named and argued readably.
    received = {e["uuid"]: e for e in events if e["type"] == "task-received" and e["name"] == "promptmill.run_chunk"}
    mine = {uuid: ast.literal_eval(e["args"]) for uuid, e in received.items() if job_id in e["args"]}
    assert sorted(chunk for _, chunk in mine.values()) == [f"{row:010d}" for row in range(0, 50, 10)]  # named by first row
    assert all(job == job_id for job, _ in mine.values())
    succeeded = {e["uuid"] for e in events if e["type"] == "task-succeeded"}
    sent = {e["uuid"] for e in events if e["type"] == "task-sent"}
    assert set(mine) <= succeeded and set(mine) <= sent
    assert any(e["type"] in ("worker-online", "worker-heartbeat") and e.get("hostname", "").startswith("celery@") for e in events)
    assert "key" not in str(mine).lower() and env["ANTHROPIC_API_KEY"] not in str(events)


def test_promptmill_flower_shows_the_jobs_tasks_and_keeps_the_redis_password_off_its_command_line(
    tmp_path, env, fake_api, redis_url
):
    port = free_port()
    flower = promptmill_process(
        "flower", "--port", str(port), env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/api/workers") is not None, 60, "Flower to listen")
        data, pipeline = write_dataset(tmp_path, ({"id": i, "text": f"row {i}"} for i in range(30)), PIPELINE)
        out = str(tmp_path / "out")
        result = promptmill("run", str(data), "-p", str(pipeline), "--chunk-size", "10", "--out", out, env=env)
        assert result.returncode == 0, result.stderr
        job_id = job_id_of(result)

        def job_tasks() -> dict:
            tasks = _get(f"http://127.0.0.1:{port}/api/tasks") or {}
            return {uuid: task for uuid, task in tasks.items() if job_id in (task.get("args") or "")}

        wait_until(lambda: len(job_tasks()) == 3 and all(t["state"] == "SUCCESS" for t in job_tasks().values()),
                   30, "Flower to see the job's three chunks succeed")  # fmt: skip
        assert {task["name"] for task in job_tasks().values()} == {"promptmill.run_chunk"}
        password = urlsplit(redis_url).password
        command_lines = [" ".join(p.cmdline()) for p in psutil.Process(flower.pid).children(recursive=True)]
        assert command_lines and not any(password in line for line in command_lines)
    finally:
        stop(flower, timeout=30)


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_flower_on_another_interface_needs_a_password(env):
    refused = promptmill("flower", "--address", "0.0.0.0", "--port", str(free_port()), env=env)
    assert refused.returncode == 2 and "FLOWER_BASIC_AUTH" in refused.stderr, refused.stderr
