"""The chunk store's Lua scripts (jobs/state/chunks.py runs them): each an atomic step on a job's
chunks, its field names and key kinds spelled from jobs/state/keys.py."""

from __future__ import annotations

from promptmill.jobs.state.keys import (
    CHUNK_HANDED,
    CHUNK_LEASE,
    CHUNK_RESULTS,
    COUNTER_FAILED,
    LEDGER_FAILED_ATTEMPTS,
    LEDGER_REQUESTS,
    lua,
)

_NAMES = dict(
    REQUESTS=LEDGER_REQUESTS, FAILED_ATTEMPTS=LEDGER_FAILED_ATTEMPTS, FAILED=COUNTER_FAILED, LEASE=CHUNK_LEASE,
    HANDED=CHUNK_HANDED, RESULTS=CHUNK_RESULTS,
)

# Commit one outcome: result, done mark and usage in one step, and only once per row.
# A chunk already flushed to its shard is complete: nothing more is written for it.
# An answer for a row already done (its chunk ran twice at once) was paid for all the same: its usage
# goes to the paid_twice ledger, so the ledger and paid_twice add up to the provider's bill. The very
# answer committed already (the same request id: one batch's result read by two runs) was billed
# once: it is counted nowhere again. Once the chunk is flushed, the row's outcome is in its shard, not
# here: an answer with a request id returns -2, and the caller compares it with the shard's.
COMMIT = lua("""
if redis.call('EXISTS', KEYS[7]) == 0 then return -1 end  -- the job was deleted: nothing of it is written again
local model = ARGV[4]
local function account(ledger)
  if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', ledger, model .. '|' .. $REQUESTS, ARGV[5]) end
  for i = 8, #ARGV, 2 do
    if tonumber(ARGV[i + 1]) ~= 0 then redis.call('HINCRBY', ledger, model .. '|' .. ARGV[i], ARGV[i + 1]) end
  end
end
if redis.call('SISMEMBER', KEYS[4], ARGV[6]) == 1 then
  if ARGV[7] ~= '' then return -2 end
  account(KEYS[5])
  return 0
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  if ARGV[7] == '' or cjson.decode(redis.call('HGET', KEYS[1], ARGV[1])).request_id ~= ARGV[7] then
    account(KEYS[5])
  end
  return 0
end
redis.call('HDEL', KEYS[6], ARGV[1])  -- a row handed to another queue's model: its mark goes with its outcome
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
account(KEYS[3])
return 1
""", **_NAMES)

# Hand a row on to another queue's model, unless it is done (a second run of its chunk answered it)
# or its job was deleted.
HAND_OFF = lua("""
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""", **_NAMES)

# Count a row's failed attempt, and what the provider billed for it (ARGV[3]: its ledger model, then
# usage pairs), unless its job was deleted.
FAILED_ATTEMPT = lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|' .. $FAILED_ATTEMPTS, 1)
if ARGV[3] then
  for _, ledger in ipairs({KEYS[3], KEYS[4]}) do
    redis.call('HINCRBY', ledger, ARGV[3] .. '|' .. $REQUESTS, 1)
    for i = 4, #ARGV, 2 do
      if tonumber(ARGV[i + 1]) ~= 0 then redis.call('HINCRBY', ledger, ARGV[3] .. '|' .. ARGV[i], ARGV[i + 1]) end
    end
  end
end
return count
""", **_NAMES)

# Add a chunk once: a producer that runs again over the same rows adds nothing twice.
ADD_CHUNK = lua("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX') == false then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[4], ARGV[3])
return 1
""", **_NAMES)

# A chunk's outcomes are safe in its shard: mark it flushed and free everything it held, the runs of
# its rows handed to the chain's other models ("CHUNK@LINK", ARGV[2..]) included.
MARK_FLUSHED = lua("""
if redis.call('EXISTS', KEYS[11]) == 0 then return 0 end  -- the job was deleted
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[9], KEYS[10])
for i = 6, 8 do redis.call('HDEL', KEYS[i], unpack(ARGV)) end
return 1
""", **_NAMES)

