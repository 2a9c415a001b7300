"""Fair shares of one fleet: which job's chunk a worker slot that comes free runs next.

Celery's queues are first in, first out: a job that queued 65,536 rows would hold a later 200-row job
back until they all ran. So a job's chunks do not wait in Celery under their own names. They wait in
Redis (`pm:{JOB}:ready`, in input order), and Celery's queue holds one interchangeable message per
waiting chunk: "pick the next chunk" (`TASK_RUN_NEXT`). The worker slot that takes such a message
picks the chunk there and then (`FairStore.take`) and sends it by name, ahead of every pick message
(config/celery_config.NEXT_PRIORITY), so it runs next. The pick is by stride scheduling (weighted fair
queuing):

- each queue's jobs with chunks waiting sit in `pm:fair:{QUEUE}`, scored by their pass;
- the job with the lowest pass gives its next chunk, and its pass grows by the chunk's rows over the
  job's weight (its priority, default 1): two jobs that both wait get rows in the ratio of their weights;
- a job that joins starts at the queue's virtual time (the pass last served) or where it left off,
  whichever is later: never ahead of the jobs already there, never a backlog of turns to catch up on;
- a job leaves the set as its last waiting chunk is taken, and at once when it is cancelled, fails or
  is deleted; one that cannot use its turn (paused) leaves when its turn comes, and the pick goes on to
  the next job: its share goes to the others at once.

Nothing here replaces Celery: messages, acks, redelivery and the workers are Celery's; Redis only
decides which chunk a free slot sends. Crash safety is the chunks' own: a picked chunk is leased and
committed row by row as ever, and the sweeper sends a chunk whose worker died, or that was picked and
never sent, again by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from promptmill.jobs.state.keys import (
    META_FAIR_PASS,
    META_PRIORITY,
    META_STATE,
    JobKeys,
    fair_key,
    fair_time_key,
    lua,
)
from promptmill.jobs.state.status import JobState

# Add chunks to a job's waiting set (NX: a chunk waits once however often it is added) and put the job
# in its queue's fair set if it is not there. KEYS: ready, fair set, virtual time, meta. ARGV[1]: the
# job; ARGV[2]: '1' to count every waiting chunk as needing a message (a lost message's repair);
# then pairs of score (first row) and chunk id. Returns how many "pick the next chunk" messages to send:
# the chunks added, or every chunk waiting when the job (re)joins (its messages may have gone to other
# jobs' chunks while it was out).
_ADD = lua("""
local added = 0
for i = 3, #ARGV, 2 do added = added + redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1]) end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting == 0 then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  local now = tonumber(redis.call('GET', KEYS[3]) or '0')
  local left_at = tonumber(redis.call('HGET', KEYS[4], $PASS) or '0')
  redis.call('ZADD', KEYS[2], math.max(now, left_at), ARGV[1])
  return waiting
end
if ARGV[2] == '1' then return waiting end
return added
""", PASS=META_FAIR_PASS)

# The next chunk for a free slot of one queue. KEYS: the queue's fair set, its virtual time. ARGV[1]:
# now (epoch s), for the sweeper's clock of when the chunk was last sent; ARGV[2]: the most weight a
# job counts at (the worker's PROMPTMILL_MAX_PRIORITY, whatever a job's meta says). Returns {job, chunk} or nil.
# A job's keys are named from its id (pm:{JOB}:...), as the sweeper's script does.
_TAKE = lua("""
local served = tonumber(redis.call('GET', KEYS[2]) or '0')
while true do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #head == 0 then return nil end
  local job, pass = head[1], tonumber(head[2])
  local prefix = 'pm:{' .. job .. '}:'
  local state = redis.call('HGET', prefix .. 'meta', $STATE)
  if state == $PRODUCING or state == $RUNNING then
    local popped = redis.call('ZPOPMIN', prefix .. 'ready')
    if #popped > 0 then
      local chunk = popped[1]
      if pass > served then
        served = pass
        redis.call('SET', KEYS[2], tostring(served))
      end
      local rows = tonumber(redis.call('HGET', prefix .. 'chunk_rows', chunk) or '1')
      local weight = tonumber(redis.call('HGET', prefix .. 'meta', $PRIORITY) or '1') or 1
      weight = math.max(1, math.min(weight, tonumber(ARGV[2])))
      local next_pass = math.max(pass, served) + rows / weight
      if redis.call('ZCARD', prefix .. 'ready') > 0 then
        redis.call('ZADD', KEYS[1], next_pass, job)
      else  -- its last chunk waiting: it leaves now, and comes back where it left off with its next
        redis.call('HSET', prefix .. 'meta', $PASS, tostring(next_pass))
        redis.call('ZREM', KEYS[1], job)
      end
      redis.call('HSET', prefix .. 'sent_at', chunk, ARGV[1])
      return {job, chunk}
    end
  end
  if state then redis.call('HSET', prefix .. 'meta', $PASS, tostring(pass)) end
  redis.call('ZREM', KEYS[1], job)
