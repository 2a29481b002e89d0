-- The response copy (body_filter) and the settlement (log): what is sent to /settle,
-- through kong.tools.queue or, without it, a timer, and what is retried.
local fake = require "fake_kong"

local function allow()
  return { status = 200, headers = { ["x-authz-handle"] = "h.mac" }, body = "" }
end

-- An allowed request up to its response headers; `answers` is what /settle replies.
local function through_headers(conf, answers)
  local n = 0
  local rec = fake.install({}, function(method, uri, params)
    if uri:find("/check/", 1, true) then
      return allow()
    end
    n = n + 1
    local answer = answers and answers[n] or { status = 204, headers = {}, body = "" }
    if answer.err then
      return nil, answer.err
    end
    return answer
  end)
  local handler = require "kong.plugins.token-budget.handler"
  handler:access(conf)
  rec.status = 200
  rec.response_headers = { ["content-type"] = "text/event-stream" }
  handler:header_filter(conf)
  return handler, rec
end

local function feed(handler, conf, chunk, eof)
  ngx.arg[1], ngx.arg[2] = chunk, eof
  handler:body_filter(conf)
  return ngx.arg[1]
end

local function settle_calls(rec)
  local out = {}
  for _, call in ipairs(rec.calls) do
    if call.uri:find("/settle", 1, true) then out[#out + 1] = call end
  end
  return out
end

describe("token-budget settlement", function()
  local conf

  before_each(function()
    conf = fake.config()
  end)

  after_each(function()
    require("kong.plugins.token-budget.settle")._set_queue(nil)
  end)

  it("copies each chunk without changing it and settles the whole answer", function()
    local handler, rec = through_headers(conf)
    assert.equals("data: a\n\n", feed(handler, conf, "data: a\n\n", false))
    assert.equals("data: [DONE]\n\n", feed(handler, conf, "data: [DONE]\n\n", false))
    feed(handler, conf, "", true)
    handler:log(conf)
    assert.equals(1, #rec.timers)
    assert.equals(0, rec.timers[1].delay)
    fake.run_timers(rec)
    local calls = settle_calls(rec)
    assert.equals(1, #calls)
    local p = calls[1].params
    assert.equals("http://127.0.0.1:9193/settle", calls[1].uri)
    assert.equals("POST", p.method)
    assert.equals("data: a\n\ndata: [DONE]\n\n", p.body)
    assert.same({
      ["content-type"] = "application/octet-stream",
      ["x-authz-handle"] = "h.mac",
      ["x-authz-upstream-status"] = "200",
      ["x-authz-upstream-content-type"] = "text/event-stream",
      ["x-authz-complete"] = "true",
    }, p.headers)
  end)

  it("says the answer was not complete when the last chunk never came", function()
    local handler, rec = through_headers(conf)
    feed(handler, conf, "data: a\n\n", false)
    handler:log(conf)
    fake.run_timers(rec)
    local p = settle_calls(rec)[1].params
    assert.equals("false", p.headers["x-authz-complete"])
    assert.equals("data: a\n\n", p.body)
  end)

  it("keeps at most max_settle_body bytes and marks the copy truncated", function()
    conf = fake.config({ max_settle_body = 1024 })
    local handler, rec = through_headers(conf)
    local big = string.rep("z", 1000)
    assert.equals(big, feed(handler, conf, big, false))
    assert.equals(big, feed(handler, conf, big, false)) -- the client still gets it all
    assert.equals(big, feed(handler, conf, big, true))
    handler:log(conf)
    fake.run_timers(rec)
    local p = settle_calls(rec)[1].params
    assert.equals(1024, #p.body)
    assert.equals("true", p.headers["x-authz-truncated"])
    assert.equals("true", p.headers["x-authz-complete"])
  end)

  it("retries a failed settlement from the timer, with growing pauses", function()
    local handler, rec = through_headers(conf, {
      { err = "connection refused" },
      { status = 503, headers = {}, body = "busy" },
      { status = 204, headers = {}, body = "" },
    })
    feed(handler, conf, "{}", true)
    handler:log(conf)
    local delays = {}
    while #rec.timers > 0 do
      delays[#delays + 1] = rec.timers[1].delay
      fake.run_timers({ timers = { table.remove(rec.timers, 1) } })
    end
    assert.same({ 0, 0.1, 0.2 }, delays)
    assert.equals(3, #settle_calls(rec))
  end)

  it("does not retry a settlement the service refused", function()
    local handler, rec = through_headers(conf, { { status = 403, headers = {}, body = "mac" } })
    feed(handler, conf, "{}", true)
    handler:log(conf)
    fake.run_timers(rec)
    assert.equals(1, #settle_calls(rec))
    assert.equals("err", rec.logs[#rec.logs].level)
  end)

  it("gives up after TIMER_ATTEMPTS", function()
    local down = {}
    for i = 1, 10 do down[i] = { err = "refused" } end
    local handler, rec = through_headers(conf, down)
    feed(handler, conf, "{}", true)
    handler:log(conf)
    fake.run_timers(rec)
    assert.equals(require("kong.plugins.token-budget.settle").TIMER_ATTEMPTS,
                  #settle_calls(rec))
    assert.truthy(rec.logs[#rec.logs].msg:find("lost after", 1, true))
  end)

  it("hands the settlement to kong.tools.queue when Kong has it", function()
    conf = fake.config({ queue = { max_batch_size = 1 } })
    local handler, rec = through_headers(conf)
    local queued = {}
    require("kong.plugins.token-budget.settle")._set_queue({
      get_plugin_params = function(name, c, default_name)
        return { name = default_name, plugin = name, conf = c.queue }
      end,
      enqueue = function(params, fn, c, entry)
        queued[#queued + 1] = { params = params, fn = fn, conf = c, entry = entry }
        return true
      end,
    })
    feed(handler, conf, '{"usage":{}}', true)
    handler:log(conf)
    assert.equals(0, #rec.timers)
    assert.equals(1, #queued)
    assert.equals("token-budget:plugin-1", queued[1].params.name)
    assert.equals("h.mac", queued[1].entry.handle)
    assert.is_true(queued[1].entry.complete)
    -- the queue's handler sends the batch; true = done
    assert.is_true(queued[1].fn(queued[1].conf, { queued[1].entry }))
    assert.equals('{"usage":{}}', settle_calls(rec)[1].params.body)
  end)

  it("tells the queue to retry when the service is down", function()
    fake.install({}, function() return nil, "refused" end)
    local settle = require "kong.plugins.token-budget.settle"
    local ok, err = settle.flush(conf, { { handle = "h", status = 200, body = "" } })
    assert.is_false(ok)
    assert.equals("refused", err)
  end)
end)