# Find the job's lost chunks in one step. A chunk is lost when it is incomplete, unflushed and
# unleased, and either (orphaned) a worker started it and died (its run count moved past the count
# it was last sent again at), or (stranded, only when the queue is empty) no message for it exists:
# it died in a dead worker's reserved or delayed messages, a resent copy among them, or (picked,
# whatever the queue's depth) its turn was taken and nothing started it within the lease time since:
# the worker that picked it died before it sent it by name, whose message runs ahead of every other. A chunk that
# waits its turn in the fair shares (KEYS[7], jobs/state/fair.py) has no message of its own: it is not
# stranded, and the sweeper replaces lost "pick the next chunk" messages instead. The guard is
# the loss itself (a run count, a time), never the chunk: a chunk lost twice is sent twice.
# Rows handed to another queue's model are that run's ("CHUNK@LINK"), lost the same way on its queue.
# ARGV: now (s), how long a chunk sent must wait before it counts as stranded (s), queue empty (0/1),
# the job's key prefix, the links of the chain whose queue is empty (JSON list), the lease time (s).
SWEEP = lua("""
local now, wait, queue_empty, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
local empty_links = {}
for _, link in ipairs(cjson.decode(ARGV[5])) do empty_links[link] = true end
local lost = {}
local lease = tonumber(ARGV[6])
local function look(run, empty, picked)
  if redis.call('EXISTS', prefix .. $LEASE .. ':' .. run) == 1 then return end
  local runs = redis.call('HGET', KEYS[4], run)
  local sent_at = tonumber(redis.call('HGET', KEYS[6], run) or '0')
  if runs and runs ~= redis.call('HGET', KEYS[5], run) then
    redis.call('HSET', KEYS[5], run, runs)
    redis.call('HSET', KEYS[6], run, now)
    table.insert(lost, run)
  elseif picked and sent_at > 0 and now - sent_at >= lease and not redis.call('ZSCORE', KEYS[7], run) then
    redis.call('HSET', KEYS[6], run, now)
    table.insert(lost, run)
  elseif empty and now - sent_at >= wait and not redis.call('ZSCORE', KEYS[7], run) then
    redis.call('HSET', KEYS[6], run, now)
    table.insert(lost, run)
  end
end
for _, chunk in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('SISMEMBER', KEYS[3], chunk) == 0 then
    local rows = tonumber(redis.call('HGET', KEYS[2], chunk) or '0')
    local handed = redis.call('HVALS', prefix .. $HANDED .. ':' .. chunk)
    if redis.call('HLEN', prefix .. $RESULTS .. ':' .. chunk) + #handed < rows then look(chunk, queue_empty, true) end
    local links = {}
    for _, raw in ipairs(handed) do links[cjson.decode(raw).link] = true end
    for link, _ in pairs(links) do look(chunk .. '@' .. link, empty_links[link] == true, false) end
  end
end
return lost
""", **_NAMES)

# `resume --retry-failed`: put a chunk's failed rows back to pending. ARGV[1] is JSON: the chunk id,
# its payload (the requests to send), the outcomes to keep (a flushed chunk's come back from its
# shard) and the rows to retry with their attempts so far and the usage their failed answers cost,
# which stays paid (the `retried` ledger) while the rows' new outcomes are committed.
REQUEUE_FAILED = lua("""
local a = cjson.decode(ARGV[1])
if redis.call('SREM', KEYS[3], a.chunk) == 1 then
  for row, outcome in pairs(a.keep) do redis.call('HSET', KEYS[1], row, outcome) end
end
for _, r in ipairs(a.retry) do
  redis.call('HDEL', KEYS[1], r.row)
  redis.call('HDEL', KEYS[7], r.row)  -- its next attempt goes in a new batch, whatever its count
  redis.call('HSET', KEYS[5], r.row, r.attempts)
  if r.answered then redis.call('HINCRBY', KEYS[6], r.model .. '|' .. $REQUESTS, 1) end
  for name, value in pairs(r.usage) do
    if value ~= 0 then redis.call('HINCRBY', KEYS[6], r.model .. '|' .. name, value) end
  end
end
redis.call('HINCRBY', KEYS[2], $FAILED, -#a.retry)
redis.call('SET', KEYS[4], a.payload)
return #a.retry
""", **_NAMES)
