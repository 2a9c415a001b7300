"""One fleet, many jobs: fair shares by weight. The picks themselves on a real Redis, then whole jobs
with real workers against the local server (its log tells whose request came when)."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from pathlib import Path

import pytest

from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec, new_job_id
from promptmill.jobs.state.chunks import ChunkPayload, chunk_id_for
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import RenderedRequest
from promptmill.pipelines.spec import Pipeline
from tests.conftest import promptmill, read_jsonl
from tests.support import start_cli, stop, wait_until, write_dataset

CHUNK_ROWS = 16


@pytest.fixture
def store(redis_url) -> JobStore:
    store = JobStore.from_url(redis_url)
    before = set(store.job_ids())
    yield store
    # The jobs made here are runnable and look like the API queue's: later tests' workers would run them.
    for job_id in set(store.job_ids()) - before:
        store.delete_job(job_id)


@pytest.fixture
def queue() -> str:
    """A queue of the test's own: the picks see only its jobs, whatever else this Redis holds."""
    return "fair-test-" + secrets.token_hex(3)


def make_job(store: JobStore, tmp_path: Path, name: str, priority: int = 1, chunks: int = 0) -> JobSpec:
    settings = Settings()
    spec = JobSpec(
        job_id=f"{new_job_id()}-{name}", pipeline=Pipeline(name=name, model="claude-haiku-4-5", prompt="{text}", max_tokens=8),
        backend="anthropic", input_path=str(tmp_path / "in.jsonl"), input_format="jsonl",
        out_dir=str(tmp_path / name), chunk_size=CHUNK_ROWS, max_in_flight=settings.max_in_flight,
        max_attempts=settings.max_attempts, priority=priority,
    )  # fmt: skip
    store.create_job(spec)
    store.set_state(spec.job_id, JobState.running)
    add_chunks(store, spec, range(chunks))
    return spec


def add_chunks(store: JobStore, spec: JobSpec, numbers: range) -> list[tuple[int, str]]:
    added = []
    for n in numbers:
        first = n * CHUNK_ROWS
        requests = [RenderedRequest(row=row, prompt=f"row {row}") for row in range(first, first + CHUNK_ROWS)]
        store.chunks.add(spec.job_id, ChunkPayload(chunk_id=chunk_id_for(first), first_row=first,
                                                   row_count=CHUNK_ROWS, requests=requests))  # fmt: skip
        added.append((first, chunk_id_for(first)))
    return added


def wait_turns(store: JobStore, queue: str, jobs: list[JobSpec]) -> None:
    for spec in jobs:
        first_rows = [int(chunk_id) for chunk_id in store.chunks.ids(spec.job_id)]
        store.fair.add(spec.job_id, queue, [(first, chunk_id_for(first)) for first in first_rows])


def picks(store: JobStore, queue: str, count: int) -> list[str]:
    taken = [store.fair.take(queue) for _ in range(count)]
    return [picked.job_id for picked in taken if picked is not None]


def test_two_waiting_jobs_get_turns_in_the_ratio_of_their_weights_all_along(store, tmp_path, queue):
    light, heavy = make_job(store, tmp_path, "light", 1, 40), make_job(store, tmp_path, "heavy", 3, 40)
    wait_turns(store, queue, [light, heavy])
    order = picks(store, queue, 40)
    assert Counter(order) == {light.job_id: 10, heavy.job_id: 30}
    for start in range(0, 40, 4):  # not 10 then 30: every four turns, one is the light job's
        assert order[start:start + 4].count(light.job_id) == 1, order
    # Each job's chunks go in input order.
    taken = [store.fair.take(queue) for _ in range(4)]
    assert [p.chunk_id for p in taken if p.job_id == heavy.job_id] == [chunk_id_for(n * CHUNK_ROWS) for n in (30, 31, 32)]


