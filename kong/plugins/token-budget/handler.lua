-- token-budget: a Kong plugin that asks the authz service before a request goes to an
-- LLM upstream, and settles what the answer really cost once it is over.
--
-- access         Check over HTTP/1.1 (/check/<path>): 200 lets the request through with
--                the upstream headers the service chose; anything else is the answer the
--                client gets (the OpenAI-style 429 the SDKs understand). The reservation
--                handle stays in kong.ctx.plugin: it is never sent upstream.
-- header_filter  the x-ratelimit-* headers of the check, and the upstream's status.
-- body_filter    a copy of each chunk as it passes (never modified, never held back, so
--                SSE streams stay streams), up to max_settle_body.
-- log            the settlement goes to Kong's queue (cosockets are refused in log), or
--                to a zero-delay timer on Kong versions without kong.tools.queue.
local check = require "kong.plugins.token-budget.check"
local settle = require "kong.plugins.token-budget.settle"

local kong = kong
local ngx = ngx
local concat = table.concat

local TokenBudget = {
  -- After jwt (1450), key-auth (1250), acl (950) and rate-limiting (910): the caller is
  -- known; before response-ratelimiting (900) and ai-proxy (770): nothing is spent yet.
  PRIORITY = 905,
  VERSION = "0.1.0",
}

-- Fail closed: with the service down nothing can be reserved, so nothing is spent.
local UNAVAILABLE = '{"error":{"message":"The token budget service is unavailable; '
  .. 'try again later.","type":"server_error","param":null,'
  .. '"code":"budget_service_unavailable"}}'

local function unavailable(conf, err)
  if conf.fail_open then
    kong.log.warn("token budget service unreachable, letting the request through ",
                  "unbudgeted (fail_open): ", err)
    return
  end
  kong.log.err("token budget service unreachable, refusing the request: ", err)
  return kong.response.exit(503, UNAVAILABLE, {
    ["content-type"] = "application/json",
    ["retry-after"] = "1",
  })
end

function TokenBudget:access(conf)
  local ctx = kong.ctx.plugin
  -- Headers named like ours come from the client: they are not true, drop them.
  for name in pairs(kong.request.get_headers()) do
    if check.is_ours(name) then
      kong.service.request.clear_header(name)
    end
  end

  local res, err = check.call(conf)
  if not res then
    return unavailable(conf, err)
  end
  if res.status ~= 200 then
    return kong.response.exit(res.status, res.body, check.denial_headers(res.headers))
  end

  local answer = check.split_allow(res.headers)
  for name, value in pairs(answer.upstream) do
    kong.service.request.set_header(name, value)
  end
  ctx.client_headers = answer.client
  if answer.handle then
    ctx.handle = answer.handle
    ctx.chunks, ctx.size = {}, 0
    -- The copy we settle from must be readable: ask the upstream for plain bytes, as
    -- the shipped Envoy route does (accept-encoding: identity).
    kong.service.request.set_header("accept-encoding", "identity")
  end
end

function TokenBudget:header_filter(conf)
  local ctx = kong.ctx.plugin
  local client = ctx.client_headers
  if client then
    for name, value in pairs(client) do
      kong.response.set_header(name, value)
    end
  end
  if ctx.handle then
    ctx.status = kong.response.get_status()
    ctx.content_type = kong.response.get_header("content-type")
    ctx.content_encoding = kong.response.get_header("content-encoding")
  end
end

function TokenBudget:body_filter(conf)
  local ctx = kong.ctx.plugin
  if not ctx.handle then
    return
  end
  -- Read ngx.arg, never assign it: the chunk goes on to the client as it came.
  local chunk, eof = ngx.arg[1], ngx.arg[2]
  if chunk and chunk ~= "" and not ctx.truncated then
    local room = conf.max_settle_body - ctx.size
    if #chunk > room then
      chunk = chunk:sub(1, room)
      ctx.truncated = true
    end
    local chunks = ctx.chunks
    chunks[#chunks + 1] = chunk
    ctx.size = ctx.size + #chunk
  end
  if eof then
    ctx.complete = true
  end
end

function TokenBudget:log(conf)
  local ctx = kong.ctx.plugin
  if not ctx.handle then
    return
  end
  -- No last chunk (ngx.arg[2]) means the client went away or the stream was cut:
  -- the service charges such a response by its abort rule, never zero.
  local ok, err = settle.enqueue(conf, {
    handle = ctx.handle,
    status = ctx.status or kong.response.get_status(),
    content_type = ctx.content_type,
    content_encoding = ctx.content_encoding,
    complete = ctx.complete == true,
    truncated = ctx.truncated == true,
    body = concat(ctx.chunks),
  })
  if not ok then
    kong.log.err("could not queue the token settlement: ", err)
  end
end

return TokenBudget
