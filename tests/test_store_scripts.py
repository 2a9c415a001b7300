"""The job store's Lua scripts, one by one, on a real Redis: each atomic step does what its comment
says, and does it once."""

from __future__ import annotations

from typing import Iterator

import pytest

from promptmill.config.settings import Settings
from promptmill.jobs.spec import JobSpec, new_job_id
from promptmill.jobs.state.chunks import ChunkPayload, HandOff, chunk_id_for, parse_run_id, run_id
from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.state.lease import ChunkLease
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import ErrorKind, ItemOutcome, RenderedRequest, Usage
from promptmill.pipelines.spec import Pipeline


@pytest.fixture
def store(redis_url) -> JobStore:
    return JobStore.from_url(redis_url)


@pytest.fixture
def job(store: JobStore, tmp_path) -> Iterator[JobSpec]:
    settings = Settings()
    pipeline = Pipeline(name="t", model="claude-haiku-4-5", prompt="{text}", max_tokens=16)
    spec = JobSpec(
        job_id=new_job_id() + "-scripts",
        pipeline=pipeline,
        backend="anthropic",
        input_path=str(tmp_path / "in.jsonl"),
        input_format="jsonl",
        out_dir=str(tmp_path / "out"),
        chunk_size=settings.chunk_size,
        max_in_flight=settings.max_in_flight,
        max_attempts=settings.max_attempts,
    )
    store.create_job(spec)
    # Runnable to the workers of later tests on this Redis (their sweepers measure and send its chunks):
    # it goes with the test.
    yield spec
    store.delete_job(spec.job_id)


def chunk(first_row: int, rows: int) -> ChunkPayload:
    requests = [RenderedRequest(row=row, prompt=f"row {row}") for row in range(first_row, first_row + rows)]
    return ChunkPayload(chunk_id=chunk_id_for(first_row), first_row=first_row, row_count=rows, requests=requests)


def ok(row: int, input_tokens: int = 10) -> ItemOutcome:
    return ItemOutcome(row=row, status="ok", output="x", usage=Usage(input_tokens=input_tokens, output_tokens=2))


def test_one_answer_read_twice_is_billed_once_but_a_second_answer_goes_to_paid_twice(store, job):
    """Two runs of a chunk reading one recorded batch commit the same answer (its request id): the
    provider billed it once. Another answer for the done row was billed again."""
    store.chunks.add(job.job_id, chunk(0, 1))
    chunk_id = chunk_id_for(0)
    answer = ok(0).model_copy(update={"request_id": "msg_batch_result_0"})
    assert store.chunks.commit(job.job_id, chunk_id, job.model, answer)
    assert not store.chunks.commit(job.job_id, chunk_id, job.model, answer)  # the other run's read of it
    assert store.status(job.job_id).paid_twice.as_dict() == {}
    again = ok(0).model_copy(update={"request_id": "msg_another_request"})
    assert not store.chunks.commit(job.job_id, chunk_id, job.model, again)
    assert store.status(job.job_id).paid_twice.as_dict() == {job.model: {"requests": 1, **again.usage.model_dump()}}
    assert store.status(job.job_id).requests_by_model == {job.model: 1}


def test_a_chunk_is_added_once_and_counted_once(store, job):
    assert store.chunks.add(job.job_id, chunk(0, 3))
    assert not store.chunks.add(job.job_id, chunk(0, 3))  # a producer that runs again
    assert store.chunks.ids(job.job_id) == [chunk_id_for(0)]
    assert store.status(job.job_id).rows_produced == 3


def test_commit_writes_a_row_once_and_a_second_answer_goes_to_paid_twice(store, job):
    store.chunks.add(job.job_id, chunk(0, 2))
    chunk_id = chunk_id_for(0)
    assert store.chunks.commit(job.job_id, chunk_id, "m", ok(0, input_tokens=10))
    assert not store.chunks.commit(job.job_id, chunk_id, "m", ok(0, input_tokens=7))  # the row is done
    status = store.status(job.job_id)
    assert (status.ok, status.failed) == (1, 0)
    assert status.requests_by_model == {"m": 1} and status.usage.input_tokens == 10
    assert status.paid_twice.requests_by_model == {"m": 1} and status.paid_twice.usage.input_tokens == 7
    assert store.chunks.done_rows(job.job_id, chunk_id) == {0}


def test_flushing_frees_the_chunk_and_later_answers_for_it_are_paid_twice(store, job):
    store.chunks.add(job.job_id, chunk(0, 1))
    chunk_id = chunk_id_for(0)
    store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    store.chunks.mark_flushed(job.job_id, chunk_id)
    keys = JobKeys(job.job_id)
    assert not store.redis.exists(keys.results(chunk_id), keys.chunk(chunk_id))
    assert store.chunks.is_flushed(job.job_id, chunk_id) and store.chunks.all_flushed(job.job_id)
    assert not store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    assert store.status(job.job_id).paid_twice.requests_by_model == {"m": 1}


