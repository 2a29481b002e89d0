-- Append one entry to the audit chain, only if the chain's head is what the writer
-- chained it to. Atomic, so writers in several processes never fork the chain.
--
-- KEYS[1]  the stream of entries            ({<prefix>:audit}:log)
-- KEYS[2]  the head: hash {seq, hash, id}    ({<prefix>:audit}:head)
-- ARGV[1]  the head hash the entry was chained to ("" for the first entry)
-- ARGV[2]  the entry's seq
-- ARGV[3]  the entry (canonical JSON, hash included)
-- ARGV[4]  the entry's hash
--
-- Returns {1, stream id} when appended, or {0, current head hash, current seq} when
-- another writer got there first: the caller re-chains to that head and tries again.
-- Both keys share one hash tag, so this runs on one node of a Redis Cluster.

local head = redis.call('HGET', KEYS[2], 'hash') or ''
if head ~= ARGV[1] then
  return {0, head, redis.call('HGET', KEYS[2], 'seq') or '0'}
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[3])
redis.call('HSET', KEYS[2], 'hash', ARGV[4], 'seq', ARGV[2], 'id', id)
return {1, id}
