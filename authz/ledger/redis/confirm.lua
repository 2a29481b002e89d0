-- confirm.lua: the gateway used a Check's answer (authz/confirm.py): the reservation's
-- hold lives until its full deadline and is charged its expiry tokens if it expires.
-- Until then a hold expires at its short first deadline charged 0 (a Check answer
-- Envoy gave up on before it arrived: the request never reached the model).
--
-- KEYS[1] <base>dl (deadlines ZSET)   KEYS[2] <base>r:<id>
-- ARGV[1] base   ARGV[2] reservation id   ARGV[3] now (s)   ARGV[4] new deadline (s)
-- ARGV[5] ms to keep the record after its deadline   ARGV[6..8] expiry tokens i, c, o
-- ARGV[9] ms each counter must still live (it outlives the reservation)
-- Returns 1 confirmed, 0 unknown, settled or expired.
local base, rid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[2])
if not raw then
  return 0
end
local rec = cmsgpack.unpack(raw)
if rec.s ~= 0 then
  return 0
end
rec.e = counts(ARGV[6], ARGV[7], ARGV[8])
local deadline = tonumber(ARGV[4])
if deadline > rec.d then
  rec.d = deadline
end
redis.call('SET', KEYS[2], cmsgpack.pack(rec), 'PX', ms((rec.d - now) * 1000 + tonumber(ARGV[5])))
redis.call('ZADD', KEYS[1], rec.d, rid)
local keep = tonumber(ARGV[9])
for _, k in ipairs(rec.k) do
  local key = base .. 'c:' .. k
  local left = redis.call('PTTL', key)
  if left >= 0 and left < keep then
    redis.call('PEXPIRE', key, keep)
  end
end
return 1