def test_flushing_a_chunk_frees_its_handoff_runs_bookkeeping_too(store, job):
    """The runs of a chunk's rows handed to the chain's models ("CHUNK@LINK") are counted, swept and
    sent like the chunk's own: flushing the chunk frees theirs too, so nothing outlives it."""
    store.chunks.add(job.job_id, chunk(0, 1))
    store.chunks.add(job.job_id, chunk(1, 1))
    chunk_id, other = chunk_id_for(0), chunk_id_for(1)
    keys = JobKeys(job.job_id)
    for run in (chunk_id, run_id(chunk_id, 1), run_id(chunk_id, 2), other, run_id(other, 1)):
        store.chunks.sent_now(job.job_id, run)
        store.redis.hset(keys.resent, run, 1)
        store.redis.hset(keys.chunk_runs, run, 1)
    store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    store.chunks.mark_flushed(job.job_id, chunk_id, links=3)
    for key in (keys.sent_at, keys.resent, keys.chunk_runs):
        assert sorted(raw.decode() for raw in store.redis.hkeys(key)) == [other, run_id(other, 1)]


def test_finish_producing_runs_a_producing_job_and_leaves_a_stopped_one_stopped(store, job):
    store.chunks.add(job.job_id, chunk(0, 1))  # a row pending: running, not complete
    store.finish_producing(job.job_id, "abc")
    status = store.status(job.job_id)
    assert status.produced and status.state is JobState.running and status.input_sha256 == "abc"
    store.set_state(job.job_id, JobState.cancelled)
    store.finish_producing(job.job_id)
    assert store.status(job.job_id).state is JobState.cancelled


def test_the_budget_holds_up_to_its_cap_then_pauses_the_job_and_settles_to_the_real_cost(store, job):
    store.set_state(job.job_id, JobState.running)
    store.budgets.set(job.job_id, 1.0)
    assert store.budgets.hold(job.job_id, 600_000)
    assert not store.budgets.hold(job.job_id, 500_000)  # 1.1 USD would pass the cap
    assert store.status(job.job_id).state is JobState.paused_budget
    store.budgets.settle(job.job_id, 600_000, 400_000)
    budget = store.budgets.get(job.job_id)
    assert (budget.cap_usd, budget.spent_usd, budget.held_usd) == (1.0, 0.4, 0.0)


def test_a_job_without_a_cap_holds_anything(store, job):
    assert not store.budgets.has_cap(job.job_id)
    assert store.budgets.hold(job.job_id, 10**12)


def test_the_sweep_finds_a_chunk_whose_worker_died_once_per_death(store, job):
    store.chunks.add(job.job_id, chunk(0, 2))
    chunk_id = chunk_id_for(0)
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=30) == []  # never started
    lease = ChunkLease(store.redis, job.job_id, chunk_id, ttl_s=30)
    assert lease.acquire() and lease.count_run() == 1
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=30) == []  # leased: running
    lease.release()
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=30) == [chunk_id]  # its worker died
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=30) == []  # already sent again
    store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    store.chunks.commit(job.job_id, chunk_id, "m", ok(1))
    assert store.chunks.lost(job.job_id, queue_empty=True, stranded_after_s=0) == []  # complete


def test_rows_handed_to_another_queue_are_that_run_s_and_the_sweep_finds_it_lost_on_its_queue(store, job):
    store.chunks.add(job.job_id, chunk(0, 3))
    chunk_id = chunk_id_for(0)
    store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    handoff = HandOff(link=2, models_tried=["m"], attempts=3, errors=[], started_at=1.0)
    assert not store.chunks.hand_off(job.job_id, chunk_id, 0, handoff)  # done already: stays done
    assert store.chunks.hand_off(job.job_id, chunk_id, 1, handoff)
    assert store.chunks.hand_off(job.job_id, chunk_id, 2, handoff)
    assert store.chunks.handed(job.job_id, chunk_id) == {1: handoff, 2: handoff}
    # The chunk's own run has nothing left to send; the handoff run waits for its queue to empty.
    assert store.chunks.lost(job.job_id, queue_empty=True, stranded_after_s=0, empty_links=[]) == []
    run = run_id(chunk_id, 2)
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=0, empty_links=[2]) == [run]
    lease = ChunkLease(store.redis, job.job_id, run, ttl_s=30)
    assert lease.acquire() and lease.count_run() == 1
    assert store.chunks.lost(job.job_id, queue_empty=True, stranded_after_s=0, empty_links=[2]) == []  # running
    lease.release()  # its worker died: the run count stays
    assert store.chunks.lost(job.job_id, queue_empty=False, stranded_after_s=30, empty_links=[]) == [run]
    assert parse_run_id(run) == (chunk_id, 2)
    # A handed row's outcome clears its mark; the chunk is complete with the last one.
    store.chunks.commit(job.job_id, chunk_id, "m", ok(1))
    assert set(store.chunks.handed(job.job_id, chunk_id)) == {2}
    store.chunks.commit(job.job_id, chunk_id, "m", ok(2))
    assert store.chunks.handed(job.job_id, chunk_id) == {}
    assert store.chunks.lost(job.job_id, queue_empty=True, stranded_after_s=0, empty_links=[2]) == []


