-- reserve.lua: hold a request's units on every limit of its path, or on none.
-- Also the period rollover: each window is its own counter key, created here on first
-- use with the budget's amount and a TTL relative to the window's end (+ a margin so
-- late settlements still find it); the previous window's key simply expires.
--
-- KEYS[1]      <base>dl              deadlines ZSET (the sweeper's queue)
-- KEYS[2]      <base>r:<id>          the reservation record
-- KEYS[3..]    <base>c:<limit key>   one counter per limit, in the caller's order
-- ARGV[1] base   ARGV[2] reservation id   ARGV[3] now (s)   ARGV[4] deadline (s)
-- ARGV[5] ms to keep the record after its deadline   ARGV[6] model label
-- ARGV[7..9] tokens input, cached, output   ARGV[10..12] expiry charge tokens
-- ARGV[13] n limits, then per limit 14 values: limit key, node, amount, counter TTL ms,
--          weights input, cached, output, per-request units, release on settle (0/1),
--          burst/rollover: previous window's limit key ("" = none), nominal amount,
--          rollover cap; the old counter a new one inherits ("" = none); enforce (1/0:
--          0 = audit only, held and counted but never the reason for a refusal)
-- Returns {1, remaining...}, {0, index, requested, remaining} (first limit that cannot
-- take it, in the caller's order) or {-1} (the id is already in use).
local base, rid, now, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1}
end
local tok = counts(ARGV[7], ARGV[8], ARGV[9])
local n = tonumber(ARGV[13])
local rec = {s = 0, k = {}, n = {}, q = {}, w = {}, p = {}, m = ARGV[6], d = deadline,
             e = counts(ARGV[10], ARGV[11], ARGV[12])}
local free = {}
for j = 1, n do
  local o = 13 + (j - 1) * 14
  local amount = tonumber(ARGV[o + 3])
  rec.k[j], rec.n[j] = ARGV[o + 1], ARGV[o + 2]
  rec.w[j] = {tonumber(ARGV[o + 5]), tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]),
              tonumber(ARGV[o + 8]), tonumber(ARGV[o + 9])}
  rec.q[j], rec.p[j] = units(rec.w[j], tok[1], tok[2], tok[3]), 0
  open_counter(base, KEYS[2 + j], ARGV[o + 10], tonumber(ARGV[o + 11]),
               tonumber(ARGV[o + 12]), ARGV[o + 13], ARGV[o + 4])
  local c = redis.call('HMGET', KEYS[2 + j], 'u', 'r', 'l')
  free[j] = amount - num(c[1]) - num(c[2]) - num(c[3])
  if rec.q[j] > free[j] and ARGV[o + 14] == '1' then
    return {0, j, rec.q[j], math.max(0, free[j])}
  end
end
local out = {1}
for j = 1, n do
  local o = 13 + (j - 1) * 14
  redis.call('HSET', KEYS[2 + j], 'a', ARGV[o + 3])  -- a reloaded policy may change it
  redis.call('HINCRBY', KEYS[2 + j], 'r', rec.q[j])
  mirror(KEYS[2 + j], rec.q[j])
  redis.call('PEXPIRE', KEYS[2 + j], ARGV[o + 4])
  out[j + 1] = free[j] - rec.q[j]
end
redis.call('SET', KEYS[2], cmsgpack.pack(rec), 'PX', ms((deadline - now) * 1000 + tonumber(ARGV[5])))
redis.call('ZADD', KEYS[1], deadline, rid)
return out
