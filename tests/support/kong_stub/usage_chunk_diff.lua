-- Runs the plugin's usage_chunk.lua over streams given on stdin, for the differential
-- test against the service's authz/mutate/response.py (tests/unit/test_kong_usage_chunk.py).
-- One stream per line: its chunks in hex, separated by commas (an empty field is an
-- empty chunk); a final empty chunk with eof follows, as nginx's last buffer. Prints
-- one line per stream: the bytes the client gets, in hex.
local usage_chunk = require "kong.plugins.token-budget.usage_chunk"

local function unhex(s)
  return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

for line in io.lines() do
  local remover = usage_chunk.new()
  local out = {}
  for field in (line .. ","):gmatch("([^,]*),") do
    out[#out + 1] = remover:feed(unhex(field), false)
  end
  out[#out + 1] = remover:feed("", true)
  io.write(hex(table.concat(out)), "\n")
end