def test_a_lease_is_held_by_one_worker_and_only_its_holder_renews_or_releases_it(store, job):
    chunk_id = chunk_id_for(0)
    first = ChunkLease(store.redis, job.job_id, chunk_id, ttl_s=30)
    second = ChunkLease(store.redis, job.job_id, chunk_id, ttl_s=30)
    assert first.acquire()
    assert not second.acquire()
    assert 0 < second.remaining_s() <= 30
    assert not second.renew()
    second.release()  # not its lease: nothing happens
    assert store.redis.get(JobKeys(job.job_id).lease(chunk_id)) == first.token.encode()
    first.release()
    assert second.acquire()
    second.release()


def test_requeue_failed_puts_rows_back_to_pending_keeping_their_attempts_and_paid_usage(store, job):
    store.chunks.add(job.job_id, chunk(0, 2))
    chunk_id = chunk_id_for(0)
    failed = ItemOutcome.failure(1, ErrorKind.server_error, "500", attempts=3, model="m", usage=Usage(input_tokens=5))
    store.chunks.commit(job.job_id, chunk_id, "m", ok(0))
    store.chunks.commit(job.job_id, chunk_id, "m", failed)
    assert store.status(job.job_id).failed == 1
    retried = store.chunks.requeue_failed(job.job_id, chunk_id, chunk(0, 2), keep=[], retry=[failed])
    assert retried == 1
    assert store.status(job.job_id).failed == 0
    assert store.chunks.done_rows(job.job_id, chunk_id) == {0}
    assert store.chunks.failed_attempts(job.job_id, chunk_id) == {1: 3}
    assert store.chunks.retried_usage(job.job_id).usage.input_tokens == 5


def test_a_late_answer_for_a_flushed_chunk_is_paid_twice_unless_it_is_the_answer_its_shard_holds(store, job):
    """A chunk done and flushed to its shard, then two late commits for its row: the very answer the
    shard holds (one batch's result read by a second run: billed once) is counted nowhere; another
    answer (billed again) goes to paid_twice. The worker compares them by the shard's request id."""
    import asyncio

    from promptmill.jobs.shards import flush_chunk, prepare_shards
    from promptmill.jobs.state.chunk_run import ChunkRun
    from promptmill.jobs.state.chunks import LATE
    from promptmill.workers.runtime import WorkerRuntime
    from promptmill.workers.tasks import _commit

    prepare_shards(job)
    store.chunks.add(job.job_id, chunk(0, 1))
    chunk_id = chunk_id_for(0)
    answer = ok(0).model_copy(update={"request_id": "msg_batch_result_0"})
    assert store.chunks.commit(job.job_id, chunk_id, job.model, answer)
    assert flush_chunk(store, job, chunk_id)
    assert store.chunks.commit(job.job_id, chunk_id, job.model, answer) == LATE  # decided by the caller
    assert store.status(job.job_id).paid_twice.as_dict() == {}

    loop = asyncio.new_event_loop()
    try:
        rt = WorkerRuntime(pid=0, loop=loop, store=store, settings=Settings())
        run = ChunkRun(store, job, chunk_id, 0, 15.0)
        assert not _commit(rt, run, job.model, answer)  # the shard's own answer, read again: billed once
        assert store.status(job.job_id).paid_twice.as_dict() == {}
        again = ok(0, input_tokens=7).model_copy(update={"request_id": "msg_another_request"})
        assert not _commit(rt, run, job.model, again)
        assert store.status(job.job_id).paid_twice.as_dict() == {job.model: {"requests": 1, **again.usage.model_dump()}}
    finally:
        loop.close()


def test_the_job_list_shows_a_job_whose_ledger_names_an_unpriced_model_with_its_cost_unknown(store, job):
    """`jobs` and the viewer's jobs page list every job in the Redis: one whose ledger names a model
    this machine has no price for (a price file elsewhere) shows its cost as unknown, and the others
    are listed all the same (the page answered 500 for every job before)."""
    from promptmill.reports.status import job_list

    store.chunks.add(job.job_id, chunk(0, 1))
    store.chunks.commit(job.job_id, chunk_id_for(0), "model-priced-elsewhere", ok(0))
    listed = {entry["job_id"]: entry for entry in job_list(store, lambda spec: spec.pipeline.price_table(Settings()))}
    assert listed[job.job_id]["cost_usd"] is None and listed[job.job_id]["ok"] == 1
