-- The settlement: POST /settle with the reservation handle and the upstream's answer as
-- the gateway copied it. The log phase may not open sockets, so the POST is sent later:
-- through kong.tools.queue (Kong >= 3.3: batched, retried with backoff, drained on
-- shutdown) when Kong has it, else from a zero-delay timer with a few retries. The
-- service settles each handle once, so a retried POST never charges twice.
local client = require "kong.plugins.token-budget.client"

local kong = kong
local ngx = ngx
local tostring = tostring
local min = math.min

local has_queue, Queue = pcall(require, "kong.tools.queue")

local _M = {}

-- Timer fallback only: attempts and the longest pause between two of them (seconds).
_M.TIMER_ATTEMPTS = 5
_M.TIMER_MAX_DELAY = 5

-- ok; or nil, the error, and whether sending it again can help.
function _M.send(conf, entry)
  local headers = {
    ["content-type"] = "application/octet-stream",
    ["x-authz-handle"] = entry.handle,
    ["x-authz-upstream-status"] = tostring(entry.status or 0),
    ["x-authz-upstream-content-type"] = entry.content_type or "",
    ["x-authz-complete"] = entry.complete and "true" or "false",
  }
  if entry.truncated then
    headers["x-authz-truncated"] = "true"
  end
  if entry.content_encoding then
    headers["x-authz-upstream-content-encoding"] = entry.content_encoding
  end
  local res, err = client.request(conf, "POST", "/settle", headers, entry.body)
  if not res then
    return nil, err, true
  end
  if res.status == 204 or res.status == 200 then
    return true
  end
  local why = "settle answered " .. res.status .. ": " .. (res.body or "")
  -- 4xx is the service refusing this settlement (bad handle, bad input): final.
  return nil, why, res.status >= 500 or res.status == 429
end

-- kong.tools.queue handler: false makes the queue retry the batch (settling twice is
-- harmless); a refused settlement is logged and dropped.
function _M.flush(conf, entries)
  for i = 1, #entries do
    local ok, err, retry = _M.send(conf, entries[i])
    if not ok then
      if retry then
        return false, err
      end
      kong.log.err("token settlement refused, not retried: ", err)
    end
  end
  return true
end

local timer_send

local function after(attempt, conf, entry)
  local delay = min(0.1 * 2 ^ (attempt - 1), _M.TIMER_MAX_DELAY)
  local ok, err = ngx.timer.at(delay, timer_send, conf, entry, attempt + 1)
  if not ok then
    kong.log.err("token settlement lost, no timer for a retry: ", err)
  end
end

timer_send = function(premature, conf, entry, attempt)
  local ok, err, retry = _M.send(conf, entry)
  if ok then
    return
  end
  if retry and not premature and attempt < _M.TIMER_ATTEMPTS then
    kong.log.warn("token settlement failed (attempt ", attempt, "), retrying: ", err)
    return after(attempt, conf, entry)
  end
  kong.log.err("token settlement lost after ", attempt, " attempt(s): ", err)
end

local function queue_name(conf)
  local plugin = kong.plugin
  local id = plugin and plugin.get_id and plugin.get_id()
  return "token-budget:" .. (id or conf.service_url)
end

function _M.enqueue(conf, entry)
  if has_queue and conf.queue then
    local params = Queue.get_plugin_params("token-budget", conf, queue_name(conf))
    return Queue.enqueue(params, _M.flush, conf, entry)
  end
  return ngx.timer.at(0, timer_send, conf, entry, 1)
end

-- For the specs: pretend Kong has (or lacks) kong.tools.queue.
function _M._set_queue(queue)
  has_queue, Queue = queue ~= nil, queue
end

return _M
