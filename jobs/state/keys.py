"""Every Redis key and field promptmill writes, named in one place (as arq's `constants.py` does).

Every key of a job carries the job id in braces (`pm:{JOB}:...`), so one job's keys share a Redis
Cluster slot and one Lua script may touch them together.

    pm:jobs                     sorted set of job ids by creation time
    pm:{JOB}:spec               the JobSpec as JSON (no secrets)
    pm:{JOB}:meta               hash: the META_* fields below
    pm:{JOB}:chunks             list of chunk ids in input order
    pm:{JOB}:chunk_rows         hash: chunk id -> rows in the chunk (to tell a complete chunk)
    pm:{JOB}:chunk:{CHUNK}      the chunk's rendered requests as JSON
    pm:{JOB}:ready              sorted set: the chunks waiting for a worker slot, by first row (their
                                messages are "pick the next chunk": jobs/state/fair.py picks which)
    pm:{JOB}:results:{CHUNK}    hash: row -> outcome JSON; a row's field is its done mark
    pm:{JOB}:counters           hash: ok, failed
    pm:{JOB}:ledger             hash: "MODEL|requests", "MODEL|failed_attempts", "MODEL|input_tokens", ...
                                token usage by model ("MODEL@long": requests at long-context rates)
    pm:{JOB}:budget             hash: spent, held: micro-USD paid so far, and held for requests in flight
    pm:{JOB}:chunk_runs         hash: chunk id -> times a worker started it, while it runs: a chunk
                                here whose lease is gone lost its worker ("CHUNK@LINK": the run of the
                                chunk's rows handed to the chain's model LINK, as in lease, resent, sent_at)
    pm:{JOB}:lease:{CHUNK}      the token of the worker running the chunk, with an expiry
    pm:{JOB}:attempts:{CHUNK}   hash: row -> failed attempts so far (a resumed row keeps its count)
    pm:{JOB}:handed:{CHUNK}     hash: row -> JSON of a HandOff: a row of the chunk gone on to a model of its
                                fallback chain served on another queue (a gpu worker's engine), with
                                what it went through so far; its field goes when its outcome is committed
    pm:{JOB}:row_starts:{CHUNK} hash: row -> times it was sent by a chunk run that follows a dead
                                worker's (poison-row guard; only written in that careful mode)
    pm:{JOB}:flushed            set of chunk ids whose outcomes are in result shards on disk, their
                                results, payload and bookkeeping gone from Redis
    pm:{JOB}:paid_twice         hash, as the ledger: answers that came for rows already done (a chunk
                                run twice at once), paid for but not committed: ledger + this = bill
    pm:{JOB}:retried            hash, as the ledger: the usage of failed outcomes that `resume
                                --retry-failed` replaced (paid for, so the ledger keeps it; verify adds it)
    pm:{JOB}:partial            hash, as the ledger: what failed attempts were billed for (a streamed
                                answer broken off mid-way: its input, the output it had): in the
                                ledger too, in no outcome (verify adds it)
    pm:{JOB}:hosts              set of the hosts whose workers ran the job's chunks (the manifest)
    pm:{JOB}:sweep              a short lock: one worker at a time looks for lost chunks
    pm:{JOB}:resent             hash: chunk id -> its run count when the sweeper last sent it again
    pm:{JOB}:sent_at            hash: chunk id -> when the sweeper last sent it
    pm:{JOB}:batches            hash: Message Batch id -> JSON of what it holds and its last known state
                                (written the moment the provider names it; `status` and `cancel` read it)
    pm:{JOB}:batch_rows:{CHUNK} hash: row -> "INTENT|ATTEMPT": the batch (by the intent it was made of)
                                that holds the row's attempt, so a run after a kill polls that batch
                                instead of sending the row again ("BATCH_ID|ATTEMPT" before intents)
    pm:{JOB}:batch_intents      hash: intent id -> JSON of a batch about to be created (its time and size,
                                written before the create) and, once known, the batch made of it
    pm:batch:{BATCH_ID}         the job that recorded the batch (a day's expiry): a lost create is never
                                matched to another job's batch
    pm:{JOB}:fallback           hash: "failing_since:LINK" -> when a model of the job's fallback chain
                                (0: its own) last began failing with no success since (epoch seconds)
    pm:{JOB}:outage             hash: since, answered: when the job's requests began failing to connect
                                with no answer since, and when an answer last came (epoch seconds)
    pm:{JOB}:probe:{LINK}       a fleet-wide turn, with an expiry, to try a model the fleet passed over
    pm:{JOB}:latency            hash: latency bucket (jobs/state/pace.py EDGES_MS) -> answered rows in it
    pm:{JOB}:ttft               hash: as latency, the time to first token of answered rows that measured one
    pm:{JOB}:pace               hash: "SLOT|rows", "SLOT|output_tokens" -> rows committed and their
                                output tokens in each 10-second slot (SLOT: epoch seconds // 10), and
                                the requests sent under the limiter; older slots rolled up into
                                "START+WIDTH|..." (10 minutes after an hour, an hour after a day);
                                first, last: the job's first row's start and last row's end; rolled:
                                when the slots were last rolled up
    pm:names                    hash: a name the Python API gave a job -> JSON of its job id and folder
                                (kept for good, as a name outlives its job's keys; gone with the job)
    pm:fair:{QUEUE}             sorted set: the queue's jobs with chunks waiting, by their pass (stride
                                scheduling: the lowest runs next; jobs/state/fair.py)
    pm:fair:{QUEUE}:served      the queue's virtual time: the pass last served (a job joins there)
    pm:limit:{SCOPE}            hash: the fleet's rate-limit buckets for one account and model, with
                                the limits learned from the provider's headers (the LIMIT_* fields)
"""

