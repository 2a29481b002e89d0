-- lib.lua: helpers prepended to every other script by scripts.py. No KEYS/ARGV of its own.
--
-- A reservation record (msgpack map, key <base>r:<id>):
--   s state: 0 open, 1 closed (settled), 2 expired (charged; a late settle may correct it)
--   k limit keys, n nodes, q units held, per limit, and w per limit:
--     {input weight, cached weight, output weight, per-request units, 1 = release on settle}
--   p prepaid per limit: 1 = the units are already in `u` (taken from a reclaimed lease)
--   e expiry charge tokens {i, c, o}; d deadline (s); m model label
--   x units charged and t tokens charged at expiry (for the late-settle correction)
--   b token of the settlement that closed it (a settle waiting for a lease flush)
-- A settled record shrinks to a tombstone {s = 1, b = token}: enough for idempotency.
-- Counter hash fields: a amount, u used, r reserved, l leased (see keys.py).

-- Exactly Limit.units() (authz/ledger/base.py, Weights.units() in authz/policy/model.py):
-- the same operations in the same order on the same doubles, so the same integers.
local function units(w, i, c, o)
  return math.ceil(i * w[1] + c * w[2] + o * w[3] - 1e-9) + w[4]
end

-- Limit.settled_units(): a concurrency cap (release on settle) keeps nothing.
local function settled(w, i, c, o)
  if w[5] == 1 then
    return 0
  end
  return units(w, i, c, o)
end

local function num(v)
  return tonumber(v) or 0
end

-- A token count from ARGV, as authz.usage.bounds.ledger_usage clamps it: within
-- [0, LEDGER_MAX_TOKENS]. The Python side clamps first; this is for whatever reaches a
-- script another way. Past 2**53 a Lua number is no longer an exact integer, and
-- HINCRBY refuses the "1e+18" such a number turns into (the reservation stayed open).
local LEDGER_MAX_TOKENS = 1000000000
local function token_count(v)
  local n = tonumber(v)
  if n == nil or n ~= n or n <= 0 then
    return 0
  end
  return math.min(math.floor(n), LEDGER_MAX_TOKENS)
end

local function counts(i, c, o)
  return {token_count(i), token_count(c), token_count(o)}
end

-- Counters are created by reserve/sync with a TTL; never recreate one without it here.
local function bump(key, field, delta)
  if delta ~= 0 and redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, field, delta)
  end
end

local function ms(x)
  return math.max(1, math.floor(x))
end

-- Burst payback: a burst budget's new window opens with the last window's overdraft
-- (what it used beyond its nominal amount), as MemoryLedger does.
local function open_counter(base, key, carry, nominal)
  if carry ~= '' and redis.call('EXISTS', key) == 0 then
    local prev = num(redis.call('HGET', base .. 'c:' .. carry, 'u'))
    if prev > nominal then
      redis.call('HSET', key, 'u', prev - nominal)
    end
  end
end

-- Hourly and daily usage per node and model. `count` is 1 for a request, 0 for a correction.
local function rollup(base, rec, tok, charged, count, now, hour_ms, day_ms)
  local seen = {}
  for j, node in ipairs(rec.n) do
    if not seen[node] then
      seen[node] = true
      for _, g in ipairs({{'h', 3600, hour_ms}, {'d', 86400, day_ms}}) do
        local start = math.floor(now / g[2]) * g[2]
        local key = base .. 'u:' .. g[1] .. ':' .. string.format('%d', start) .. ':' .. node
        local m = rec.m .. '|'
        if tok[1] ~= 0 then redis.call('HINCRBY', key, m .. 'i', tok[1]) end
        if tok[2] ~= 0 then redis.call('HINCRBY', key, m .. 'c', tok[2]) end
        if tok[3] ~= 0 then redis.call('HINCRBY', key, m .. 'o', tok[3]) end
        if charged[j] ~= 0 then redis.call('HINCRBY', key, m .. 'u', charged[j]) end
        if count ~= 0 then redis.call('HINCRBY', key, m .. 'n', count) end
        redis.call('PEXPIRE', key, ms((start + g[2] - now) * 1000 + g[3]))
      end
    end
  end
end

-- Close an open record with real (or expiry) tokens: drop its holds, charge the units.
local function charge_open(base, rec, tok)
  local charged = {}
  for j, k in ipairs(rec.k) do
    local key = base .. 'c:' .. k
    local ch = settled(rec.w[j], tok[1], tok[2], tok[3])
    charged[j] = ch
    if rec.p[j] == 1 then
      bump(key, 'u', ch - rec.q[j])
    else
      bump(key, 'r', -rec.q[j])
      bump(key, 'u', ch)
    end
  end
  return charged
end

-- A settle: open -> closed (1), expired -> corrected and closed (2). Caller stores rec.
local function settle_rec(base, rec, tok, now, hour_ms, day_ms)
  if rec.s == 0 then
    local charged = charge_open(base, rec, tok)
    rollup(base, rec, tok, charged, 1, now, hour_ms, day_ms)
    rec.s = 1
    return 1
  end
  local delta, dtok = {}, {tok[1] - rec.t[1], tok[2] - rec.t[2], tok[3] - rec.t[3]}
  for j, k in ipairs(rec.k) do
    delta[j] = settled(rec.w[j], tok[1], tok[2], tok[3]) - rec.x[j]
    bump(base .. 'c:' .. k, 'u', delta[j])
  end
  rollup(base, rec, dtok, delta, 0, now, hour_ms, day_ms)
  rec.s = 1
  return 2
end
