"""Crash safety with real processes: shards off Redis, `verify`, a producer killed halfway, a row that
kills its worker, an interrupted run, and (marked `chaos`) workers killed at random all job long."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter

import psutil
import pytest
import redis

from promptmill.config.settings import Settings
from promptmill.jobs.state.keys import COUNTER_OK, JobKeys
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from tests.chaos import (
    kill_holders_of_resent_chunks,
    kill_tree,
    kill_workers_at_random,
    live_workers,
    longest_stall_s,
    running,
)
from tests.conftest import promptmill, read_jsonl
from tests.support import fast_recovery, start_cli, wait_until, write_dataset
from tests.test_api_jobs import LABELS, PIPELINE, job_id_of, successes_by_prompt, write_job


@pytest.fixture
def store(env) -> JobStore:
    return JobStore.from_url(env["PROMPTMILL_REDIS_URL"])


@pytest.fixture
def new_job(store):
    """The id of the job a test's subprocess creates, once it exists."""
    before = set(store.job_ids())

    def find(command: subprocess.Popen) -> str:
        wait_until(lambda: set(store.job_ids()) - before or command.poll() is not None, 60, "the job to be created")
        if not set(store.job_ids()) - before:
            _, stderr = command.communicate()
            raise AssertionError(f"the command exited {command.returncode} before creating its job:\n{stderr}")
        return (set(store.job_ids()) - before).pop()

    return find


def job_keys(redis_url: str, job_id: str, kind: str) -> list[bytes]:
    return list(redis.Redis.from_url(redis_url).scan_iter(JobKeys(job_id).prefix + kind + ":*"))


def test_finished_chunks_leave_redis_for_shards_and_export_merges_them_in_order(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 1000)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    shards = sorted(path.name for path in (out / "shards").glob("*.jsonl"))
    assert shards == [f"{job_id}.{first:010d}.jsonl" for first in range(0, 1000, Settings().chunk_size)]
    assert job_keys(env["PROMPTMILL_REDIS_URL"], job_id, "results") == []
    assert job_keys(env["PROMPTMILL_REDIS_URL"], job_id, "chunk") == []
    exported = promptmill("export", job_id, "--out", str(tmp_path / "again"), env=env)
    assert exported.returncode == 0, exported.stderr
    records = read_jsonl(tmp_path / "again" / "results.jsonl")
    assert [r["row"] for r in records] == list(range(1000))
    assert [r["output"] for r in records] == [LABELS[i % 2] for i in range(1000)]


def test_verify_passes_on_a_clean_job_and_names_a_counter_that_drifted(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 100)
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    job_id = job_id_of(result)
    clean = promptmill("verify", job_id, env=env)
    assert clean.returncode == 0 and "100 committed rows" in clean.stdout, clean.stderr
    redis.Redis.from_url(env["PROMPTMILL_REDIS_URL"]).hincrby(JobKeys(job_id).counters, COUNTER_OK, 1)
    drifted = promptmill("verify", job_id, env=env)
    assert drifted.returncode == 1 and "counters say 101 ok" in drifted.stderr


def test_a_producer_killed_halfway_resumes_without_enqueuing_or_skipping_rows(tmp_path, env, fake_api, store, new_job):
    data, pipeline = write_job(tmp_path, 6000)
    producer = start_cli(
        env, "submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), "--chunk-size", "4"
    )
    job_id = new_job(producer)
    wait_until(lambda: store.status(job_id).rows_produced >= 1000, 60, "a thousand rows enqueued")
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    produced_at_kill = store.status(job_id).rows_produced
    assert not store.status(job_id).produced and produced_at_kill < 6000

    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    chunk_ids = store.chunks.ids(job_id)
    assert chunk_ids == [f"{first:010d}" for first in range(0, 6000, 4)]  # each chunk once, in order
    records = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert [r["row"] for r in records] == list(range(6000))
    assert max(successes_by_prompt(fake_api.log()).values()) == 1


def test_a_row_that_kills_its_worker_every_time_fails_as_poison_and_the_rest_complete(tmp_path, env, fake_api):
    _, pipeline = write_job(tmp_path, 0)
    rows = [{"id": i, "text": f"row {i}", "answer": LABELS[i % 2]} for i in range(40)]
    rows[13]["text"] = "this row kills whoever sends it [[kill_worker]]"
    data, _ = write_dataset(tmp_path, rows, name="poisoned.jsonl")
    out = tmp_path / "out"
    result = promptmill(
        "run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--chunk-size", "10",
        env=fast_recovery(env), timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(40))
    assert [r["row"] for r in records if r["status"] != "ok"] == [13]
    assert records[13]["error"]["kind"] == "worker_lost" and "died 3 times" in records[13]["error"]["message"]
    kills = sum(1 for entry in fake_api.log() if entry["status"] == "killed_worker")
    assert kills == 4  # the first run, then once in a group and twice alone


