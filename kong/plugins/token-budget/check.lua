-- The check: the client's request as Envoy's ext_authz HTTP service protocol sends it
-- (path_prefix /check, the client's headers, the body if wanted), and the answer read
-- back into what goes upstream, what goes to the client and what stays with us.
local client = require "kong.plugins.token-budget.client"

local kong = kong
local ngx = ngx
local io_open = io.open
local lower = string.lower
local find = string.find
local type = type
local tonumber = tonumber

local _M = {}

-- Hop-by-hop or framing headers: ours to set on our own request, not the client's.
local NOT_FORWARDED = {
  connection = true, ["keep-alive"] = true, ["proxy-connection"] = true, te = true,
  trailer = true, ["transfer-encoding"] = true, upgrade = true, ["content-length"] = true,
  host = true, expect = true,
  -- Envoy sets this when it cut the body; a client must not be able to claim it.
  ["x-envoy-auth-partial-body"] = true,
}

-- Answer headers of an allow that are for the client's response, not the upstream.
local TO_CLIENT = {
  ["x-authz-budget-warning"] = true, ["x-authz-max-tokens"] = true,
}

-- Answer headers that describe the service's own HTTP response, not the decision.
local FRAMING = {
  connection = true, ["keep-alive"] = true, ["transfer-encoding"] = true,
  ["content-length"] = true, date = true, server = true,
}

local HANDLE = "x-authz-handle"
-- Answer headers for us alone (authz/httpcheck/rewrite.py): what to do with the body.
local REQUEST_BODY = "x-authz-request-body"
local USAGE_ADDED = "x-authz-usage-added"
local MAX_TOKENS = "x-authz-max-tokens"

function _M.is_ours(name)
  return find(lower(name), "x-authz-", 1, true) == 1
end

local function is_ratelimit(name)
  return find(name, "x-ratelimit-", 1, true) == 1
end

-- The path the upstream will see: Kong's router has already stripped or rewritten the
-- route's path into $upstream_uri, and the service reads the API from that path.
local function upstream_path()
  local path = ngx.var.upstream_uri
  if not path or path == "" then
    path = kong.request.get_path()
  end
  local query = kong.request.get_raw_query()
  if query and query ~= "" then
    path = path .. "?" .. query
  end
  return path
end

local function read_file_head(path, limit)
  local f, err = io_open(path, "rb")
  if not f then
    return nil, err
  end
  local data = f:read(limit) or ""
  f:close()
  return data
end

-- The body, at most max_body_size bytes of it; the second value says it was cut (the
-- service then treats it as Envoy's allow_partial_message does).
function _M.request_body(conf)
  if not conf.send_body then
    return nil, false
  end
  local limit = conf.max_body_size
  -- Kong >= 3.8 reads a body nginx spilled to disk up to the size given; older
  -- versions return nil for it, and we read the file's head ourselves.
  local body = kong.request.get_raw_body(limit)
  if not body then
    local file = ngx.req.get_body_file()
    if not file then
      return nil, false
    end
    local err
    body, err = read_file_head(file, limit + 1)
    if not body then
      kong.log.warn("could not read the spilled request body: ", err)
      return nil, false
    end
  end
  if #body > limit then
    return body:sub(1, limit), true
  end
  return body, false
end

function _M.request_headers(partial)
  local out = {}
  for name, value in pairs(kong.request.get_headers()) do
    if not NOT_FORWARDED[lower(name)] then
      out[name] = value
    end
  end
  if partial then
    out["x-envoy-auth-partial-body"] = "true"
  end
  -- Without ext_proc, the service hands us the body to send upstream: the output
  -- limit it admitted the request with, and include_usage on OpenAI streams.
  out["x-authz-rewrite-body"] = "true"
  return out
end

-- Returns the service's answer ({status, headers, body}), or nil and an error when
-- there is no answer (refused, timed out, broken): that is the fail mode's business.
function _M.call(conf)
  local body, partial = _M.request_body(conf)
  return client.request(conf, kong.request.get_method(), "/check" .. upstream_path(),
                        _M.request_headers(partial), body)
end

local function single(value)
  if type(value) == "table" then
    return table.concat(value, ", ")
  end
  return value
end

-- A denial: the client gets the service's headers as they are, minus framing.
function _M.denial_headers(headers)
  local out = {}
  for name, value in pairs(headers) do
    local key = lower(name)
    if not FRAMING[key] and key ~= HANDLE then
      out[key] = single(value)
    end
  end
  return out
end

-- An allow: x-authz-handle and what to do with the body stay with us; x-ratelimit-*
-- and the budget notes go to the client; the other x-authz-* headers go upstream; the
-- rest is the service's own.
--   answer.body       "rewritten" (the answer's body is the request body to send),
--                     "unchanged", or nil (a service that did not say)
--   answer.usage_added the service asked for include_usage: take its chunk out again
--   answer.cap        the output limit the request was admitted with (a number), or nil
function _M.split_allow(headers)
  local answer = { upstream = {}, client = {}, handle = nil }
  for name, value in pairs(headers) do
    local key = lower(name)
    value = single(value)
    if key == HANDLE then
      answer.handle = value
    elseif key == REQUEST_BODY then
      answer.body = value
    elseif key == USAGE_ADDED then
      answer.usage_added = value == "true"
    elseif is_ratelimit(key) or TO_CLIENT[key] then
      if key == MAX_TOKENS then
        answer.cap = tonumber(value)
      end
      answer.client[key] = value
    elseif _M.is_ours(key) then
      answer.upstream[key] = value
    end
  end
  return answer
end

return _M
