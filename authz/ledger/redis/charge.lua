-- charge.lua: add usage that already happened (no reservation, never refused) to every
-- limit, once per charge id: a request admitted while Redis was unreachable, replayed
-- from the journal. Counters are opened like reserve.lua opens them.
--
-- KEYS[1]   <base>ch:<charge id>   marker: this charge was applied (kept like a record)
-- KEYS[2..] <base>c:<limit key>    one counter per limit
-- ARGV[1] base   ARGV[2] ms to remember the charge id   ARGV[3..5] tokens i, c, o
-- ARGV[6] n, then per limit 13 values: limit key, amount, counter TTL ms, weights
--         input, cached, output, per-request units, release on settle (0/1),
--         burst/rollover carry key ("" = none), nominal, rollover cap, inherited
--         counter ("" = none), enforce (unused: a charge is never refused)
-- Returns 1 charged, 0 already charged.
local base = ARGV[1]
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then
  return 0
end
local i, c, o = unpack(counts(ARGV[3], ARGV[4], ARGV[5]))
for j = 1, tonumber(ARGV[6]) do
  local a = 7 + (j - 1) * 13
  local key = KEYS[1 + j]
  local w = {tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]),
             tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])}
  open_counter(base, key, ARGV[a + 8], tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10]),
               ARGV[a + 11], ARGV[a + 2])
  redis.call('HSET', key, 'a', ARGV[a + 1])
  redis.call('HINCRBY', key, 'u', settled(w, i, c, o))
  mirror(key, settled(w, i, c, o))
  redis.call('PEXPIRE', key, ARGV[a + 2])
end
return 1