def test_an_interrupted_run_resumes_with_its_counts_and_completes_exactly(tmp_path, env, fake_api, store, new_job):
    # 8 requests in flight of 100 ms each: about 80 rows a second, so the run is far from its end when
    # the interrupt lands, however slowly a loaded machine lets this test see its 500th row.
    fake_api.configure(latency_ms=100)
    env = {**env, "PROMPTMILL_MAX_IN_FLIGHT": "4"}
    data, pipeline = write_job(tmp_path, 1500)
    out = tmp_path / "o"
    run = start_cli(env, "run", str(data), "--pipeline", str(pipeline), "--out", str(out))
    job_id = new_job(run)
    wait_until(lambda: store.status(job_id).terminal >= 500, 120, "500 rows")
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert f"promptmill resume {job_id}" in stderr
    assert not [p for p in psutil.process_iter(["cmdline"]) if job_id in " ".join(p.info["cmdline"] or [])]
    done_at_stop = store.status(job_id).terminal
    assert 500 <= done_at_stop < 1500

    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done_at_stop:,} of 1,500 rows already done" in resumed.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(1500))
    assert all(r["status"] == "ok" for r in records)
    assert promptmill("verify", job_id, env=env).returncode == 0


def test_a_paused_job_sends_nothing_more_until_resumed_then_completes_each_row_once(tmp_path, env, fake_api, store, new_job):
    # 8 requests in flight of 100 ms each: about 80 rows a second, so the job is far from its end
    # when `pause` (a process of its own) lands.
    fake_api.configure(latency_ms=100)
    env = {**env, "PROMPTMILL_MAX_IN_FLIGHT": "4"}
    data, pipeline = write_job(tmp_path, 1000)
    out = tmp_path / "o"
    run = start_cli(env, "run", str(data), "--pipeline", str(pipeline), "--out", str(out))
    job_id = new_job(run)
    wait_until(lambda: store.status(job_id).terminal >= 100, 120, "100 rows")
    paused = promptmill("pause", job_id, env=env)
    assert paused.returncode == 0, paused.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 4 and f"job {job_id} paused: paused by the user" in stderr, stderr
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "paused" and 100 <= status["done"] < 1000
    sent = len(fake_api.log())
    assert sent == status["done"]  # what was on the wire at the pause was answered and committed
    assert promptmill("pause", job_id, env=env).returncode != 0  # only a running job pauses

    resumed = promptmill("resume", job_id, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(1000)) and all(r["status"] == "ok" for r in records)
    assert max(successes_by_prompt(fake_api.log()).values()) == 1  # none sent twice


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_10000_rows_and_a_second_job_while_workers_are_killed_at_random_end_exact_and_pay_only_for_answers_in_flight(
    tmp_path, env, fake_api, store
):
    fake_api.configure(latency_ms=5)
    env = fast_recovery(env)
    # A second job, weight 3, shares the run's workers by fair shares and takes their kills too.
    second = tmp_path / "second"
    rows = ({"id": i, "text": f"second job row {i}", "answer": LABELS[i % 2]} for i in range(3000))
    second_data, second_pipeline = write_dataset(second, rows, PIPELINE)
    submitted = promptmill("submit", str(second_data), "--pipeline", str(second_pipeline), "--out", str(second / "o"),
                           "--priority", "3", env=env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    second_id = submitted.stdout.split()[-1]
    data, pipeline = write_job(tmp_path, 10_000)
    out = tmp_path / "o"
    run = start_cli(env, "run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "3")
    try:
        kills = kill_workers_at_random(run, random.Random(3), every_s=(3, 6))
    finally:
        kill_tree(run)  # a run that outlived the test must not take the next tests' jobs
    stdout, stderr = run.communicate()
    assert run.returncode == 0, stderr
    assert len(kills) >= 3, "the job ended before the harness could kill anything"
    job_id = job_id_of(subprocess.CompletedProcess([], 0, stdout=stdout, stderr=stderr))
    # Weight 3 against 1: it ends while the big job has about a third of its rows done.
    assert store.status(second_id).state is JobState.complete, store.status(second_id)
    assert promptmill("export", second_id, "--out", str(second / "o"), env=env).returncode == 0

    answered = [entry for entry in fake_api.log() if entry["status"] == 200]
    by_prompt = Counter(entry["prompt"] for entry in answered)
    paid_twice = {prompt for prompt, count in by_prompt.items() if count > 1}
    settings = Settings()
    assert len(paid_twice) <= len(kills) * settings.api_chunks_per_worker * settings.chunk_size  # kills x rows in flight
    for job, records_at, count in ((job_id, out, 10_000), (second_id, second / "o", 3000)):
        records = read_jsonl(records_at / "results.jsonl")
        assert [r["row"] for r in records] == list(range(count))
        assert all(r["status"] == "ok" for r in records)
        ours = [entry for entry in answered if ("second job" in (entry["prompt"] or "")) == (job == second_id)]
        assert_paid_twice_only_in_flight(ours, records, kills)
        assert_tokens_are_the_bill_less_lost_answers(job, ours, env)
        assert promptmill("verify", job, env=env).returncode == 0
    print(f"chaos: {len(kills)} workers killed; {len(paid_twice)} of 13,000 rows answered twice")  # -s shows it


def assert_paid_twice_only_in_flight(answered: list[dict], records: list[dict], kills) -> None:
    """A row is answered twice only if one of its answers was in flight when a worker died. The
    server's log tells which: an answer that is not the row's committed one must have gone to a
    connection of a worker that was killed (so it was sent before the kill: the server's clock lags a
    loaded machine by seconds), and the kill came before that worker could commit it."""
    paid_twice = {prompt for prompt, count in Counter(e["prompt"] for e in answered).items() if count > 1}
    committed_request = {r["request_id"] for r in records}
    committed_within = 2.0  # a busy worker commits what it read within this
    for entry in answered:
        if entry["prompt"] in paid_twice and entry["request_id"] not in committed_request:
            holders = [kill.at for kill in kills if entry["port"] in kill.ports]
            assert any(when <= entry["done"] + committed_within for when in holders), (entry, kills)


def assert_tokens_are_the_bill_less_lost_answers(job_id: str, answered: list[dict], env: dict[str, str]) -> None:
    """The job's tokens are the server's billed usage for its rows less exactly the lost answers."""
    first_answer: dict[str, dict] = {}
    lost = Counter()
    for entry in answered:
        if entry["prompt"] in first_answer:  # one answer of each row is the committed one
            lost["input"] += entry["usage"]["input_tokens"]
            lost["output"] += entry["usage"]["output_tokens"]
        first_answer.setdefault(entry["prompt"], entry)
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["tokens"]["input"] == sum(e["usage"]["input_tokens"] for e in answered) - lost["input"]
    assert status["tokens"]["output"] == sum(e["usage"]["output_tokens"] for e in answered) - lost["output"]


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_redis_killed_and_restarted_mid_job_loses_no_committed_result(tmp_path, env, fake_api):
    from promptmill.jobs.state.embedded import EmbeddedRedis

    own_redis = EmbeddedRedis(tmp_path / "redis")
    env = fast_recovery({**env, "PROMPTMILL_REDIS_URL": own_redis.start()})
    fake_api.configure(latency_ms=10)
    data, pipeline = write_job(tmp_path, 5000)
    out = tmp_path / "o"
    run = start_cli(env, "run", str(data), "--pipeline", str(pipeline), "--out", str(out))
    try:
        store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
        wait_until(lambda: store.job_ids() and store.status(store.job_ids()[0]).terminal >= 1000, 120, "1000 rows")
        job_id = store.job_ids()[0]
        own_redis.process.send_signal(signal.SIGKILL)
        own_redis.process.wait()
        killed_at = time.monotonic()
        time.sleep(2)
        EmbeddedRedis(tmp_path / "redis").start()  # as a supervisor would: same port, same data
        stdout, stderr = run.communicate(timeout=400)
        assert run.returncode == 0, stderr
        records = read_jsonl(out / "results.jsonl")
        assert [r["row"] for r in records] == list(range(5000))
        assert all(r["status"] == "ok" for r in records)
        assert promptmill("verify", job_id, env=env).returncode == 0
        answered = [e for e in fake_api.log() if e["status"] == 200]
        twice = [p for p, n in Counter(e["prompt"] for e in answered).items() if n > 1]
        # Only answers that were on the wire, or came back while Redis was down, are paid twice.
        for prompt in twice:
            assert any(e["done"] >= killed_at - 0.25 for e in answered if e["prompt"] == prompt), prompt
    finally:
        kill_tree(run)
        JobStore.from_url(env["PROMPTMILL_REDIS_URL"]).redis.shutdown(nosave=True)


def one_worker_on_a_submitted_job(tmp_path, env, fake_api, store) -> tuple[str, subprocess.Popen]:
    """3,000 rows submitted, one worker on them, 300 done: a job to stop in the middle."""
    fake_api.configure(latency_ms=20)
    data, pipeline = write_job(tmp_path, 3000)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    job_id = submitted.stdout.strip().splitlines()[-1]
    worker = start_cli(env, "worker", "--queues", "api", quiet=True)
    wait_until(lambda: store.status(job_id).terminal >= 300, 120, "300 rows")
    return job_id, worker


def resume_and_check_every_row_paid_once(tmp_path, env, fake_api, job_id: str) -> None:
    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["row"] for r in read_jsonl(tmp_path / "o" / "results.jsonl")] == list(range(3000))
    assert max(successes_by_prompt(fake_api.log()).values()) == 1  # nothing was paid twice


def test_sigterm_on_a_worker_finishes_its_chunks_and_exits_cleanly(tmp_path, env, fake_api, store):
    job_id, worker = one_worker_on_a_submitted_job(tmp_path, env, fake_api, store)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert store.chunks.lost(job_id, queue_empty=False, stranded_after_s=0) == []  # every chunk it started, it finished
    stopped_at = store.status(job_id).terminal
    assert stopped_at % Settings().chunk_size == 0 and stopped_at < 3000  # whole chunks only
    resume_and_check_every_row_paid_once(tmp_path, env, fake_api, job_id)


def test_cancel_stops_the_workers_sending_and_resume_finishes_the_job(tmp_path, env, fake_api, store):
    job_id, worker = one_worker_on_a_submitted_job(tmp_path, env, fake_api, store)
    try:
        cancelled = promptmill("cancel", job_id, env=env)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        # Stopped: no worker holds a chunk of the job any more, so no request of it is in flight, and
        # a chunk run that starts later checks the state before it sends anything.
        leases = JobKeys(job_id).lease("*")
        wait_until(lambda: not list(store.redis.scan_iter(leases)), 60, "the workers to let go of the job's chunks")
        sent = len(fake_api.log())
        worker.terminate()
        assert worker.wait(timeout=60) == 0
        assert len(fake_api.log()) == sent  # nothing more was sent up to the worker's exit
        assert store.status(job_id).state.value == "cancelled" and store.status(job_id).terminal < 3000
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    resume_and_check_every_row_paid_once(tmp_path, env, fake_api, job_id)


@pytest.mark.chaos
def test_an_embedded_redis_killed_under_a_run_is_brought_back_and_the_run_completes(tmp_path, env, fake_api):
    from promptmill.jobs.state.embedded import EmbeddedRedis

    fake_api.configure(latency_ms=10)
    embedded_env = {k: v for k, v in env.items() if k != "PROMPTMILL_REDIS_URL"}  # as on a laptop
    data, pipeline = write_job(tmp_path, 3000)
    out = tmp_path / "o"
    run = start_cli(fast_recovery(embedded_env), "run", str(data), "--pipeline", str(pipeline), "--out", str(out))
    state_file = tmp_path / "data" / "redis" / "server.json"
    wait_until(state_file.exists, 60, "the embedded Redis")
    server = json.loads(state_file.read_text())
    store = JobStore.from_url(EmbeddedRedis(state_file.parent).start())  # joins the run's server
    wait_until(lambda: store.job_ids() and store.status(store.job_ids()[0]).terminal >= 1000, 120, "1000 rows")
    os.kill(server["pid"], signal.SIGKILL)
    _, stderr = run.communicate(timeout=240)
    assert run.returncode == 0, stderr
    assert [r["row"] for r in read_jsonl(out / "results.jsonl")] == list(range(3000))


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_killing_the_worker_that_holds_a_resent_chunk_never_stalls_the_job_past_the_recovery_bound(
    tmp_path, env, fake_api, store, new_job
):
    """A chunk lost twice (its worker died, then the worker of its resent copy) is sent again: the
    job never stalls longer than a bound set by the lease and sweep periods, not Celery's hour."""
    fake_api.configure(latency_ms=1000)
    data, pipeline = write_job(tmp_path, 8000)
    out = tmp_path / "o"
    # Chunks of 16: a chunk whose runs died twice goes on row by row (see below), one careful chunk at a
    # time in a process: 16 seconds each, not the default chunk's 64.
    run = start_cli(fast_recovery(env), "run", str(data), "--pipeline", str(pipeline), "--out", str(out), "--workers", "3",
                    "--chunk-size", "16")  # fmt: skip
    try:
        job_id = new_job(run)
        wait_until(lambda: store.status(job_id).terminal >= 500, 120, "500 rows")
        live_workers(run)[0].send_signal(signal.SIGKILL)
        # Then, twice, the worker that runs the resent copy of a chunk.
        assert kill_holders_of_resent_chunks(store, job_id, run, count=2, within_s=120) == 2, "no holder caught"
        # No stall: rows keep being committed until the end. (A chunk whose runs died twice goes on
        # row by row, one answer a second here, by design: progress, not a stall.)
        stalled_s = longest_stall_s(store, job_id, run, within_s=320)
        _, stderr = run.communicate(timeout=60)
    finally:
        kill_tree(run)
    assert run.returncode == 0, stderr
    # Lease 2 s, a stranded chunk waits three 1 s sweeps, a restarted worker takes a few seconds to
    # start: a chunk lost twice is sent again within that, not after Celery's hour.
    assert stalled_s < 30, stalled_s
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(8000)) and all(r["status"] == "ok" for r in records)
    assert promptmill("verify", job_id, env=env).returncode == 0


