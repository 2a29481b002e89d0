-- A thin stand-in for Kong's PDK inside plain nginx + lua-nginx-module, so the UNCHANGED
-- token-budget plugin runs its phases on real requests, real sockets and real streams.
-- It is not Kong: no router, no DAO, no schema validation, no lua-kong-nginx-module.
--
--   init(conf_path)   read the plugin configuration (JSON), fill in the schema's
--                     defaults as Kong would, load the handler
--   phase(name)       run handler[name](conf) for the current request
--
-- The JSON file: {"config": {...plugin config...}, "strip_path": "/prefix" or null,
-- "queue": true|false (offer kong.tools.queue or not)}.
local cjson = require "cjson.safe"

local M = {}

local conf, handler, strip_path

local LEVELS = { err = ngx.ERR, warn = ngx.WARN, notice = ngx.NOTICE, info = ngx.INFO,
                 debug = ngx.DEBUG, crit = ngx.CRIT }

local function make_log()
  local log = {}
  for name, level in pairs(LEVELS) do
    log[name] = function(...)
      ngx.log(level, "[kong] [token-budget] ", ...)
    end
  end
  return log
end

local function raw_path()
  return (ngx.var.request_uri:match("^[^?]*"))
end

local request = {
  get_method = function() return ngx.req.get_method() end,
  get_path = function() return raw_path() end,
  get_raw_query = function() return ngx.var.args or "" end,
  get_headers = function(max) return ngx.req.get_headers(max) end,
  get_header = function(name) return ngx.req.get_headers()[name] end,
  -- Kong < 3.8: a body nginx wrote to a file is not returned.
  get_raw_body = function()
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if data then
      return data
    end
    if ngx.req.get_body_file() then
      return nil, "request body did not fit into client body buffer"
    end
    return ""
  end,
}

local response = {
  get_status = function() return ngx.status end,
  get_header = function(name)
    local value = ngx.header[name]
    if type(value) == "table" then
      return value[1]
    end
    return value
  end,
  set_header = function(name, value) ngx.header[name] = value end,
  clear_header = function(name) ngx.header[name] = nil end,
  add_header = function(name, value)
    local old = ngx.header[name]
    if old == nil then
      ngx.header[name] = value
    elseif type(old) == "table" then
      old[#old + 1] = value
      ngx.header[name] = old
    else
      ngx.header[name] = { old, value }
    end
  end,
  -- As Kong's: status, headers, body, and the request ends here (no upstream).
  exit = function(status, body, headers)
    ngx.status = status
    for name, value in pairs(headers or {}) do
      ngx.header[name] = value
    end
    if body then
      ngx.header["Content-Length"] = #body
      ngx.print(body)
    end
    return ngx.exit(status >= 200 and ngx.HTTP_OK or status)
  end,
}

local service_request = {
  set_header = function(name, value) ngx.req.set_header(name, value) end,
  clear_header = function(name) ngx.req.clear_header(name) end,
  -- As Kong's: the body read, then replaced (nginx sets the new Content-Length).
  set_raw_body = function(body)
    ngx.req.read_body()
    ngx.req.set_body_data(body)
  end,
}

-- kong.ctx.plugin: one table per request, shared by the phases of that request.
local ctx = setmetatable({}, {
  __index = function(_, key)
    if key == "plugin" then
      local c = ngx.ctx.token_budget_plugin
      if not c then
        c = {}
        ngx.ctx.token_budget_plugin = c
      end
      return c
    end
  end,
})

local function fill_defaults(schema, overrides)
  local out = {}
  for _, field in ipairs(schema.fields) do
    local name, def = next(field)
    if name == "config" then
      for _, f in ipairs(def.fields) do
        local fname, fdef = next(f)
        if fdef.default ~= nil then
          out[fname] = fdef.default
        elseif fdef.type == "record" then
          out[fname] = {}  -- e.g. queue: the shim fills its own defaults
        end
      end
    end
  end
  for k, v in pairs(overrides or {}) do
    if v ~= cjson.null then
      out[k] = v
    end
  end
  return out
end

function M.init(path)
  local f = assert(io.open(path, "rb"))
  local settings = assert(cjson.decode(f:read("*a")))
  f:close()
  if settings.queue == false then
    package.preload["kong.tools.queue"] = function()
      error("this Kong has no kong.tools.queue")
    end
  end
  strip_path = settings.strip_path ~= cjson.null and settings.strip_path or nil
  _G.kong = {
    ctx = ctx,
    log = make_log(),
    request = request,
    response = response,
    service = { request = service_request },
    plugin = { get_id = function() return "kong-stub-plugin" end },
  }
  local schema = require "kong.plugins.token-budget.schema"
  conf = fill_defaults(schema, settings.config)
  handler = require "kong.plugins.token-budget.handler"
end

-- Kong's router sets $upstream_uri before plugins run (here: strip_path only).
local function route()
  local path = raw_path()
  if strip_path and path:sub(1, #strip_path) == strip_path then
    path = path:sub(#strip_path + 1)
    if path == "" then
      path = "/"
    end
  end
  ngx.var.upstream_uri = path
end

function M.phase(name)
  if name == "access" then
    route()
  end
  local fn = handler[name]
  if fn then
    return fn(handler, conf)
  end
end

return M
