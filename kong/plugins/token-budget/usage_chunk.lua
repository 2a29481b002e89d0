-- Takes out of an OpenAI stream what stream_options.include_usage added, when the
-- service (not the client) asked for it: the last chunk ("choices": [] and the usage)
-- and the "usage": null member of every other chunk. Code written against a stream
-- without usage (chunk.choices[0].delta.content) breaks on that last chunk; the client
-- gets the bytes the upstream would have sent it. The settlement is copied from the
-- upstream's bytes before this runs, so it keeps the usage.
--
-- The same rules as the service's ext_proc (authz/mutate/response.py), byte for byte
-- (tests/unit/test_kong_usage_chunk.py feeds both the same streams):
-- - chunks do not line up with SSE events: an unfinished trailing event is held back
--   and sent with the next chunk (a client dispatches nothing before an event's blank
--   line anyway); nothing else is held, so the stream stays a stream;
-- - framing follows the WHATWG EventSource rules: lines end in LF, CRLF or a lone CR, a
--   blank line ends an event, data: lines (with or without the space) join with LF;
-- - whatever is not an OpenAI chunk we can read passes unchanged: comments, [DONE],
--   data that is not a {...} object, a member we cannot tell is the top-level one, a
--   usage-only chunk that does not parse; an event over MAX_EVENT_BYTES gives up and
--   the rest of the stream passes as it came.
local cjson = require "cjson.safe"

local byte, sub, find, gsub = string.byte, string.sub, string.find, string.gsub
local concat = table.concat
local max = math.max
local setmetatable, getmetatable, type, select = setmetatable, getmetatable, type, select

local _M = {}
_M.MAX_EVENT_BYTES = 4 * 1024 * 1024  -- authz/usage/sse.py DEFAULT_MAX_EVENT_BYTES

local CR, LF = 13, 10

-- OpenResty's cjson marks decoded arrays (Kong has it); plain lua-cjson cannot tell an
-- empty [] from {} (then a non-empty table with [1] is an array, an empty one either).
if cjson.decode_array_with_array_mt then
  cjson = cjson.new()
  cjson.decode_array_with_array_mt(true)
end
local ARRAY_MT = cjson.decode_array_with_array_mt and cjson.array_mt

local function is_array(t)
  if ARRAY_MT then
    return getmetatable(t) == ARRAY_MT
  end
  return t[1] ~= nil or next(t) == nil
end

local function is_object(t)
  if ARRAY_MT then
    return getmetatable(t) ~= ARRAY_MT
  end
  return t[1] == nil
end

-- The length of the line end at i (CRLF 2, LF or lone CR 1), 0 if none.
local function line_end(s, i)
  local c = byte(s, i)
  if c == CR then
    return byte(s, i + 1) == LF and 2 or 1
  end
  return c == LF and 1 or 0
end

