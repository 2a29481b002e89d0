-- settle.lua: replace a reservation by its real usage; idempotent by reservation id.
-- The counters are named in the record (same org, same slot), so they are not in KEYS.
--
-- KEYS[1] <base>dl   KEYS[2] <base>r:<id>   KEYS[3] <base>p:<id> (a parked settlement)
-- ARGV[1] base   ARGV[2] reservation id   ARGV[3] now (s)   ARGV[4..6] tokens i, c, o
-- ARGV[7] ms to keep the closed record (repeat settles stay no-ops that long)
-- ARGV[8] settle token: "" = plain; else, if the record is not there yet (a lease
--         replica has not flushed it), park the settlement for that replica's flush
-- ARGV[9] ms to keep a parked settlement   ARGV[10..11] rollup retention ms (hour, day)
-- Returns 1 settled, 2 settled late (expired: its charge corrected), 0 no-op
-- (already settled or unknown), 3 parked (waiting for the owner's flush).
local base, rid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local tok = counts(ARGV[4], ARGV[5], ARGV[6])
local token = ARGV[8]
local raw = redis.call('GET', KEYS[2])
if raw then
  local rec = cmsgpack.unpack(raw)
  if rec.s == 1 then
    if token ~= '' and rec.b == token then
      return 1  -- our parked settlement, applied by the owner's flush
    end
    return 0
  end
  local out = settle_rec(base, rec, tok, now, tonumber(ARGV[10]), tonumber(ARGV[11]))
  -- Settled: only idempotency is left to remember, so keep a small tombstone.
  redis.call('SET', KEYS[2], cmsgpack.pack({s = 1, b = token}), 'PX', ARGV[7])
  redis.call('ZREM', KEYS[1], rid)
  return out
end
if token == '' then
  return 0
end
local parked = redis.call('GET', KEYS[3])
if parked then
  return cmsgpack.unpack(parked)[1] == token and 3 or 0
end
redis.call('SET', KEYS[3], cmsgpack.pack({token, tok[1], tok[2], tok[3]}), 'PX', ARGV[9])
return 3