from __future__ import annotations

import string
from dataclasses import dataclass

JOBS_INDEX = "pm:jobs"
NAMES_KEY = "pm:names"

# Fields of pm:{JOB}:meta.
META_STATE = "state"
META_ERROR = "error"
META_ROWS_PRODUCED = "rows_produced"
META_PRODUCED = "produced"
META_CREATED_AT = "created_at"
META_FINISHED_AT = "finished_at"
META_INPUT_SHA256 = "input_sha256"
META_BUDGET_MICRO = "budget_micro"
META_LIMIT_SCOPE = "limit_scope"
META_PRIORITY = "priority"  # the job's weight in its queue's fair shares (default 1)
META_FAIR_PASS = "fair_pass"  # its pass when it last left its queue's fair set (it comes back no earlier)
META_ENGINE = "engine"  # the local engine's start, as its worker tells it: what it is doing, since when

# Fields of pm:{JOB}:budget (micro-USD).
BUDGET_SPENT = "spent"  # paid for answers so far
BUDGET_HELD = "held"  # held for the requests in flight

# Fields of pm:{JOB}:counters: rows by status.
COUNTER_OK, COUNTER_FAILED = "ok", "failed"

# Fields of the ledgers (pm:{JOB}:ledger, paid_twice, retried, partial): "MODEL|NAME", NAME one of
# these or a Usage field.
LEDGER_REQUESTS = "requests"
LEDGER_FAILED_ATTEMPTS = "failed_attempts"

# Fields of pm:{JOB}:outage (epoch seconds).
OUTAGE_SINCE, OUTAGE_ANSWERED = "since", "answered"

# Fields of pm:{JOB}:pace besides its slots' "SLOT|name".
PACE_FIRST = "first"  # the job's first row's start (epoch s)
PACE_LAST = "last"  # its last row's end
PACE_ROLLED = "rolled"  # when its slots were last rolled up
PACE_RPM = "rpm"  # a slot's requests-per-minute limit in force (kept as the highest, not added)

# The per-chunk keys' kinds: pm:{JOB}:KIND:{CHUNK} (a Lua script builds them from the job's prefix).
CHUNK_LEASE, CHUNK_RESULTS, CHUNK_HANDED = "lease", "results", "handed"