-- The index of the last byte of each event (its blank line) in buf, from init on.
local function event_ends(buf, init)
  local ends = {}
  if not find(buf, "\r", 1, true) then  -- the usual LF-only stream: plain finds
    local at = find(buf, "\n\n", init, true)
    while at do
      ends[#ends + 1] = at + 1
      at = find(buf, "\n\n", at + 2, true)
    end
    return ends
  end
  local i, n = init, #buf
  while i <= n do
    local a = line_end(buf, i)
    local b = a > 0 and line_end(buf, i + a) or 0
    if b > 0 then
      ends[#ends + 1] = i + a + b - 1
      i = i + a + b
    else
      i = i + 1
    end
  end
  return ends
end

-- The event's lines (with their ends), and for each data line: {line, where its value
-- starts} and the value.
local function data_lines(event)
  local lines, where, values = {}, {}, {}
  local i, n = 1, #event
  while i <= n do
    local j = find(event, "[\r\n]", i) or n + 1
    local le = j <= n and line_end(event, j) or 0
    lines[#lines + 1] = sub(event, i, j + le - 1)
    local text = sub(event, i, j - 1)
    local colon = find(text, ":", 1, true)
    if (colon and sub(text, 1, colon - 1) or text) == "data" then
      local start = colon and colon + 1 or #text + 1
      local value = colon and sub(text, colon + 1) or ""
      if sub(value, 1, 1) == " " then
        start, value = start + 1, sub(value, 2)
      end
      where[#where + 1] = { #lines, start }
      values[#values + 1] = value
    end
    i = j + le
  end
  return lines, where, values
end

local function is_space(c)  -- what Python's bytes.strip() strips
  return c == 32 or (c ~= nil and c >= 9 and c <= 13)
end

-- The index of the last byte before i that is not blank (any, or space/tab only).
local function back(s, i, tabs_only)
  while i >= 1 do
    local c = byte(s, i)
    if not (tabs_only and (c == 32 or c == 9) or not tabs_only and is_space(c)) then
      return i
    end
    i = i - 1
  end
  return 0
end

-- Whether key is followed by what the anchored pattern pat matches, anywhere.
local function has(payload, key, pat)
  local at = find(payload, key, 1, true)
  while at do
    if find(payload, pat, at + #key) then
      return true
    end
    at = find(payload, key, at + #key, true)
  end
  return false
end

local function usage_only(payload)
  local obj = cjson.decode(payload)
  if type(obj) ~= "table" or not is_object(obj) then
    return false
  end
  local choices, usage = obj.choices, obj.usage
  return type(choices) == "table" and is_array(choices) and next(choices) == nil
    and type(usage) == "table" and is_object(usage)
end

-- s without its complete string literals ("..." with backslash escapes), scanned left
-- to right as Python's re.sub does: a quote that never closes is left as it is.
local function strip_strings(s)
  local out, i, from = {}, 1, 1
  while true do
    local q = find(s, '"', from, true)
    if not q then
      break
    end
    local j, n, closed = q + 1, #s, nil
    while j <= n do
      local c = byte(s, j)
      if c == 34 then
        closed = j
        break
      elseif c == 92 then
        if j == n then
          break
        end
        j = j + 2
      else
        j = j + 1
      end
    end
    if closed then
      out[#out + 1] = sub(s, i, q - 1)
      i, from = closed + 1, closed + 1
    else
      from = q + 1
    end
  end
  out[#out + 1] = sub(s, i)
  return concat(out)
end

local function count(s, char)
  return select(2, gsub(s, char, ""))
end

-- Whether the member at s..e is directly inside the outermost object: the depth is
-- counted over the shorter side of it, strings removed.
local function top_level(payload, s, e)
  if #payload - e < s - 1 then
    local tail = sub(payload, e + 1)
    if count(tail, "}") == 1 and not find(tail, "[{%[%]]") then
      return true
    end
    tail = strip_strings(tail)
    return count(tail, "}") + count(tail, "%]") - count(tail, "{") - count(tail, "%[") == 1
  end
  local head = strip_strings(sub(payload, 1, s - 1))
  return count(head, "{") + count(head, "%[") - count(head, "}") - count(head, "%]") == 1
end

-- Where the top-level "usage": null member is (first and last index), with the comma
-- that separates it from a neighbour; nil unless there is exactly one.
local function null_member(payload)
  local fs, fe, found = nil, nil, 0
  local at = find(payload, '"usage"', 1, true)
  while at do
    local _, vend = find(payload, "^%s*:%s*null", at + 7)
    if vend and find(payload, "^%s*[,}]", vend + 1) then
      local before = byte(payload, back(payload, at - 1, false))
      if (before == 123 or before == 44) and top_level(payload, at, vend) then
        found, fs, fe = found + 1, at, vend
      end
    end
    at = find(payload, '"usage"', at + 7, true)
  end
  if found ~= 1 then
    return nil
  end
  local _, after = find(payload, "^[ \t]*,[ \t]*", fe + 1)
  if after then
    return fs, after  -- "usage": null, "next": ...
  end
  local head = back(payload, fs - 1, true)
  if byte(payload, head) == 44 then
    return back(payload, head - 1, true) + 1, fe  -- ..., "usage": null}
  end
  return fs, fe  -- {"usage": null}
end

-- One whole event (with its blank line): itself, without "usage": null, or "" for the
-- usage-only chunk.
local function rewrite(event)
  if not find(event, '"usage"', 1, true) then
    return event
  end
  local lines, where, values
  if sub(event, 1, 5) == "data:" and find(event, "\n", 1, true) == #event - 1
      and not find(event, "\r", 1, true) then
    local start = sub(event, 6, 6) == " " and 7 or 6  -- one data line ending in LF LF
    lines, where, values = { event }, { { 1, start } }, { sub(event, start, #event - 2) }
  else
    lines, where, values = data_lines(event)
  end
  local payload = #values == 1 and values[1] or concat(values, "\n")
  local first = find(payload, "[^ \t\n\r\11\12]")
  if not first or byte(payload, first) ~= 123 or byte(payload, back(payload, #payload)) ~= 125 then
    return event  -- not a JSON object: [DONE], a comment, anything else
  end
  if has(payload, '"choices"', "^%s*:%s*%[%s*%]") and usage_only(payload) then
    return ""  -- the chunk include_usage added
  end
  local s, e = null_member(payload)
  if not s or find(sub(payload, s, e), "\n", 1, true) then
    return event  -- none, not at the top, or across data lines: leave it
  end
  local offset = 0
  for k = 1, #values do
    if s - 1 <= offset + #values[k] then
      local i, start = where[k][1], where[k][2]
      local line = lines[i]
      lines[i] = sub(line, 1, start + s - 2 - offset) .. sub(line, start + e - offset)
      return concat(lines)
    end
    offset = offset + #values[k] + 1
  end
  return event
end

local Remover = {}
Remover.__index = Remover

function _M.new()
  return setmetatable({ held = "", passthrough = false }, Remover)
end

-- The bytes to send the client for chunk (eof: the last one).
function Remover:feed(chunk, eof)
  if self.passthrough then
    return chunk
  end
  local held = self.held
  local buf = held ~= "" and held .. chunk or chunk
  local out, cut, n = {}, 0, #buf
  local ends = event_ends(buf, max(1, #held - 3))
  for k = 1, #ends do
    local last = ends[k]
    -- A CR at the very end may be the first half of a CRLF: wait for the next byte.
    if not eof and last == n and byte(buf, n) == CR then
      break
    end
    out[#out + 1] = rewrite(sub(buf, cut + 1, last))
    cut = last
  end
  local rest = sub(buf, cut + 1)
  if eof or #rest > _M.MAX_EVENT_BYTES then
    self.passthrough = not eof  -- too big to hold: give up, unchanged
    out[#out + 1] = rest
    rest = ""
  end
  self.held = rest
  return concat(out)
end

-- Whether a response with these headers is a stream this rewrites.
function _M.applies(status, content_type, content_encoding)
  if not status or status < 200 or status > 299 or type(content_type) ~= "string" then
    return false
  end
  local media = content_type:match("^[^;]*"):match("^%s*(.-)%s*$")
  if media:lower() ~= "text/event-stream" then
    return false
  end
  local enc = content_encoding and content_encoding:lower():match("^%s*(.-)%s*$") or ""
  return enc == "" or enc == "identity"
end

_M._rewrite = rewrite  -- for the specs

return _M
