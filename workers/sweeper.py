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

from config.celery_config import TASK_RUN_CHUNK
from jobs.store import JobStore
from workers.app import app
from workers.runtime import runtime

log = logging.getLogger(__name__)

def _queue_is_empty(queue: str) -> bool:
    with app.connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count == 0
        except ChannelError:
            return True  # kombu's Redis transport: no list under the queue's name means no message


def sweep_once(store: JobStore, every_s: float) -> int:
    """Send the lost chunks of every runnable job once more; returns how many were sent.

    Lost: a chunk whose worker died while running it (it has a run count and no lease), or, once the
    queue is empty, a chunk neither done nor running: its message died with a worker that had
    reserved it or was holding it for a delayed retry.
    """
    sent = 0
    for job_id in store.job_ids():
        status = store.status(job_id)
        if not status.state.runnable or not store.take_sweep_turn(job_id, every_s):
            continue
        spec = store.spec(job_id)
        lost = store.orphaned_chunks(job_id)
        if status.produced and _queue_is_empty(spec.queue):
            lost += store.stranded_chunks(job_id, not_before_s=3 * every_s)
        for chunk_id in lost:
            app.send_task(TASK_RUN_CHUNK, args=(job_id, chunk_id), queue=spec.queue)
        if lost:
            log.warning("job %s: %d chunks lost their worker; sent again", job_id, len(lost))
        sent += len(lost)
    return sent


class OrphanSweeper(threading.Thread):
    def __init__(self, store: JobStore, every_s: float):
        super().__init__(daemon=True, name="promptmill-sweeper")
        self.store, self.every_s = store, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                sweep_once(self.store, self.every_s)
            except Exception:  # noqa: BLE001 - the sweeper must outlive a Redis hiccup
                log.exception("sweeping for orphaned chunks failed; trying again")


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    rt = runtime()
    OrphanSweeper(rt.store, rt.settings.sweep_every_s).start()
