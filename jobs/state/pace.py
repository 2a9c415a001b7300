"""A job's pace, kept in Redis so any machine reads it: latency and time to first token as mergeable
histograms (fixed buckets, 25% apart, so every worker's counts simply add), and rows and output tokens
per 10-second slot (the last minute's rate, the whole job's, and the curve of rows done over time), with
the requests sent under the fleet's limiter and what became of them (`report`'s timeline).

Workers gather their rows in the process and write them in one pipeline at most twice a second and
when a chunk ends (`PaceRecorder`); `status` reads them (`job_pace`). So that the hash does not grow
with a job's age, the sweeper rolls old slots up (`roll_up`): 10-second slots older than an hour into
10-minute ones, and those older than a day into hours (`START+WIDTH|name` fields).
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from dataclasses import dataclass

import redis

from promptmill.jobs.state.keys import PACE_FIRST, PACE_LAST, PACE_ROLLED, PACE_RPM, JobKeys, lua

# Bucket i holds latencies up to EDGES_MS[i] (the last, anything longer): 1 ms to 10 minutes.
EDGES_MS: tuple[float, ...] = tuple(1.25**i for i in range(61))
SLOT_S = 10
_WRITE_EVERY_S = 0.5


def bucket_of(latency_ms: float) -> int:
    return bisect.bisect_left(EDGES_MS, latency_ms)


def percentile_ms(counts: dict[int, int], q: float) -> float | None:
    """The q-quantile of a bucketed histogram, placed linearly within its bucket."""
    n = sum(counts.values())
    if n == 0:
        return None
    rank, seen = q * n, 0
    for bucket in sorted(counts):
        if seen + counts[bucket] >= rank:
            low = EDGES_MS[bucket - 1] if bucket > 0 else 0.0
            high = EDGES_MS[min(bucket, len(EDGES_MS) - 1)]
            return round(low + (high - low) * max(0.0, rank - seen) / counts[bucket], 1)
        seen += counts[bucket]
    return round(EDGES_MS[-1], 1)


# What a worker gathered of one job, written in one step, unless the job was deleted (a late answer
# must not bring its keys back). KEYS: spec, latency, ttft, pace. ARGV: the first row's start and the
# last row's end ('' for none: kept as the earliest and latest any worker saw), then triples of what
# to add: which key (2, 3, 4; or 'set' for a pace field set, not added), field, value.
_WRITE = lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 3, #ARGV, 3 do
  if ARGV[i] == 'set' then redis.call('HSET', KEYS[4], ARGV[i + 1], ARGV[i + 2])
  else redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]) end
end
if ARGV[1] ~= '' then
  local first, last = redis.call('HGET', KEYS[4], $FIRST), redis.call('HGET', KEYS[4], $LAST)
  if not first or tonumber(ARGV[1]) < tonumber(first) then redis.call('HSET', KEYS[4], $FIRST, ARGV[1]) end
  if not last or tonumber(ARGV[2]) > tonumber(last) then redis.call('HSET', KEYS[4], $LAST, ARGV[2]) end
end
return 1
""", FIRST=PACE_FIRST, LAST=PACE_LAST)


# Slots older than AGE seconds merge into slots WIDTH seconds wide, the coarsest that applies first.
ROLL_UP_TIERS: tuple[tuple[int, int], ...] = ((86_400, 3_600), (3_600, 600))
_ROLL_UP_EVERY_S = 60

# Merge old slots into coarser ones, in one step (workers only add to recent slots; a late write to an
# old one is merged at the next roll-up). Sums add; the limit in force ("rpm") keeps the highest.
# ARGV: now (epoch s), how often at most, the slot width (s), then the tiers as AGE, WIDTH pairs.
_ROLL_UP = lua("""
local now, every, fine = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if now - tonumber(redis.call('HGET', KEYS[1], $ROLLED) or '0') < every then return 0 end
redis.call('HSET', KEYS[1], $ROLLED, now)
local flat = redis.call('HGETALL', KEYS[1])
local moved = 0
for i = 1, #flat, 2 do
  local slot, name = string.match(flat[i], '^([^|]+)|(.+)$$')  -- $$: a Lua pattern's end, not a name
  if slot then
    local start, width = string.match(slot, '^(%d+)%+(%d+)$$')
    if start then start, width = tonumber(start), tonumber(width) else start, width = tonumber(slot) * fine, fine end
    for t = 4, #ARGV, 2 do
      local age, to = tonumber(ARGV[t]), tonumber(ARGV[t + 1])
      if width < to and now - (start + width) >= age then
        local into = (start - start % to) .. '+' .. to .. '|' .. name
        if name == $RPM then
          if tonumber(flat[i + 1]) > tonumber(redis.call('HGET', KEYS[1], into) or '0') then
            redis.call('HSET', KEYS[1], into, flat[i + 1])
          end
        else
          redis.call('HINCRBY', KEYS[1], into, flat[i + 1])
        end
        redis.call('HDEL', KEYS[1], flat[i])
        moved = moved + 1
        break
      end
    end
  end
end
return moved
""", ROLLED=PACE_ROLLED, RPM=PACE_RPM)


