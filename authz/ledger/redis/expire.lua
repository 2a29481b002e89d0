-- expire.lua: the sweeper, for one org. Any replica may run it; each due reservation is
-- charged once because the record's state changes in the same atomic step.
-- 1. reservations past their deadline are charged their expiry tokens (record kept as
--    "expired" so a late settle can still correct the charge);
-- 2. leases not renewed by their replica before their expiry (a dead replica) are
--    counted as spent: what it admitted from them is unknown, and a hard budget must
--    not be overspent.
--
-- KEYS[1] <base>dl (deadlines ZSET)   KEYS[2] <base>ls (lease expiries ZSET)
-- ARGV[1] base   ARGV[2] now (s)   ARGV[3] at most this many reservations per call
-- ARGV[4] ms to keep an expired record   ARGV[5..6] rollup retention ms (hour, day)
-- Returns {expired count, 1 if more are due (call again) else 0, leases reclaimed}.
local base, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local count = 0
for _, rid in ipairs(due) do
  local rkey = base .. 'r:' .. rid
  local raw = redis.call('GET', rkey)
  if raw then
    local rec = cmsgpack.unpack(raw)
    if rec.s == 0 then
      rec.x = charge_open(base, rec, rec.e)
      rec.t = rec.e
      rollup(base, rec, rec.e, rec.x, 1, now, tonumber(ARGV[5]), tonumber(ARGV[6]))
      rec.s = 2
      redis.call('SET', rkey, cmsgpack.pack(rec), 'PX', ARGV[4])
      count = count + 1
    end
  end
  redis.call('ZREM', KEYS[1], rid)
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, member in ipairs(dead) do
  local k, replica = string.match(member, '^(.*)\n([^\n]*)$')
  local key = base .. 'c:' .. k
  local v = redis.call('HMGET', key, 'L:' .. replica, 'S:' .. replica)
  local held, idle = num(v[1]), num(v[2])
  if held > 0 then
    bump(key, 'u', held)
    bump(key, 'l', -held)
    mirror(key, held)  -- counted as spent now: an inheritor counts it too
  end
  bump(key, 'si', -idle)
  redis.call('HDEL', key, 'L:' .. replica, 'E:' .. replica, 'S:' .. replica)
  redis.call('ZREM', KEYS[2], member)
end
return {count, #due == limit and 1 or 0, #dead}
