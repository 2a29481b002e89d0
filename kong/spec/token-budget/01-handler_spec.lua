-- The plugin's phases against a stubbed Kong (fake_kong.lua): what goes to the service,
-- upstream and to the client, and what is settled.
local fake = require "fake_kong"

local ALLOW_HEADERS = {
  ["X-Authz-Handle"] = "h.mac",
  ["x-authz-subject"] = "org:acme/user:alice",
  ["x-ratelimit-limit-tokens"] = "1000",
  ["x-ratelimit-remaining-tokens"] = "900",
  ["x-authz-budget-warning"] = "user-daily at 90%",
  ["content-type"] = "text/plain",
  ["content-length"] = "0",
  ["date"] = "Tue, 01 Dec 2026 00:00:00 GMT",
}

local function allow()
  return { status = 200, headers = ALLOW_HEADERS, body = "" }
end

local function load(req, service)
  local rec = fake.install(req, service or allow)
  return require("kong.plugins.token-budget.handler"), rec
end

describe("token-budget handler", function()
  local conf

  before_each(function()
    conf = fake.config()
  end)

  it("runs after authentication and before the AI plugins, versioned as its rock", function()
    local handler = load()
    assert.equals(905, handler.PRIORITY)
    assert.is_true(handler.PRIORITY < 950 and handler.PRIORITY > 770)
    local rockspec = io.popen("ls kong-plugin-token-budget-*.rockspec"):read("*l")
    assert.equals("kong-plugin-token-budget-" .. handler.VERSION .. "-1.rockspec", rockspec)
  end)

  it("checks the upstream path with the client's headers and body", function()
    local handler, rec = load({
      method = "POST", path = "/openai/v1/chat/completions", query = "a=1",
      upstream_uri = "/v1/chat/completions",
      headers = { Authorization = "Bearer t", ["Content-Length"] = "9", Host = "gw",
                  ["x-envoy-auth-partial-body"] = "true" },
      body = '{"a": 1}',
    })
    handler:access(conf)
    assert.equals(1, #rec.calls)
    local call = rec.calls[1]
    assert.equals("http://127.0.0.1:9193/check/v1/chat/completions?a=1", call.uri)
    assert.equals("POST", call.params.method)
    assert.equals('{"a": 1}', call.params.body)
    assert.equals("Bearer t", call.params.headers.authorization)
    assert.is_nil(call.params.headers["content-length"])
    assert.is_nil(call.params.headers.host)
    -- only we may say the body was cut
    assert.is_nil(call.params.headers["x-envoy-auth-partial-body"])
    assert.same({ 1000, 2000, 2000 }, rec.timeouts)
  end)

  it("falls back to the client path when the router left no upstream_uri", function()
    local handler, rec = load({ path = "/v1/embeddings" })
    handler:access(conf)
    assert.equals("http://127.0.0.1:9193/check/v1/embeddings", rec.calls[1].uri)
  end)

  it("cuts a body over max_body_size and says so", function()
    local handler, rec = load({ body = string.rep("x", 2000) })
    handler:access(fake.config({ max_body_size = 1024 }))
    local params = rec.calls[1].params
    assert.equals(1024, #params.body)
    assert.equals("true", params.headers["x-envoy-auth-partial-body"])
  end)

  it("reads the head of a body nginx spilled to disk", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(string.rep("y", 3000))
    f:close()
    local handler, rec = load({ body_file = path })
    handler:access(fake.config({ max_body_size = 2048 }))
    os.remove(path)
    local params = rec.calls[1].params
    assert.equals(string.rep("y", 2048), params.body)
    assert.equals("true", params.headers["x-envoy-auth-partial-body"])
  end)

  it("sends no body when send_body is off", function()
    local handler, rec = load({ body = "{}" })
    handler:access(fake.config({ send_body = false }))
    assert.is_nil(rec.calls[1].params.body)
  end)

  it("on allow: adds the service's upstream headers, keeps the handle to itself", function()
    local handler, rec = load({ headers = { ["x-authz-handle"] = "forged",
                                            ["X-Authz-Subject"] = "org:evil" } })
    handler:access(conf)
    assert.is_nil(rec.exit)
    assert.is_true(rec.upstream_cleared["x-authz-handle"])
    assert.is_true(rec.upstream_cleared["x-authz-subject"])
    assert.equals("org:acme/user:alice", rec.upstream_set["x-authz-subject"])
    assert.equals("identity", rec.upstream_set["accept-encoding"])
    assert.is_nil(rec.upstream_set["x-authz-handle"])
    assert.is_nil(rec.upstream_set["x-ratelimit-limit-tokens"])
    assert.is_nil(rec.upstream_set["content-type"])
    assert.equals("h.mac", kong.ctx.plugin.handle)
  end)

  it("on allow: header_filter gives the client the x-ratelimit-* headers", function()
    local handler, rec = load()
    handler:access(conf)
    rec.status = 200
    rec.response_headers = { ["content-type"] = "text/event-stream" }
    handler:header_filter(conf)
    assert.same({
      ["x-ratelimit-limit-tokens"] = "1000",
      ["x-ratelimit-remaining-tokens"] = "900",
      ["x-authz-budget-warning"] = "user-daily at 90%",
    }, rec.response_set)
  end)

  it("on deny: the client gets the service's status, body and headers", function()
    local body = '{"error":{"type":"insufficient_quota"}}'
    local handler, rec = load(nil, function()
      return { status = 429, body = body, headers = {
        ["Content-Type"] = "application/json", ["retry-after"] = "60",
        ["x-ratelimit-remaining-tokens"] = "0", ["content-length"] = tostring(#body),
        connection = "keep-alive", ["x-should-retry"] = "false",
        ["set-cookie"] = { "a=1", "b=2" },
      } }
    end)
    handler:access(conf)
    assert.equals(429, rec.exit.status)
    assert.equals(body, rec.exit.body)
    assert.same({
      ["content-type"] = "application/json", ["retry-after"] = "60",
      ["x-ratelimit-remaining-tokens"] = "0", ["x-should-retry"] = "false",
      ["set-cookie"] = "a=1, b=2",
    }, rec.exit.headers)
    -- no settlement for what never went upstream
    handler:header_filter(conf)
    ngx.arg[1], ngx.arg[2] = body, true
    handler:body_filter(conf)
    handler:log(conf)
    assert.equals(0, #rec.timers)
    assert.same({}, rec.response_set)
  end)

  it("fails closed with an OpenAI-style 503 when the service does not answer", function()
    local handler, rec = load(nil, function() return nil, "connection refused" end)
    handler:access(conf)
    assert.equals(503, rec.exit.status)
    local json = require "cjson"
    local body = json.decode(rec.exit.body)
    assert.equals("budget_service_unavailable", body.error.code)
    assert.equals("application/json", rec.exit.headers["content-type"])
    assert.equals("err", rec.logs[1].level)
    assert.truthy(rec.logs[1].msg:find("connection refused", 1, true))
  end)

  it("fails open when told to: the request goes on, unbudgeted and unsettled", function()
    local handler, rec = load(nil, function() return nil, "timeout" end)
    handler:access(fake.config({ fail_open = true }))
    assert.is_nil(rec.exit)
    assert.equals("warn", rec.logs[1].level)
    handler:header_filter(conf)
    handler:log(conf)
    assert.equals(0, #rec.timers)
  end)

  it("fails closed on a client certificate it cannot parse, before calling", function()
    local handler, rec = load()
    package.loaded["ngx.ssl"].parse_pem_cert = function() return nil, "bad PEM" end
    handler:access(fake.config({ client_cert = "junk", client_key = "junk",
                                 service_url = "https://authz:9193" }))
    assert.equals(0, #rec.calls)
    assert.equals(503, rec.exit.status)
  end)

  it("presents the client certificate to the service", function()
    local handler, rec = load()
    handler:access(fake.config({ client_cert = "CERT", client_key = "KEY",
                                 service_url = "https://authz:9193/",
                                 ssl_server_name = "authz.internal" }))
    local params = rec.calls[1].params
    assert.equals("https://authz:9193/check/v1/chat/completions", rec.calls[1].uri)
    assert.same({ cert = "CERT" }, params.ssl_client_cert)
    assert.same({ key = "KEY" }, params.ssl_client_priv_key)
    assert.is_true(params.ssl_verify)
    assert.equals("authz.internal", params.ssl_server_name)
  end)
end)