def roll_up(client: redis.Redis, job_id: str, now: float | None = None, every_s: float = _ROLL_UP_EVERY_S) -> int:
    """Merge the job's old pace slots into coarser ones (at most once per `every_s`); returns how many
    fields were merged."""
    now = time.time() if now is None else now
    tiers = [value for tier in ROLL_UP_TIERS for value in tier]
    return int(client.eval(_ROLL_UP, 1, JobKeys(job_id).pace, int(now), every_s, SLOT_S, *tiers))


@dataclass(frozen=True)
class RequestSeen:
    """One request sent under the fleet's limiter, as the job's pace (`report`) and the metrics count it."""

    held_s: float  #: how long the limiter held it
    rate_limited: bool  #: answered 429
    server_failure: bool  #: the provider's failure, as the breaker counts it (5xx, 529, timeout, dropped)
    rpm: float | None  #: the requests-per-minute limit in force


class PaceRecorder:
    """One per worker process: rows committed, gathered by job, written together."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._write_script = client.register_script(_WRITE)
        self._lock = threading.Lock()
        self._written_at = 0.0
        self._latency, self._ttft, self._slots, self._span = self._gathered()
        self._limits: dict[str, dict[int, int]] = collections.defaultdict(dict)  # job -> slot -> rpm in force

    @staticmethod
    def _gathered() -> tuple[dict[str, collections.Counter], dict[str, collections.Counter],
                             dict[str, collections.Counter], dict[str, list[float]]]:  # fmt: skip
        """Empty: by job, latency and ttft bucket counts; slot counts; the [earliest start, latest end] seen."""
        counts = [collections.defaultdict(collections.Counter) for _ in range(3)]
        return counts[0], counts[1], counts[2], {}

    def request(self, job_id: str, seen: RequestSeen) -> None:
        """A request sent under the fleet's limiter: counted in its slot, with a 429 or a failure of the
        provider (5xx, 529, a timeout, a dropped connection) marked, a hold of a second or more by the
        limiter (its pace, a 429's pause, an open breaker) counted, and the requests-per-minute limit
        in force."""
        slot = int(time.time()) // SLOT_S
        with self._lock:
            slots = self._slots[job_id]
            slots[f"{slot}|requests"] += 1
            if seen.rate_limited:
                slots[f"{slot}|r429"] += 1
            elif seen.server_failure:
                slots[f"{slot}|r5xx"] += 1
            if seen.held_s >= 1.0:
                slots[f"{slot}|held"] += 1
            if seen.rpm:
                self._limits[job_id][slot] = round(seen.rpm)

    def add(self, job_id: str, latency_ms: float | None, output_tokens: int, ok: bool,
            started_at: float | None, finished_at: float | None, ttft_ms: float | None = None) -> None:  # fmt: skip
        slot = int(time.time()) // SLOT_S
        with self._lock:
            if ok and latency_ms is not None:
                self._latency[job_id][bucket_of(latency_ms)] += 1
            if ok and ttft_ms is not None:
                self._ttft[job_id][bucket_of(ttft_ms)] += 1
            slots = self._slots[job_id]
            slots[f"{slot}|rows"] += 1
            if output_tokens:
                slots[f"{slot}|output_tokens"] += output_tokens
            if started_at is not None and finished_at is not None:
                span = self._span.setdefault(job_id, [started_at, finished_at])
                span[0], span[1] = min(span[0], started_at), max(span[1], finished_at)
        if time.monotonic() - self._written_at > _WRITE_EVERY_S:
            self.write()

    def write(self) -> None:
        with self._lock:
            latency, ttft, slots, spans = self._latency, self._ttft, self._slots, self._span
            self._latency, self._ttft, self._slots, self._span = self._gathered()
            limits, self._limits = self._limits, collections.defaultdict(dict)
            self._written_at = time.monotonic()
        if not latency and not slots:
            return
        jobs = set(latency) | set(ttft) | set(slots) | set(limits) | set(spans)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                args: list[object] = [*spans.get(job_id, ("", ""))]
                for key, counts in ((2, latency.get(job_id, {})), (3, ttft.get(job_id, {}))):
                    for bucket, count in counts.items():
                        args += [key, bucket, count]
                for field, count in slots.get(job_id, {}).items():
                    args += [4, field, count]
                for slot, rpm in limits.get(job_id, {}).items():
                    args += ["set", f"{slot}|{PACE_RPM}", rpm]
                keys = JobKeys(job_id)
                self._write_script(keys=[keys.spec, keys.latency, keys.ttft, keys.pace], args=args, client=pipe)
            pipe.execute()


@dataclass(frozen=True)
class JobPace:
    latency_ms: dict[str, float | None]  # p50, p95, p99 of answered rows
    rows_per_s: dict[str, float | None]  # last_minute, job
    output_tokens_per_s: dict[str, float | None]
    eta_s: float | None
    rows_over_time: list[tuple[int, int, int]]  # (slot start, epoch seconds; rows done by its end; its width, s)
    latency_counts: dict[int, int]  # answered rows by latency bucket (EDGES_MS)
    # Per slot with requests sent under a limiter: (slot start, requests, 429s, server errors,
    # requests held a second or more by the limiter, requests-per-minute limit in force or None, the
    # slot's width in seconds: 10, wider once rolled up)
    requests_over_time: list[tuple[int, int, int, int, int, int | None, int]]
    ttft_ms: dict[str, float | None] | None  # p50, p95, p99; None: no row measured one
    ttft_counts: dict[int, int]

    def as_dict(self) -> dict:
        return {
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            # Which is which: latency runs from sending to the whole answer; the first token is only
            # seen in a streamed answer (`stream = true`) or on the local engine.
            "measured": {"latency_ms": "send to whole answer",
                         "ttft_ms": "send to first token" if self.ttft_ms else "not measured (only streamed answers have it)"},
            "rows_per_s": self.rows_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "eta_s": self.eta_s,
        }


def job_pace(client: redis.Redis, job_id: str, pending: int, now: float | None = None) -> JobPace:
    keys = JobKeys(job_id)
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.latency)
        pipe.hgetall(keys.pace)
        pipe.hgetall(keys.ttft)
        raw_latency, raw_pace, raw_ttft = pipe.execute()
    counts = {int(bucket): int(count) for bucket, count in raw_latency.items()}
    ttft = {int(bucket): int(count) for bucket, count in raw_ttft.items()}
    # (start, width) in epoch seconds -> its counts; old slots are rolled up into wider ones.
    slots: dict[tuple[int, int], dict[str, int]] = collections.defaultdict(dict)
    span: dict[str, float] = {}
    for field, value in raw_pace.items():
        slot, _, name = field.decode().partition("|")
        if not name:
            span[slot] = float(value)  # first, last (and when the slots were last rolled up)
        elif "+" in slot:
            start, width = slot.split("+")
            slots[(int(start), int(width))][name] = int(value)
        else:
            slots[(int(slot) * SLOT_S, SLOT_S)][name] = int(value)
    now = time.time() if now is None else now

    # A finished job's pace ends with its last row, not now.
    end = now if pending or not slots else span.get(PACE_LAST, min(now, max(start + width for start, width in slots)))

    def rate(name: str, since: float) -> float | None:
        """Per second over the slots from `since`: from the later of their start and the job's first
        row, to now (or the job's last row, once it is done)."""
        chosen = [slot for slot in slots if slot[0] >= since]
        if not chosen:
            return 0.0 if slots else None
        start = max(min(chosen)[0], span.get(PACE_FIRST, 0.0))
        return round(sum(slots[s].get(name, 0) for s in chosen) / max(end - start, 1e-3), 2)

    last_minute = (int(now) // SLOT_S - 60 // SLOT_S + 1) * SLOT_S
    rows_recent = rate("rows", last_minute)
    # Over the whole job: from its first row's start to its last row's end (or now, while it runs).
    job_s = end - span[PACE_FIRST] if PACE_FIRST in span else None
    total_rows = sum(slot.get("rows", 0) for slot in slots.values())
    total_output = sum(slot.get("output_tokens", 0) for slot in slots.values())

    def over_job(count: int) -> float | None:
        return round(count / max(job_s, 1e-3), 2) if job_s is not None else None

    done, over_time = 0, []
    for start, width in sorted(slots):
        done += slots[(start, width)].get("rows", 0)
        over_time.append((start, done, width))
    requests_over_time = [
        (start, *(slots[(start, width)].get(name, 0) for name in ("requests", "r429", "r5xx", "held")),
         slots[(start, width)].get(PACE_RPM), width)
        for start, width in sorted(slots)
        if slots[(start, width)].get("requests")
    ]  # fmt: skip
    return JobPace(
        requests_over_time=requests_over_time,
        latency_ms={f"p{q}": percentile_ms(counts, q / 100) for q in (50, 95, 99)},
        rows_per_s={"last_minute": rows_recent, "job": over_job(total_rows)},
        output_tokens_per_s={"last_minute": rate("output_tokens", last_minute), "job": over_job(total_output)},
        eta_s=math.ceil(pending / rows_recent) if pending and rows_recent else (0 if not pending else None),
        rows_over_time=over_time,
        latency_counts=counts,
        ttft_ms={f"p{q}": percentile_ms(ttft, q / 100) for q in (50, 95, 99)} if ttft else None,
        ttft_counts=ttft,
    )
