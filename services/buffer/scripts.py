"""Lua scripts that make every buffer operation atomic with its counter.

Why Lua and not MULTI/EXEC: each operation must decide on server-side state
(is this group id new? is there room? did XACK really remove the entry?) and
update the counters in the same step, so that a crash of either side can never
leave a counter that disagrees with the stream. Redis runs a script without
interleaving other commands, and the AOF records its effects as one unit.

Counters live in the hash ``<stream>:stats``; see ``trajectory_buffer`` for
their definitions.
"""

from __future__ import annotations

# KEYS: stream, stats, seen (hash gid -> entry id), seen_t (zset gid -> time), tick
# ARGV: group, gid, policy_version, payload, max_depth, now, dedupe_cutoff
# Returns {"ok", id} | {"dup", first_id} | {"full", depth}
# The tick stream (one tiny entry) is what an idle reader blocks on: waiting on
# the stream itself would send the reader the whole new entry (~170 KB for a
# realistic group) just to wake it, and READ sends that entry again.
PUSH = """
local prev = redis.call('HGET', KEYS[3], ARGV[2])
if prev then
  redis.call('HINCRBY', KEYS[2], 'duplicates', 1)
  return {'dup', prev}
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])[1]
local depth = redis.call('XLEN', KEYS[1]) - pending
if depth >= tonumber(ARGV[5]) then
  return {'full', tostring(depth)}
end
local id = redis.call('XADD', KEYS[1], '*', 'gid', ARGV[2], 'pv', ARGV[3], 'd', ARGV[4])
redis.call('HSET', KEYS[3], ARGV[2], id)
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[7], 'LIMIT', 0, 64)
if #old > 0 then
  redis.call('ZREM', KEYS[4], unpack(old))
  redis.call('HDEL', KEYS[3], unpack(old))
end
redis.call('HINCRBY', KEYS[2], 'produced', 1)
redis.call('XADD', KEYS[5], 'MAXLEN', '1', '*', 'id', id)
return {'ok', id}
"""

# KEYS: stream, stats, tick
# ARGV: group, consumer, count, min_idle_ms (-1: no reclaim), claim_cursor, own_from ('' : skip)
# Returns {again_entries, fresh_entries, claim_cursor, own_next, drained_at}
#   again: entries delivered before (own pending list after a restart, or reclaimed
#          from a consumer idle longer than min_idle); fresh: first deliveries.
#   drained_at: when this read returned fewer than count entries, the id of the
#          newest tick ('0-0': none yet), else ''. Until a push adds a later tick
#          no new entry arrives, so an XREAD BLOCK on the tick stream from there is
#          the reader's wait (entries reclaimable from an idle consumer need no
#          push: the reader caps that wait).
READ = """
local stream, stats = KEYS[1], KEYS[2]
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local min_idle, cursor, own_from = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local again = {}
local own_next = ''
if own_from ~= '' then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, own_from)
  if r then again = r[1][2] end
  if #again == count then own_next = again[#again][1] end
end
if #again < count and min_idle >= 0 then
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, cursor, 'COUNT', count - #again)
  cursor = r[1]
  for _, e in ipairs(r[2]) do table.insert(again, e) end
end
local fresh = {}
if #again < count then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #again, 'STREAMS', stream, '>')
  if r then fresh = r[1][2] end
end
if #fresh > 0 then redis.call('HINCRBY', stats, 'consumed', #fresh) end
if #again > 0 then redis.call('HINCRBY', stats, 'redelivered', #again) end
local drained = ''
if #again + #fresh < count then
  local t = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  drained = t[1] and t[1][1] or '0-0'
end
return {again, fresh, cursor, own_next, drained}
"""

# KEYS: stream, stats ; ARGV: group, counter ('acked' | 'dropped_stale'), ids...
# Only entries that XACK really removed from the pending list are counted and
# deleted, so a retried or duplicated ack never counts twice.
SETTLE = """
local n = 0
for i = 3, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], n) end
return n
"""

# KEYS: stream, stats, dead, seen ; ARGV: group, consumer, id, reason
# Copies the entry's fields (if it still exists) to the dead-letter stream with
# the reason, then acks and deletes it; counted once. The counter is 'dead' when
# push produced this entry (its gid maps to this id in the seen hash), else
# 'dead_foreign' (written to the stream by something else), so that
# produced == acked + dead + dropped_stale holds even when garbage is injected.
DEAD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) ~= 1 then return 0 end
local fields = {'dead_id', ARGV[3], 'dead_reason', ARGV[4], 'dead_consumer', ARGV[2]}
local counter = 'dead_foreign'
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #e == 1 and e[1][2] then
  local f = e[1][2]
  for i = 1, #f - 1, 2 do
    if f[i] == 'gid' and redis.call('HGET', KEYS[4], f[i + 1]) == ARGV[3] then counter = 'dead' end
  end
  for _, v in ipairs(f) do table.insert(fields, v) end
end
redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[2], counter, 1)
return 1
"""

# KEYS: stream ; ARGV: group, consumer, ids...
# Resets the idle time of entries this consumer still owns (so that nobody
# reclaims work in progress); returns the ids it no longer owns.
TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
