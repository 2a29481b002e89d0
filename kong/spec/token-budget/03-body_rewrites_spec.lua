-- What the plugin does with the body the service gave back (the lowered output limit,
-- include_usage) and with the stream that include_usage changed (usage_chunk.lua).
local fake = require "fake_kong"

local function answer(extra, body)
  local headers = {
    ["x-authz-handle"] = "h.mac",
    ["x-ratelimit-remaining-tokens"] = "40",
  }
  for k, v in pairs(extra) do headers[k] = v end
  return function() return { status = 200, headers = headers, body = body or "" } end
end

local function load(service)
  local rec = fake.install({ body = '{"model":"gpt-4o","max_tokens":500}' }, service)
  return require("kong.plugins.token-budget.handler"), rec
end

-- The fake upstream's stream with include_usage (tests/support/fake_llm.py's format).
local function chunk(delta, finish)
  return 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    .. '"choices":[{"index":0,"delta":' .. delta .. ',"finish_reason":' .. finish .. '}],'
    .. '"usage":null}\n\n'
end
local USAGE = 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
  .. '"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
local STREAM = chunk('{"content":"hi"}', "null") .. chunk('{"content":" yo"}', "null")
  .. chunk("{}", '"stop"') .. USAGE .. "data: [DONE]\n\n"
local CLIENT = (chunk('{"content":"hi"}', "null") .. chunk('{"content":" yo"}', "null")
  .. chunk("{}", '"stop"')):gsub(',"usage":null', "") .. "data: [DONE]\n\n"

