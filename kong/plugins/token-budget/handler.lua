-- token-budget: a Kong plugin that asks the authz service before a request goes to an
-- LLM upstream, and settles what the answer really cost once it is over.
--
-- access         Check over HTTP/1.1 (/check/<path>): 200 lets the request through with
--                the upstream headers the service chose and, where the service rewrote
--                it, the body it gave back (the lowered output limit, include_usage on
--                OpenAI streams: ext_proc's rewrites, made by the service); anything else
--                is the answer the client gets (the OpenAI-style 429 the SDKs
--                understand). The reservation handle stays in kong.ctx.plugin: it is
--                never sent upstream.
-- header_filter  the x-ratelimit-* headers of the check, and the upstream's status.
-- body_filter    a copy of each chunk as it passes, up to max_settle_body, for the
--                settlement; the client's chunks pass as they came, except that a
--                stream the service asked usage for loses the usage chunk again
--                (usage_chunk.lua: only an unfinished event is held, so SSE streams
--                stay streams).
-- log            the settlement goes to Kong's queue (cosockets are refused in log), or
--                to a zero-delay timer on Kong versions without kong.tools.queue.
local check = require "kong.plugins.token-budget.check"
local settle = require "kong.plugins.token-budget.settle"
local usage_chunk = require "kong.plugins.token-budget.usage_chunk"

local kong = kong
local ngx = ngx
local concat = table.concat
local tostring = tostring
local pcall = pcall

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

-- A request admitted with a lowered output limit that we cannot send with that limit
-- (docs/http-api.md): refused, never upstream uncapped; the log phase settles it as a
-- request the upstream never answered (499, incomplete), which releases it.
local function uncapped(ctx, answer, why)
  kong.log.err("refusing a request admitted with max tokens ", answer.cap,
               ": its body cannot carry the limit (", why, ")")
  ctx.refused = true
  local body = '{"error":{"message":"This request fits the remaining budget only with '
    .. "its output limited to " .. answer.cap .. " tokens, and its body could not be "
    .. 'rewritten to say so; send it with max_tokens at most ' .. answer.cap .. '.",'
    .. '"type":"insufficient_quota","param":null,"code":"insufficient_quota"}}'
  return kong.response.exit(429, body, {
    ["content-type"] = "application/json",
    ["x-authz-reason"] = "budget_exhausted",
    ["x-authz-max-tokens"] = tostring(answer.cap),
    ["x-should-retry"] = "false",
  })
end

-- The body the service gave back, or the refusal of a limit it cannot carry.
local function apply_body(ctx, answer, body)
  if answer.body == "rewritten" then
    local ok, err = pcall(kong.service.request.set_raw_body, body)
    if not ok then
      if answer.cap then
        return uncapped(ctx, answer, err)
      end
      kong.log.warn("could not replace the request body, sent as it came: ", err)
      return
    end
    ctx.usage_added = answer.usage_added
  elseif answer.cap and answer.body ~= "unchanged" then
    return uncapped(ctx, answer, "the service did not rewrite it")
  end
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
    return apply_body(ctx, answer, res.body)
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
  if ctx.handle and not ctx.refused then
    ctx.status = kong.response.get_status()
    ctx.content_type = kong.response.get_header("content-type")
    ctx.content_encoding = kong.response.get_header("content-encoding")
    if ctx.usage_added
        and usage_chunk.applies(ctx.status, ctx.content_type, ctx.content_encoding) then
      ctx.remover = usage_chunk.new()
      kong.response.clear_header("content-length")  -- the client's bytes are fewer
    end
  end
end

function TokenBudget:body_filter(conf)
  local ctx = kong.ctx.plugin
  if not ctx.handle or ctx.refused then
    return
  end
  -- The copy is the upstream's bytes (the usage chunk included): settled from those.
  local chunk, eof = ngx.arg[1], ngx.arg[2]
  if chunk and chunk ~= "" and not ctx.truncated then
    local copy = chunk
    local room = conf.max_settle_body - ctx.size
    if #copy > room then
      copy = copy:sub(1, room)
      ctx.truncated = true
    end
    local chunks = ctx.chunks
    chunks[#chunks + 1] = copy
    ctx.size = ctx.size + #copy
  end
  -- Assigned only to take out what the service's include_usage added.
  local remover = ctx.remover
  if remover then
    ngx.arg[1] = remover:feed(chunk or "", eof)
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
    -- Refused here: the upstream never saw it (499, incomplete: released).
    status = ctx.refused and 499 or ctx.status or kong.response.get_status(),
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
