-- lease.lua: one replica's sync with one org, in one atomic step (authz/ledger/lease.py).
-- 1. flush: write the reservations the replica admitted locally from its leases since
--    the last sync (open ones become ordinary reservations any replica can settle;
--    ones already settled locally are charged at once); apply a settlement another
--    replica parked for one of them;
-- 2. give back the unused part of leases the replica no longer wants;
-- 3. grant, check by check in the caller's order (the checks this replica queued):
--    each needs, per counter, what its local lease cannot cover; it gets that on
--    every counter or on none, and the first counter without room is named. A lease
--    may then carry an extra slice (a share of what is left, capped) unless the
--    counter is draining, i.e. someone was refused while others held leases: then
--    leases shrink to the checks themselves and holders return what they do not use.
-- A lease this replica held that is gone (reclaimed by the sweeper) is "lost": its units
-- were counted as spent, so the reservations taken from it are written as prepaid.
--
-- KEYS[1] <base>dl   KEYS[2] <base>ls   KEYS[3..2+nc] <base>c:<limit key> (counters)
-- KEYS[3+nc..] per entry: <base>r:<id>, <base>p:<id>
-- ARGV[1] base  ARGV[2] now (s)  ARGV[3] replica id  ARGV[4] epoch for a new lease
-- ARGV[5] lease TTL (s)  ARGV[6] ms to keep a closed record  ARGV[7] lease fraction
-- ARGV[8] lease max units  ARGV[9] drain hold (s)  ARGV[10..11] rollup retention ms
-- ARGV[12] nc, then per counter 13 values: limit key, amount, counter TTL ms, burst/
--          rollover carry key ("" = none), nominal, rollover cap, inherited counter
--          ("" = none), enforce (0: audit only, never refused), epoch the replica
--          knows ("" = none),
--          give back, spare (unused, given back too if the counter is draining),
--          extra minimum (0: no extra slice), idle (the replica's unused lease now: the
--          counter keeps every replica's as S:<replica> and their sum as si, so a
--          refused replica knows whether waiting for give-backs can help)
-- then ne, then per entry 11 values: id, deadline, model, expiry tokens i c o,
--          settled (0/1), actual tokens i c o, when it was settled (s, for the
--          rollups); then nl and per limit 8 values:
--          counter index (1-based), units, node, weights input, cached, output,
--          per-request units, release on settle (0/1)
-- then nr, then per check: nk, then nk pairs (counter index, units needed)
-- Returns {per check {1 granted | 0 refused, index of the refusing limit in the check
-- (1-based), free there, the replica's own unused lease there, others' unused leases
-- there}, per counter {lease, epoch, free, draining, lost}}.
local base, now, rep, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local lease_ttl, keep = tonumber(ARGV[5]), tonumber(ARGV[6])
local fraction, lmax, hold = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local hour_ms, day_ms = tonumber(ARGV[10]), tonumber(ARGV[11])
local nc = tonumber(ARGV[12])
local C = {}
local a = 13
for j = 1, nc do
  local key = KEYS[2 + j]
  local v = redis.call('HMGET', key, 'u', 'r', 'l', 'L:' .. rep, 'E:' .. rep, 'd', 'S:' .. rep, 'si',
                      'f')
  C[j] = {key = key, k = ARGV[a], amount = tonumber(ARGV[a + 1]), ttl = ARGV[a + 2],
          new = redis.call('EXISTS', key) == 0, carry = ARGV[a + 3],
          nominal = tonumber(ARGV[a + 4]), rollover = tonumber(ARGV[a + 5]),
          inherit = ARGV[a + 6], enforce = ARGV[a + 7] == '1', known = ARGV[a + 8],
          give = tonumber(ARGV[a + 9]), spare = tonumber(ARGV[a + 10]),
          min = tonumber(ARGV[a + 11]), idle = tonumber(ARGV[a + 12]),
          u = num(v[1]), r = num(v[2]), l = num(v[3]), L = num(v[4]), E = v[5] or '',
          d = tonumber(v[6]), S = num(v[7]), si = num(v[8]), f = v[9] or nil}
  C[j].b0 = C[j].u + C[j].r  -- what a change mirrored to an inheritor is measured from
  C[j].lost = C[j].known ~= '' and v[4] == false
  a = a + 13