# Fields of pm:limit:{SCOPE}, written by the limiter's Lua script (jobs/state/limits.py). The budgets
# are r (requests), i (input tokens) and o (output tokens) per minute.
LIMIT_BUDGETS = ("r", "i", "o")
LIMIT_EFFECTIVE = "eff_"  # + budget: the limit in force (0 = none)
LIMIT_LEARNED = "lim_"  # + budget: the limit the provider's headers named (0 = not named)
LIMIT_LEVEL = "lvl_"  # + budget: what the bucket holds now
LIMIT_TS = "ts"
LIMIT_SEEN = "seen"  # 1 once any response was seen: stop probing at the unknown pace
LIMIT_PAUSE = "pause"  # epoch ms until which the whole fleet waits (a 429, an open breaker)
LIMIT_OK_WEIGHT, LIMIT_FAIL_WEIGHT, LIMIT_COOL = "okw", "failw", "cool"  # the circuit breaker
LIMIT_GRANTED = "granted"
LIMIT_RATE_LIMITED = "rate_limited"
LIMIT_BREAKER_TRIPS = "breaker_trips"


def lua(script: str, **names: str) -> str:
    """A Lua script with its `$NAME`s spelled from this module's constants (and the job states'),
    each a quoted Lua string: no script spells a key's field or a state by hand."""
    quoted = {name: "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'" for name, value in names.items()}
    return string.Template(script).substitute(quoted)


def batch_owner_key(batch_id: str) -> str:
    return f"pm:batch:{batch_id}"


def fair_key(queue: str) -> str:
    return "pm:fair:{" + queue + "}"


def fair_time_key(queue: str) -> str:
    return fair_key(queue) + ":served"


def limiter_key(scope: str) -> str:
    return "pm:limit:{" + scope + "}"


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job."""

    job_id: str

    @property
    def prefix(self) -> str:
        """Every key of the job starts with this (a Lua script builds per-chunk keys from it)."""
        return "pm:{" + self.job_id + "}:"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def pattern(self) -> str:
        return self.prefix + "*"  # braces are literal in a SCAN pattern

    spec = property(lambda self: self._key("spec"))
    meta = property(lambda self: self._key("meta"))
    chunks = property(lambda self: self._key("chunks"))
    chunk_rows = property(lambda self: self._key("chunk_rows"))
    ready = property(lambda self: self._key("ready"))
    counters = property(lambda self: self._key("counters"))
    ledger = property(lambda self: self._key("ledger"))
    budget = property(lambda self: self._key("budget"))
    chunk_runs = property(lambda self: self._key("chunk_runs"))
    flushed = property(lambda self: self._key("flushed"))
    paid_twice = property(lambda self: self._key("paid_twice"))
    retried = property(lambda self: self._key("retried"))
    partial = property(lambda self: self._key("partial"))
    hosts = property(lambda self: self._key("hosts"))
    sweep = property(lambda self: self._key("sweep"))
    resent = property(lambda self: self._key("resent"))
    sent_at = property(lambda self: self._key("sent_at"))
    batches = property(lambda self: self._key("batches"))
    batch_intents = property(lambda self: self._key("batch_intents"))
    fallback = property(lambda self: self._key("fallback"))
    outage = property(lambda self: self._key("outage"))
    latency = property(lambda self: self._key("latency"))
    ttft = property(lambda self: self._key("ttft"))
    pace = property(lambda self: self._key("pace"))

    def probe(self, link: int) -> str:
        return self._key("probe", str(link))

    def chunk(self, chunk_id: str) -> str:
        return self._key("chunk", chunk_id)

    def results(self, chunk_id: str) -> str:
        return self._key(CHUNK_RESULTS, chunk_id)

    def lease(self, chunk_id: str) -> str:
        return self._key(CHUNK_LEASE, chunk_id)

    def attempts(self, chunk_id: str) -> str:
        return self._key("attempts", chunk_id)

    def handed(self, chunk_id: str) -> str:
        return self._key(CHUNK_HANDED, chunk_id)

    def row_starts(self, chunk_id: str) -> str:
        return self._key("row_starts", chunk_id)

    def batch_rows(self, chunk_id: str) -> str:
        return self._key("batch_rows", chunk_id)