def test_a_job_that_joins_late_runs_at_its_next_turn_and_gets_no_burst_for_the_turns_it_missed(store, tmp_path, queue):
    big = make_job(store, tmp_path, "big", 1, 60)
    wait_turns(store, queue, [big])
    assert set(picks(store, queue, 30)) == {big.job_id}
    small = make_job(store, tmp_path, "small", 1, 10)
    wait_turns(store, queue, [small])
    order = picks(store, queue, 12)
    assert small.job_id in order[:2]  # behind at most the one turn in progress, not 30 chunks of backlog
    # Then one turn each (it joins at the pass last served, so it may share that turn's tie once), not
    # the 30 turns it was not there for.
    assert order.count(small.job_id) in (6, 7), order


def test_a_paused_job_leaves_its_turns_to_the_others_and_comes_back_where_the_queue_is(store, tmp_path, queue):
    one, other = make_job(store, tmp_path, "one", 1, 30), make_job(store, tmp_path, "other", 1, 30)
    wait_turns(store, queue, [one, other])
    assert Counter(picks(store, queue, 10)) == {one.job_id: 5, other.job_id: 5}
    store.pause(other.job_id)
    assert set(picks(store, queue, 10)) == {one.job_id}  # its turns go to the job still running
    assert store.fair.waiting(other.job_id) == 25  # its chunks wait for the resume, none lost
    store.set_state(other.job_id, JobState.running)
    # Back: every chunk waiting needs a message again (its own went to the other job's chunks).
    assert store.fair.add(other.job_id, queue, [], every_waiting=True) == 25
    back = Counter(picks(store, queue, 10))
    assert back[other.job_id] in (5, 6), back  # no burst of the 10 it missed (a tie may fall its way once)


def test_a_chunk_waits_once_however_often_it_is_added_and_a_gone_job_leaves_the_queue(store, tmp_path, queue):
    spec = make_job(store, tmp_path, "once", 1, 3)
    chunks = [(n * CHUNK_ROWS, chunk_id_for(n * CHUNK_ROWS)) for n in range(3)]
    assert store.fair.add(spec.job_id, queue, chunks[:1]) == 1  # it joins: one chunk waits, one message
    assert store.fair.add(spec.job_id, queue, chunks) == 2  # two more; the first waits already
    assert store.fair.add(spec.job_id, queue, chunks) == 0
    assert store.fair.waiting(spec.job_id) == 3
    assert store.fair.fraction(spec.job_id, queue, 1, running=False) == 1.0
    store.delete_job(spec.job_id)
    assert store.fair.take(queue) is None
    assert store.fair.weights(queue) == {}


# -- whole jobs, real workers ---------------------------------------------------------------------

PIPELINE = """
name = "fair"
model = "claude-haiku-4-5"
prompt = "{job} row {id} [[reply:ok {id}]]"
max_tokens = 8
"""


def write_rows(folder: Path, job: str, rows: int) -> tuple[Path, Path]:
    return write_dataset(folder / job, ({"job": job, "id": i} for i in range(rows)), PIPELINE)