end

local ne = tonumber(ARGV[a])
a = a + 1
for i = 1, ne do
  local rkey, pkey = KEYS[2 + nc + 2 * i - 1], KEYS[2 + nc + 2 * i]
  local rid, deadline = ARGV[a], tonumber(ARGV[a + 1])
  local rec = {s = 0, k = {}, n = {}, q = {}, w = {}, p = {}, m = ARGV[a + 2], d = deadline,
               e = counts(ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])}
  local is_settled = ARGV[a + 6] == '1'
  local tok = counts(ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
  local at, nl, idx = tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11]), {}
  a = a + 12
  for j = 1, nl do
    local c = C[tonumber(ARGV[a])]
    idx[j] = c
    rec.k[j], rec.q[j], rec.n[j] = c.k, tonumber(ARGV[a + 1]), ARGV[a + 2]
    rec.w[j] = {tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]),
                tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])}
    rec.p[j] = c.lost and 1 or 0
    a = a + 8
  end
  -- Already there: an earlier sync applied it but its answer never reached the replica.
  if redis.call('EXISTS', rkey) == 0 then
    local parked = redis.call('GET', pkey)
    if parked then
      parked = cmsgpack.unpack(parked)
      is_settled, tok, rec.b, at = true, {parked[2], parked[3], parked[4]}, parked[1], now
      redis.call('DEL', pkey)
    end
    for j, c in ipairs(idx) do
      if not c.lost then  -- the units move from the lease to a reservation
        local moved = math.min(c.L, rec.q[j])
        c.L, c.l, c.r = c.L - moved, c.l - moved, c.r + rec.q[j]
      end
    end
    if is_settled then
      local charged = {}
      for j, c in ipairs(idx) do
        charged[j] = settled(rec.w[j], tok[1], tok[2], tok[3])
        if rec.p[j] == 1 then
          c.u = c.u + charged[j] - rec.q[j]
        else
          c.r, c.u = c.r - rec.q[j], c.u + charged[j]
        end
      end
      rollup(base, rec, tok, charged, 1, at, hour_ms, day_ms)
      redis.call('SET', rkey, cmsgpack.pack({s = 1, b = rec.b or ''}), 'PX', keep)
    else
      redis.call('SET', rkey, cmsgpack.pack(rec), 'PX', ms((deadline - now) * 1000 + keep))
      redis.call('ZADD', KEYS[1], deadline, rid)
    end
  end
end

for _, c in ipairs(C) do  -- give back
  local back = c.give
  if c.d ~= nil and c.d > now - hold then back = math.max(back, c.spare) end
  back = math.min(back, c.L)
  c.L, c.l, c.idle = c.L - back, c.l - back, math.max(0, c.idle - back)
end

-- A window opened by this sync opens as open_counter (lib.lua) opens it, after the
-- flush above: a settlement of the previous window in this same batch counts in its
-- overdraft, and an inherited counter's flushed admissions in what is inherited (its
-- mirror then measures from here on).
local byk = {}
for _, c in ipairs(C) do byk[c.k] = c end
for _, c in ipairs(C) do
  if c.new and c.carry ~= '' then
    local p = byk[c.carry]
    local prev = p and not p.new and p.u or redis.call('HGET', base .. 'c:' .. c.carry, 'u')
    if prev then
      c.u = c.u + opening(num(prev) - c.nominal, c.rollover)
    end
  end
  if c.new and c.inherit ~= '' then
    local o, okey = byk[c.inherit], base .. 'c:' .. c.inherit
    if o ~= nil and not o.new then  -- among these counters: as the flush left it
      c.u = c.u + o.u + o.r
      o.f, o.b0 = c.key, o.u + o.r
      redis.call('HSET', okey, 'f', c.key)
    elseif o == nil and redis.call('EXISTS', okey) == 1 then
      local v = redis.call('HMGET', okey, 'u', 'r')
      c.u = c.u + num(v[1]) + num(v[2])
      redis.call('HSET', okey, 'f', c.key)
    end
  end
