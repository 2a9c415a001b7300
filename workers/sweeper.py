"""Hands out again the chunks whose worker died, without waiting for Celery.

With `acks_late` on a Redis broker, a task whose worker was killed stays unacked until kombu's
visibility timeout (an hour) sends it again. Each worker process runs this sweeper: every
`sweep_every_s` (Settings) one of them (a Redis lock picks it) looks for chunks that a worker started
and that nobody leases any more, and sends them again. A chunk sent twice is harmless: the lease
lets one run it, and done rows are never sent again.
"""

from __future__ import annotations

import logging
import threading

from amqp.exceptions import ChannelError
from celery.signals import worker_ready

from promptmill.jobs.state.chunks import parse_run_id
from promptmill.jobs.dispatch import ChunkSender
from promptmill.jobs.state.pace import roll_up
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.workers.app import app
from promptmill.workers.metrics import JOB_SHARE, JOBS_HELD
from promptmill.workers.runtime import WorkerRuntime, runtime

log = logging.getLogger(__name__)

def _queue_is_empty(queue: str) -> bool:
    with app.connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count == 0
        except ChannelError:
            return True  # kombu's Redis transport: no list under the queue's name means no message


def sweep_once(
    store: JobStore, sender: ChunkSender, every_s: float, ttl_s: float, measured: bool = False, lease_s: float = 15.0
) -> int:
    """Send the lost chunks of every runnable job once more; returns how many were sent.

    Lost: a chunk whose worker died while running it; a chunk picked for a slot that nothing started
    within `lease_s` (its picker died before it sent it), whatever the queue's depth; or, once every
    chunk is enqueued and the queue is empty, a chunk neither done nor running nor waiting its turn that was not sent for a while:
    its message died with a worker that had reserved it or was holding it for a delayed retry
    (`ChunkStore.lost`). Chunks waiting their turn with an empty queue get new messages to run them.
    """
    sent = 0
    for job_id in store.job_ids():
        try:
            status = store.status(job_id)
            spec = store.spec(job_id)
        except KeyError as gone:  # deleted or expired under us: the other jobs still get their sweep
            log.warning("sweeper: skipping job %s: %s", job_id, gone)
            continue
        if status.state is JobState.complete:
            if status.finished_at is None and store.chunks.all_flushed(job_id):
                store.mark_finished(job_id, ttl_s)  # its results are on disk: its keys may expire
            continue
        if not status.state.runnable or not store.take_sweep_turn(job_id, every_s):
            continue
        roll_up(store.redis, job_id)  # its pace keeps a bounded number of slots, however long it runs
        if measured:
            running = bool(store.running_chunks(job_id))
            JOB_SHARE.labels(job=job_id).set(store.fair.fraction(job_id, spec.queue, spec.priority, running))
        links = spec.links()
        empty = {queue: bool(status.produced) and _queue_is_empty(queue) for queue in {link.queue for link in links}}
        empty_links = [i for i, link in enumerate(links) if i and empty[link.queue]]
        lost = store.chunks.lost(job_id, empty[spec.queue], 3 * every_s, empty_links, lease_s)
        if store.fair.waiting(job_id):
            # Its chunks waiting their turn need "pick the next chunk" messages: a job that left the fair
            # shares as it got more comes back, and an empty queue means theirs were lost (a dead worker's
            # reserved messages come back only after the visibility timeout).
            lost_messages = empty[spec.queue] if status.produced else _queue_is_empty(spec.queue)
            sender.send_fairly(store.fair, spec, [], every_waiting=lost_messages)
        for run in lost:
            chunk_id, link = parse_run_id(run)
            sender.send(job_id, chunk_id, links[link].queue, link)
        if lost:
            log.warning("job %s: %d chunks lost their worker or their message; sent again", job_id, len(lost))
        sent += len(lost)
    return sent


class OrphanSweeper(threading.Thread):
    """Every `sweep_every_s`: lost chunks sent again, old pace slots rolled up, and what this process
    keeps for ended jobs let go."""

    def __init__(self, rt: WorkerRuntime):
        super().__init__(daemon=True, name="promptmill-sweeper")
        self.rt = rt
        self.every_s, self.ttl_s = rt.settings.sweep_every_s, rt.settings.job_ttl_days * 86_400
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                sweep_once(self.rt.store, ChunkSender(app), self.every_s, self.ttl_s, self.rt.metrics,
                           self.rt.settings.lease_ttl_s)
                forgotten = self.rt.forget_ended_jobs(self.rt.settings.forget_job_after_s)
                if forgotten:
                    log.info("let go of %d ended jobs: %s", len(forgotten), ", ".join(forgotten))
                if self.rt.metrics:
                    JOBS_HELD.set(len(self.rt.jobs_held()))
            except Exception:  # noqa: BLE001 - the sweeper must outlive a Redis hiccup
                log.exception("sweeping for lost chunks failed; trying again")


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    OrphanSweeper(runtime()).start()
