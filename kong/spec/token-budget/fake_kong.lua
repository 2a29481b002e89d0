-- Stand-ins for what the plugin finds around it in Kong: the global `kong` (PDK),
-- `ngx`, resty.http and the schema typedefs. Each `install` starts a fresh request;
-- everything the plugin does is recorded on the returned table for the specs to read.
local M = {}

local function lower_keys(t)
  local out = {}
  for k, v in pairs(t or {}) do
    out[k:lower()] = v
  end
  return out
end

-- A Kong schema typedef: a table that, called with overrides, returns a copy with them.
local function typedef(base)
  return setmetatable(base, {
    __call = function(self, overrides)
      local copy = {}
      for k, v in pairs(self) do copy[k] = v end
      for k, v in pairs(overrides or {}) do copy[k] = v end
      return copy
    end,
  })
end

M.typedefs = {
  url = typedef({ type = "string" }),
  host = typedef({ type = "string" }),
  timeout = typedef({ type = "integer", between = { 0, 2 ^ 31 - 2 } }),
  protocols_http = typedef({ type = "set", default = { "http", "https" } }),
  certificate = typedef({ type = "string" }),
  key = typedef({ type = "string" }),
}

-- The configuration Kong would hand the plugin: every schema default, then overrides.
function M.config(overrides)
  package.loaded["kong.db.schema.typedefs"] = M.typedefs
  package.loaded["kong.plugins.token-budget.schema"] = nil
  local schema = require "kong.plugins.token-budget.schema"
  local conf = {}
  for _, field in ipairs(schema.fields) do
    local name, def = next(field)
    if name == "config" then
      for _, f in ipairs(def.fields) do
        local fname, fdef = next(f)
        conf[fname] = fdef.default
      end
    end
  end
  for k, v in pairs(overrides or {}) do conf[k] = v end
  return conf
end

-- req: {method, path, query, headers, body, body_file, upstream_uri}
-- service: function(method, uri, params) -> res | nil, err  (what resty.http returns)
function M.install(req, service)
  req = req or {}
  local rec = {
    upstream_set = {}, upstream_cleared = {}, response_set = {}, calls = {},
    timers = {}, logs = {}, exit = nil,
  }
  local headers = lower_keys(req.headers)

  local function log(level)
    return function(...)
      rec.logs[#rec.logs + 1] = { level = level, msg = table.concat({ ... }) }
    end
  end

  _G.kong = {
    ctx = { plugin = {} },
    log = { err = log("err"), warn = log("warn"), notice = log("notice"),
            debug = log("debug"), info = log("info") },
    request = {
      get_method = function() return req.method or "POST" end,
      get_path = function() return req.path or "/v1/chat/completions" end,
      get_raw_query = function() return req.query or "" end,
      get_headers = function() return headers end,
      get_raw_body = function(limit)
        rec.raw_body_limit = limit
        if req.body_file then return nil, "request body did not fit into buffer" end
        return req.body or ""
      end,
    },
    service = { request = {
      set_header = function(k, v) rec.upstream_set[k:lower()] = v end,
      clear_header = function(k) rec.upstream_cleared[k:lower()] = true end,
      set_raw_body = function(body)
        if rec.set_body_error then error(rec.set_body_error) end
        rec.upstream_body = body
      end,
    } },
    response = {
      exit = function(status, body, hdrs)
        rec.exit = { status = status, body = body, headers = hdrs or {} }
        return rec.exit
      end,
      set_header = function(k, v) rec.response_set[k:lower()] = v end,
      clear_header = function(k) rec.response_cleared = k:lower() end,
      get_status = function() return rec.status or 200 end,
      get_header = function(k) return (rec.response_headers or {})[k:lower()] end,
    },
    plugin = { get_id = function() return "plugin-1" end },
  }

  _G.ngx = {
    arg = {},
    var = { upstream_uri = req.upstream_uri },
    req = { get_body_file = function() return req.body_file end },
    timer = { at = function(delay, fn, ...)
      rec.timers[#rec.timers + 1] = { delay = delay, fn = fn, args = { ... } }
      return true
    end },
  }

  package.loaded["resty.http"] = {
    new = function()
      local httpc = {}
      function httpc.set_timeouts(_, c, s, r) rec.timeouts = { c, s, r } end
      function httpc.request_uri(_, uri, params)
        rec.calls[#rec.calls + 1] = { uri = uri, params = params }
        return service(params.method, uri, params)
      end
      return httpc
    end,
  }
  package.loaded["ngx.ssl"] = {
    parse_pem_cert = function(pem) return { cert = pem } end,
    parse_pem_priv_key = function(pem) return { key = pem } end,
  }
  for _, mod in ipairs({ "handler", "check", "client", "settle", "usage_chunk" }) do
    package.loaded["kong.plugins.token-budget." .. mod] = nil
  end
  return rec
end

-- Run the timers the plugin started (as nginx would, once the log phase is over).
function M.run_timers(rec, premature)
  while #rec.timers > 0 do
    local t = table.remove(rec.timers, 1)
    t.fn(premature or false, unpack(t.args))
  end
end

return M