end
local function free_of(c)
  return c.amount - c.u - c.r - c.l
end
local nr = tonumber(ARGV[a])
a = a + 1
local results = {}
for i = 1, nr do
  local nk, idx, need, fail = tonumber(ARGV[a]), {}, {}, 0
  a = a + 1
  for j = 1, nk do
    idx[j], need[j] = C[tonumber(ARGV[a])], tonumber(ARGV[a + 1])
    a = a + 2
  end
  for j = 1, nk do
    local c = idx[j]
    if c.enforce and math.max(0, need[j] - c.idle) > free_of(c) then
      fail = j
      break
    end
  end
  if fail == 0 then
    for j = 1, nk do
      local c = idx[j]
      local deficit = math.max(0, need[j] - c.idle)
      c.L, c.l, c.idle = c.L + deficit, c.l + deficit, c.idle + deficit - need[j]
    end
    results[i] = {1, 0, 0, 0, 0}
  else
    local c = idx[fail]
    results[i] = {0, fail, math.max(0, free_of(c)), c.idle, c.si - c.S}
    if c.l - c.L > 0 then  -- others hold leases: make them give back what they do not use
      c.d = now
      redis.call('HSET', c.key, 'd', tostring(now))
    end
  end
end
for _, c in ipairs(C) do
  c.draining = c.d ~= nil and c.d > now - hold
  if c.min > 0 and not c.draining then
    local extra = math.min(lmax, math.floor(fraction * free_of(c)))
    if extra >= c.min then
      c.L, c.l, c.idle = c.L + extra, c.l + extra, c.idle + extra
    end
  end
end

-- Mirrors (lib.lua): each counter's change of used + reserved in this sync counts on its
-- inheritor too; an inheritor among these counters is changed here, before it is
-- written below (a HINCRBY now would be overwritten by that write).
local bykey, moved = {}, {}
for _, c in ipairs(C) do bykey[c.key] = c end
for j, c in ipairs(C) do moved[j] = c.u + c.r - c.b0 end
for j, c in ipairs(C) do
  local delta, f, hops = moved[j], c.f, 0
  while delta ~= 0 and f and hops < 8 do
    local t = bykey[f]
    if t == nil then
      if redis.call('EXISTS', f) == 1 then
        redis.call('HINCRBY', f, 'u', delta)
        mirror(f, delta)
      end
      break
    end
    t.u, f, hops = t.u + delta, t.f, hops + 1
  end
end

local states = {}
for j, c in ipairs(C) do
  local member = c.k .. '\n' .. rep
  redis.call('HSET', c.key, 'a', c.amount)
  redis.call('PEXPIRE', c.key, c.ttl)
  local idle = math.min(c.idle, c.L)
  c.si = math.max(0, c.si - c.S + idle)
  if c.L > 0 then
    if c.E == '' or c.lost then c.E = epoch end
    redis.call('HSET', c.key, 'u', c.u, 'r', c.r, 'l', c.l, 'si', c.si,
               'L:' .. rep, c.L, 'E:' .. rep, c.E, 'S:' .. rep, idle)
    redis.call('ZADD', KEYS[2], now + lease_ttl, member)
  else
    c.E = ''
    redis.call('HSET', c.key, 'u', c.u, 'r', c.r, 'l', c.l, 'si', c.si)
    redis.call('HDEL', c.key, 'L:' .. rep, 'E:' .. rep, 'S:' .. rep)
    redis.call('ZREM', KEYS[2], member)
  end
  states[j] = {c.L, c.E, free_of(c), c.draining and 1 or 0, c.lost and 1 or 0}
end
return {results, states}