end
""", STATE=META_STATE, PRODUCING=JobState.producing, RUNNING=JobState.running, PRIORITY=META_PRIORITY,
    PASS=META_FAIR_PASS)  # fmt: skip


@dataclass(frozen=True)
class Picked:
    job_id: str
    chunk_id: str


class FairStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._add = client.register_script(_ADD)
        self._take = client.register_script(_TAKE)

    def add(self, job_id: str, queue: str, chunks: list[tuple[int, str]], every_waiting: bool = False) -> int:
        """Let these chunks (first row, chunk id) wait for a slot of `queue`; returns how many "run the
        next chunk" messages to send (`every_waiting`: one per chunk waiting, to replace lost ones)."""
        keys = JobKeys(job_id)
        args: list[object] = [job_id, int(every_waiting)]
        for first_row, chunk_id in chunks:
            args += [first_row, chunk_id]
        return int(self._add(keys=[keys.ready, fair_key(queue), fair_time_key(queue), keys.meta], args=args))

    def take(self, queue: str, max_weight: int = 1000) -> Picked | None:
        """The chunk a free slot of `queue` runs now, taken off its job's waiting set (None: none waits);
        a job's weight counts at `max_weight` at most."""
        picked = self._take(keys=[fair_key(queue), fair_time_key(queue)], args=[time.time(), max_weight])
        return None if picked is None else Picked(picked[0].decode(), picked[1].decode())

    def leave(self, job_id: str) -> int:
        """The job leaves every queue's fair set now (it ended), keeping its pass for a resume to come
        back at; returns the sets it left."""
        left = 0
        for key in self.redis.scan_iter(match=fair_key("*"), count=100):  # (not the `:served` clocks)
            score = self.redis.zscore(key, job_id)
            if score is not None and self.redis.zrem(key, job_id):
                self.redis.hset(JobKeys(job_id).meta, META_FAIR_PASS, repr(score))
                left += 1
        return left

    def waiting(self, job_id: str) -> int:
        """The job's chunks waiting for a slot."""
        return int(self.redis.zcard(JobKeys(job_id).ready))

    def weights(self, queue: str) -> dict[str, int]:
        """The weight of each runnable job of the queue that has chunks waiting (one paused, ended or
        run dry since its last turn leaves the set only at its next turn: it is not counted)."""
        jobs = [raw.decode() for raw in self.redis.zrange(fair_key(queue), 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                pipe.hmget(JobKeys(job_id).meta, [META_STATE, META_PRIORITY])
                pipe.zcard(JobKeys(job_id).ready)
            replies = pipe.execute()
        weights = {}
        for job_id, (state, priority), waiting in zip(jobs, replies[::2], replies[1::2]):
            if waiting and state is not None and JobState(state.decode()).runnable:
                weights[job_id] = int(priority or 1)
        return weights

    def fraction(self, job_id: str, queue: str, weight: int, running: bool) -> float:
        """The job's fair share of its queue's turns: its weight over the weights of the jobs waiting
        for them, itself included while it waits or runs (`running`: it holds slots). 0: it waits for
        none (not runnable, or nothing left to run)."""
        weights = self.weights(queue)
        if job_id not in weights and not running:
            return 0.0
        weights[job_id] = weight
        return round(weight / sum(weights.values()), 4)