def test_a_run_killed_outright_leaves_no_worker_and_no_redis_running_and_resume_finishes_exactly(tmp_path, env, fake_api):
    """SIGKILL, as a closed terminal or an out-of-memory kill would: the run's local workers see it gone
    and stop within seconds, its embedded Redis stops once idle, and `resume` finishes the job."""
    from promptmill.jobs.state.embedded import EmbeddedRedis

    fake_api.configure(latency_ms=50)
    laptop = {k: v for k, v in env.items() if k != "PROMPTMILL_REDIS_URL"}  # the embedded Redis
    laptop = fast_recovery({**laptop, "PROMPTMILL_EMBEDDED_IDLE_S": "3"})
    data, pipeline = write_job(tmp_path, 3000)
    out = tmp_path / "o"
    run = start_cli(laptop, "run", str(data), "--pipeline", str(pipeline), "--out", str(out))
    state_file = tmp_path / "data" / "redis" / "server.json"
    try:
        wait_until(state_file.exists, 60, "the embedded Redis")
        client = JobStore.from_url(EmbeddedRedis(state_file.parent).start()).redis  # joins the run's server
        store = JobStore(client)
        wait_until(lambda: store.job_ids() and store.status(store.job_ids()[0]).terminal >= 300, 120, "300 rows")
        job_id = store.job_ids()[0]
        workers = live_workers(run)
        assert len(workers) == 2
        redis_pid = json.loads(state_file.read_text())["pid"]
        client.close()  # nobody uses the Redis now but the run and its workers
        run.kill()
        run.wait()
        wait_until(lambda: not any(running(p.pid) for p in workers), 10, "the run's workers to stop")
        # Then nothing uses its Redis: it stops once idle (3 s here) and its guard has looked.
        wait_until(lambda: not running(redis_pid), 20, "the embedded Redis to stop")
    finally:
        kill_tree(run)

    resumed = promptmill("resume", job_id, env=laptop, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["row"] for r in records] == list(range(3000)) and all(r["status"] == "ok" for r in records)
    assert promptmill("verify", job_id, env=laptop).returncode == 0
    assert json.loads(promptmill("status", job_id, "--json", env=laptop).stdout)["state"] == "complete"


def test_a_worker_told_to_stop_just_after_its_redis_stops_exits_within_a_lease(tmp_path, env, fake_api):
    from promptmill.jobs.state.embedded import EmbeddedRedis

    own_redis = EmbeddedRedis(tmp_path / "redis")
    worker_env = {**env, "PROMPTMILL_REDIS_URL": own_redis.start(), "PROMPTMILL_LEASE_TTL_S": "3"}
    fake_api.configure(latency_ms=200)
    data, pipeline = write_job(tmp_path, 2000)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=worker_env)
    assert submitted.returncode == 0, submitted.stderr
    worker = start_cli(worker_env, "worker", "--queues", "api", quiet=True)
    try:
        wait_until(lambda: len(fake_api.log()) >= 100, 60, "the worker at work")
        own_redis.process.send_signal(signal.SIGKILL)  # Redis gone, and the worker told to stop
        own_redis.process.wait()
        worker.send_signal(signal.SIGTERM)
        told_at = time.monotonic()
        wait_until(lambda: worker.poll() is not None, 3 + 15, "the worker to exit")
        took = time.monotonic() - told_at
    finally:
        if worker.poll() is None:
            kill_tree(worker)
    assert took < 3 + 15  # a lease's life and a few seconds, not forever
