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

-- What a window opens with (authz.ledger.base.opening): the last window's overdraft
-- past its nominal amount as debt (burst payback), its unused part as a credit up to
-- `rollover` (negative used).
local function opening(carry, rollover)
  return math.max(0, carry) - math.min(rollover, math.max(0, -carry))
end

-- A change of used + reserved on a counter another one inherited (field f: that
-- counter's key) counts there too, as MemoryLedger._mirror does: a request held before
-- a policy edit settles on the counter it was held on, and the inheritor follows.
local function mirror(key, delta)
  for _ = 1, 8 do
    if delta == 0 then
      return
    end
    local f = redis.call('HGET', key, 'f')
    if not f or redis.call('EXISTS', f) == 0 then
      return
    end
    redis.call('HINCRBY', f, 'u', delta)
    key = f
  end
end

-- Open a new counter (key absent) as MemoryLedger does: burst payback and rollover from
-- the last window (`carry`, "" = none), then, after a policy edit (a rename, another
-- timezone), what the budget's old counter for this window (`inherit`) spent and holds
-- (holds as spent until they settle: see mirror). Leased units are not taken: what a
-- replica admits from a lease counts when its flush writes it (mirrored then).
-- Given the counter's TTL at once: a refused reserve may leave the key it opened.
local function open_counter(base, key, carry, nominal, rollover, inherit, ttl)
  if (carry == '' and inherit == '') or redis.call('EXISTS', key) == 1 then
    return
  end
  local used = 0
  if carry ~= '' then
    local prev = redis.call('HGET', base .. 'c:' .. carry, 'u')
    if prev then
      used = opening(num(prev) - nominal, rollover)
    end
  end
  if inherit ~= '' and redis.call('EXISTS', base .. 'c:' .. inherit) == 1 then
    local old = redis.call('HMGET', base .. 'c:' .. inherit, 'u', 'r')
    used = used + num(old[1]) + num(old[2])
    redis.call('HSET', base .. 'c:' .. inherit, 'f', key)
  end
  if used ~= 0 then
    redis.call('HSET', key, 'u', used)
    redis.call('PEXPIRE', key, ttl)
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
    mirror(key, ch - rec.q[j])
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
    mirror(base .. 'c:' .. k, delta[j])
  end
  rollup(base, rec, dtok, delta, 0, now, hour_ms, day_ms)
  rec.s = 1
  return 2
end