def submit(env: dict[str, str], folder: Path, job: str, rows: int, *options: str) -> str:
    data, pipeline = write_rows(folder, job, rows)
    chunk = ("--chunk-size", str(CHUNK_ROWS))
    done = promptmill("submit", str(data), "-p", str(pipeline), "--out", str(folder / job / "out"), *chunk, *options, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def requests_of(log: list[dict], job: str) -> list[dict]:
    return [entry for entry in log if (entry["prompt"] or "").startswith(f"{job} row ")]


def complete(store: JobStore, job_id: str) -> bool:
    return store.status(job_id).state is JobState.complete


def exact(env: dict[str, str], folder: Path, job: str, job_id: str, rows: int) -> None:
    exported = promptmill("export", job_id, "--out", str(folder / job / "export"), env=env)
    assert exported.returncode == 0, exported.stderr
    records = read_jsonl(folder / job / "export" / "results.jsonl")
    assert [r["row"] for r in records] == list(range(rows))
    assert all(r["status"] == "ok" for r in records)
    assert promptmill("verify", job_id, env=env).returncode == 0


SLOTS = 2 * Settings().api_chunks_per_worker  # two workers


def test_a_small_job_submitted_behind_a_large_one_waits_for_its_share_not_the_large_backlog(tmp_path, env, fake_api, store):
    fake_api.configure(rpm=3600, burst_s=1, latency_ms=20)
    large = submit(env, tmp_path, "large", 3000)
    workers = [start_cli(env, "worker", "--queues", "api", quiet=True) for _ in range(2)]
    try:
        wait_until(lambda: store.status(large).ok >= 300, 120, "the large job to be well under way")
        small = submit(env, tmp_path, "small", 150)
        before = len(fake_api.log())  # its chunks wait in Redis now (a loaded machine's CLI may take seconds)
        wait_until(lambda: complete(store, small), 120, "the small job to finish")
        log = fake_api.log()
        assert not complete(store, large), "the large job ended first: nothing measured"
        small_last = max(i for i, entry in enumerate(log) if (entry["prompt"] or "").startswith("small row "))
        large_meanwhile = len(requests_of(log[before:small_last + 1], "large"))
        # Equal weights: while it runs, the small job gets every other turn. The large job sends its
        # 150 rows' worth meanwhile, plus what was already in the workers' slots when the small job
        # came (first in, first out within a worker). First in, first out across the fleet, it
        # would have sent its whole backlog first: 2,700 rows.
        bound = 150 + 2 * SLOTS * CHUNK_ROWS
        print(f"the large job sent {large_meanwhile} requests while the small one ran (bound {bound})")
        assert large_meanwhile <= bound, (large_meanwhile, bound)
        assert promptmill("cancel", large, env=env).returncode == 0  # its rest proves nothing more
    finally:
        stop(*workers)
    exact(env, tmp_path, "small", small, 150)


def test_weights_1_and_3_get_1_to_3_of_the_limit_and_a_paused_jobs_share_goes_to_the_other(tmp_path, env, fake_api, store):
    fake_api.configure(rpm=3600, burst_s=1, latency_ms=20)
    light = submit(env, tmp_path, "light", 500, "--priority", "1")
    heavy = submit(env, tmp_path, "heavy", 1500, "--priority", "3")
    workers = [start_cli(env, "worker", "--queues", "api", quiet=True) for _ in range(2)]
    try:
        # Early, while both have chunks waiting: the shares their weights give them.
        wait_until(lambda: len(requests_of(fake_api.log(), "light")) >= 20, 120, "the light job under way")
        status = json.loads(promptmill("status", heavy, "--json", env=env).stdout)
        assert status["share"]["weight"] == 3 and status["share"]["fair_fraction"] == 0.75
        listed = {job["job_id"]: job for job in json.loads(promptmill("jobs", "--json", env=env).stdout)["jobs"]}
        assert listed[light]["weight"] == 1 and listed[light]["share"] == 0.25
        shown = promptmill("jobs", env={**env, "COLUMNS": "80"}).stdout
        running = shown[shown.index("running: their share of the fleet"):]
        assert any(line.split()[:3] == [heavy, "3", "75%"] for line in running.splitlines()), shown
        assert "…" not in shown and all(len(line) <= 80 for line in shown.splitlines()), shown

        wait_until(lambda: len(requests_of(fake_api.log(), "light")) >= 200, 120, "200 of the light job's requests")
        log = fake_api.log()
        # Both submitted before any worker started: both wait from the first turn on.
        light_200th = [i for i, entry in enumerate(log) if (entry["prompt"] or "").startswith("light row ")][199]
        window = log[: light_200th + 1]
        ratio = len(requests_of(window, "heavy")) / len(requests_of(window, "light"))
        print(f"heavy:light requests while both ran: {ratio:.2f}")
        assert 2.7 <= ratio <= 3.3, ratio

        # The heavy job pauses: once its answers on the wire are in, every request is the light job's.
        assert promptmill("pause", heavy, env=env).returncode == 0
        wait_until(lambda: store.running_chunks(heavy) == 0, 60, "the heavy job's chunks to stop")
        paused_at = len(fake_api.log())
        wait_until(lambda: len(fake_api.log()) >= paused_at + 50, 120, "50 requests after the pause")
        after = fake_api.log()[paused_at:]
        assert requests_of(after, "heavy") == [] and len(requests_of(after, "light")) == len(after)
        paused = json.loads(promptmill("status", heavy, "--json", env=env).stdout)["share"]
        assert paused["fair_fraction"] == 0 and paused["slots"] == 0  # it holds no share while paused
        assert promptmill("resume", heavy, "--detach", env=env).returncode == 0
        wait_until(lambda: complete(store, light) and complete(store, heavy), 240, "both jobs to finish")
    finally:
        stop(*workers)
    exact(env, tmp_path, "light", light, 500)
    exact(env, tmp_path, "heavy", heavy, 1500)
    answered = Counter(entry["prompt"] for entry in fake_api.log() if entry["status"] == 200)
    assert max(answered.values()) == 1  # no row was paid twice: pausing commits what is on the wire


def test_a_weight_past_the_fleets_max_priority_is_refused_at_submit_and_counts_at_the_max_in_redis(
    store, tmp_path, queue, env
):
    """PROMPTMILL_MAX_PRIORITY bounds a job's weight: `--priority` over it is refused at submit, and a
    weight written into Redis past it (a rewritten job) counts at the max in the workers' picks."""
    from promptmill.jobs.state.keys import META_PRIORITY, JobKeys

    data, pipeline = write_rows(tmp_path, "greedy", 4)
    refused = promptmill("submit", str(data), "-p", str(pipeline), "--priority", "5", "--out", str(tmp_path / "o"),
                         env={**env, "PROMPTMILL_MAX_PRIORITY": "3"})  # fmt: skip
    assert refused.returncode == 2 and "PROMPTMILL_MAX_PRIORITY" in refused.stderr, refused.stderr

    light, greedy = make_job(store, tmp_path, "light", 1, 30), make_job(store, tmp_path, "greedy", 2, 60)
    store.redis.hset(JobKeys(greedy.job_id).meta, META_PRIORITY, 1000)
    wait_turns(store, queue, [light, greedy])
    taken = [store.fair.take(queue, max_weight=2) for _ in range(30)]
    assert Counter(picked.job_id for picked in taken) == {light.job_id: 10, greedy.job_id: 20}


def test_an_ended_job_leaves_the_fair_set_at_once_and_a_resumed_one_comes_back_where_it_left(store, tmp_path, queue):
    """A job leaves its queue's fair set as its last waiting chunk is taken (complete soon), and at
    once when it is cancelled or fails, not when its turn would come; a resume brings it back at the
    pass it left with."""
    from promptmill.jobs.state.keys import fair_key

    def members() -> set[str]:
        return {member.decode() for member in store.redis.zrange(fair_key(queue), 0, -1)}

    short, cancelled, failing = (make_job(store, tmp_path, name, 1, chunks) for name, chunks in
                                 (("short", 1), ("cancelled", 5), ("failing", 5)))  # fmt: skip
    wait_turns(store, queue, [short, cancelled, failing])
    assert members() == {short.job_id, cancelled.job_id, failing.job_id}
    taken = [store.fair.take(queue) for _ in range(3)]
    assert short.job_id in {picked.job_id for picked in taken} and short.job_id not in members()
    store.set_state(cancelled.job_id, JobState.cancelled)
    store.fail_job(failing.job_id, "a refused key")
    assert members() == set()
    left_at = float(store.redis.hget(f"pm:{{{cancelled.job_id}}}:meta", "fair_pass") or 0)
    assert left_at > 0
    store.set_state(cancelled.job_id, JobState.running)  # resumed: its waiting chunks wait their turn again
    wait_turns(store, queue, [cancelled])
    assert store.redis.zscore(fair_key(queue), cancelled.job_id) == left_at
