-- A write to the allocation set and its version, atomically: a replica polling the
-- version never sees it move without the change (or the change without the move).
-- KEYS[1]  the allocations hash (id -> JSON)
-- KEYS[2]  the version counter
-- ARGV[1]  "set" | "del" | "purge"
-- ARGV[2]  set/del: the allocation id; purge: drop what expired before this epoch time
-- ARGV[3]  set: the allocation's JSON
-- Returns 1/0 (set, del: whether something changed) or the count purged.
local op = ARGV[1]
local changed = 0
if op == "set" then
  redis.call("HSET", KEYS[1], ARGV[2], ARGV[3])
  changed = 1
elseif op == "del" then
  changed = redis.call("HDEL", KEYS[1], ARGV[2])
elseif op == "purge" then
  local before = tonumber(ARGV[2])
  local all = redis.call("HGETALL", KEYS[1])
  for i = 1, #all, 2 do
    local ok, item = pcall(cjson.decode, all[i + 1])
    if ok and type(item.expires_at) == "number" and item.expires_at < before then
      redis.call("HDEL", KEYS[1], all[i])
      changed = changed + 1
    end
  end
end
if changed > 0 then
  redis.call("INCR", KEYS[2])
end
return changed