-- Runs body_filter over pieces of the stream; what the client got.
local function pass(handler, conf, pieces)
  local out = {}
  for i, piece in ipairs(pieces) do
    ngx.arg[1], ngx.arg[2] = piece, i == #pieces
    handler:body_filter(conf)
    out[#out + 1] = ngx.arg[1]
  end
  return table.concat(out)
end

describe("token-budget body rewrites", function()
  local conf

  before_each(function()
    conf = fake.config()
  end)

  it("asks the service for the body to send", function()
    local handler, rec = load(answer({ ["x-authz-request-body"] = "unchanged" }))
    handler:access(conf)
    assert.equals("true", rec.calls[1].params.headers["x-authz-rewrite-body"])
    assert.is_nil(rec.upstream_body)
    assert.is_nil(rec.exit)
  end)

  it("sends upstream the body the service rewrote, and the cap to the client", function()
    local rewritten = '{"model":"gpt-4o","max_tokens":40}'
    local handler, rec = load(answer({ ["x-authz-request-body"] = "rewritten",
                                       ["x-authz-max-tokens"] = "40" }, rewritten))
    handler:access(conf)
    assert.is_nil(rec.exit)
    assert.equals(rewritten, rec.upstream_body)
    assert.is_nil(rec.upstream_set["x-authz-request-body"])
    assert.is_nil(rec.upstream_set["x-authz-max-tokens"])
    rec.status = 200
    handler:header_filter(conf)
    assert.equals("40", rec.response_set["x-authz-max-tokens"])
    assert.is_nil(rec.response_set["x-authz-request-body"])
  end)

  it("never sends a capped request upstream when the service did not rewrite it", function()
    local handler, rec = load(answer({ ["x-authz-max-tokens"] = "40" }))
    handler:access(conf)
    assert.equals(429, rec.exit.status)
    assert.equals("40", rec.exit.headers["x-authz-max-tokens"])
    assert.equals("insufficient_quota", require("cjson").decode(rec.exit.body).error.code)
    -- settled as a request the upstream never answered: released
    handler:header_filter(conf)
    ngx.arg[1], ngx.arg[2] = rec.exit.body, true
    handler:body_filter(conf)
    handler:log(conf)
    fake.run_timers(rec)
    local settle = rec.calls[2].params
    assert.equals("499", settle.headers["x-authz-upstream-status"])
    assert.equals("false", settle.headers["x-authz-complete"])
    assert.equals("", settle.body)
  end)

  it("refuses a capped request whose body cannot be replaced", function()
    local service = answer({ ["x-authz-request-body"] = "rewritten",
                             ["x-authz-max-tokens"] = "40" }, "{}")
    local handler, rec = load(service)
    rec.set_body_error = "body too large"
    handler:access(conf)
    assert.equals(429, rec.exit.status)
    assert.truthy(rec.logs[1].msg:find("body too large", 1, true))
  end)

  it("takes the usage chunk out for the client, keeps it for the settlement", function()
    local handler, rec = load(answer({ ["x-authz-request-body"] = "rewritten",
                                       ["x-authz-usage-added"] = "true" }, "{}"))
    handler:access(conf)
    rec.status = 200
    rec.response_headers = { ["content-type"] = "text/event-stream; charset=utf-8" }
    handler:header_filter(conf)
    assert.equals("content-length", rec.response_cleared)
    local pieces = {}
    for i = 1, #STREAM, 7 do pieces[#pieces + 1] = STREAM:sub(i, i + 6) end
    assert.equals(CLIENT, pass(handler, conf, pieces))
    handler:log(conf)
    fake.run_timers(rec)
    assert.equals(STREAM, rec.calls[2].params.body)
  end)

  it("leaves the stream alone when the client asked for usage itself", function()
    local handler, rec = load(answer({ ["x-authz-request-body"] = "unchanged" }))
    handler:access(conf)
    rec.status = 200
    rec.response_headers = { ["content-type"] = "text/event-stream" }
    handler:header_filter(conf)
    assert.is_nil(rec.response_cleared)
    assert.equals(STREAM, pass(handler, conf, { STREAM:sub(1, 50), STREAM:sub(51), "" }))
  end)

  it("leaves a JSON answer and an error alone", function()
    for _, case in ipairs({ { 200, "application/json" }, { 400, "text/event-stream" } }) do
      local handler, rec = load(answer({ ["x-authz-request-body"] = "rewritten",
                                         ["x-authz-usage-added"] = "true" }, "{}"))
      handler:access(conf)
      rec.status = case[1]
      rec.response_headers = { ["content-type"] = case[2] }
      handler:header_filter(conf)
      assert.equals(STREAM, pass(handler, conf, { STREAM }))
    end
  end)
end)

describe("usage_chunk", function()
  local usage_chunk = require "kong.plugins.token-budget.usage_chunk"

  local function run(pieces)
    local r = usage_chunk.new()
    local out = {}
    for _, piece in ipairs(pieces) do out[#out + 1] = r:feed(piece, false) end
    out[#out + 1] = r:feed("", true)
    return table.concat(out)
  end

  it("gives the stream without include_usage, split at every byte", function()
    for _, stream in ipairs({ STREAM, (STREAM:gsub("\n", "\r\n")), (STREAM:gsub("\n", "\r")) }) do
      local want = run({ stream })
      assert.equals(#CLIENT, #(want:gsub("\r\n", "\n"):gsub("\r", "\n")))
      local bytes = {}
      for i = 1, #stream do bytes[i] = stream:sub(i, i) end
      assert.equals(want, run(bytes))
      for cut = 1, #stream - 1 do
        assert.equals(want, run({ stream:sub(1, cut), stream:sub(cut + 1) }))
      end
    end
  end)

  it("holds back only an unfinished event", function()
    local r = usage_chunk.new()
    assert.equals("", r:feed('data: {"choices":[{"delta":{}}],', false))
    assert.equals("", r:feed('"usage":null}\n', false))
    assert.equals('data: {"choices":[{"delta":{}}]}\n\n', r:feed("\ndata: [DO", false))
    assert.equals("data: [DONE]\n\n", r:feed("NE]\n\n", true))
  end)

  it("passes what it cannot read unchanged", function()
    for _, event in ipairs({
      "data: [DONE]\n\n", ": usage comment\n\n", 'data: {"a":{"usage":null}}\n\n',
      'data: {"c":"x\\"usage\\":null,\\"y"}\n\n', 'data: {"usage":null,"usage":null}\n\n',
      'data: {"choices":[],"usage":{"total_tokens":3}\n\n',
    }) do
      assert.equals(event, run({ event }))
    end
  end)

  it("gives up on an event too big to hold, and passes the rest", function()
    local r = usage_chunk.new()
    local big = "data: " .. string.rep("x", usage_chunk.MAX_EVENT_BYTES + 1)
    assert.equals(big, r:feed(big, false))
    local tail = '\n\ndata: {"a":1,"usage":null}\n\n'
    assert.equals(tail, r:feed(tail, false))
  end)

  it("applies to 2xx identity SSE only", function()
    assert.is_true(usage_chunk.applies(200, "Text/Event-Stream ; charset=utf-8", nil))
    assert.is_true(usage_chunk.applies(200, "text/event-stream", "identity"))
    assert.is_false(usage_chunk.applies(200, "text/event-stream", "gzip"))
    assert.is_false(usage_chunk.applies(429, "text/event-stream", nil))
    assert.is_false(usage_chunk.applies(200, "application/json", nil))
    assert.is_false(usage_chunk.applies(200, nil, nil))
  end)
end)
