-- A minimal resty.http (lua-resty-http's API as the plugin uses it: new, set_timeouts,
-- request_uri) on ngx.socket.tcp, for machines without lua-resty-http (it is not in
-- Debian). Kong bundles the real one; nginx's lua_package_path lists this directory
-- after the system paths, so a real lua-resty-http wins where it is installed.
local tcp = ngx.socket.tcp
local concat = table.concat
local lower = string.lower

local _M = { _VERSION = "0.17-stand-in" }
local mt = { __index = _M }

function _M.new()
  return setmetatable({ sock = tcp() }, mt)
end

function _M:set_timeouts(connect, send, read)
  self.sock:settimeouts(connect, send, read)
end

local function parse_uri(uri)
  local scheme, host, port, path = uri:match("^(https?)://([^:/?]+):?(%d*)(.*)$")
  if not scheme then
    return nil, "bad uri: " .. uri
  end
  if port == "" then
    port = scheme == "https" and 443 or 80
  end
  if path == "" then
    path = "/"
  end
  return scheme, host, tonumber(port), path
end

local function read_body(sock, headers, status, method)
  if method == "HEAD" or status == 204 or status == 304 or (status >= 100 and status < 200) then
    return ""
  end
  local length = tonumber(headers["content-length"])
  if length then
    return sock:receive(length)
  end
  if lower(headers["transfer-encoding"] or "") == "chunked" then
    local parts = {}
    while true do
      local line, err = sock:receive("*l")
      if not line then return nil, err end
      local size = tonumber(line:match("^%x+"), 16)
      if not size then return nil, "bad chunk size: " .. line end
      if size == 0 then
        repeat
          line, err = sock:receive("*l")
          if not line then return nil, err end
        until line == ""
        return concat(parts)
      end
      local data
      data, err = sock:receive(size)
      if not data then return nil, err end
      parts[#parts + 1] = data
      sock:receive("*l")
    end
  end
  headers.connection = "close"
  return sock:receive("*a")
end

function _M:request_uri(uri, params)
  local scheme, host, port, path = parse_uri(uri)
  if not scheme then
    return nil, host
  end
  local sock = self.sock
  local pool = host .. ":" .. port .. ":" .. scheme
  if params.ssl_client_cert then
    pool = pool .. ":" .. tostring(params.ssl_client_cert)
  end
  local ok, err = sock:connect(host, port, { pool = pool })
  if not ok then
    return nil, err
  end
  if scheme == "https" and sock:getreusedtimes() == 0 then
    if params.ssl_client_cert then
      ok, err = sock:setclientcert(params.ssl_client_cert, params.ssl_client_priv_key)
      if not ok then return nil, err end
    end
    ok, err = sock:sslhandshake(nil, params.ssl_server_name or host, params.ssl_verify ~= false)
    if not ok then
      sock:close()
      return nil, err
    end
  end
  local body = params.body or ""
  local lines = { (params.method or "GET") .. " " .. path .. " HTTP/1.1" }
  -- As lua-resty-http: Host and User-Agent only when the caller set none.
  local given = {}
  for name in pairs(params.headers or {}) do
    given[lower(name)] = true
  end
  if not given.host then
    lines[#lines + 1] = "Host: " .. host .. ":" .. port
  end
  if not given["user-agent"] then
    lines[#lines + 1] = "User-Agent: lua-resty-http-stand-in"
  end
  for name, value in pairs(params.headers or {}) do
    if type(value) == "table" then
      for _, v in ipairs(value) do lines[#lines + 1] = name .. ": " .. v end
    else
      lines[#lines + 1] = name .. ": " .. tostring(value)
    end
  end
  if params.body or params.method == "POST" or params.method == "PUT" then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = body
  local sent
  sent, err = sock:send(concat(lines, "\r\n"))
  if not sent then
    sock:close()
    return nil, err
  end
  local status_line
  status_line, err = sock:receive("*l")
  if not status_line then
    sock:close()
    return nil, err
  end
  local status = tonumber(status_line:match("^HTTP/1%.%d (%d%d%d)"))
  if not status then
    sock:close()
    return nil, "bad status line: " .. status_line
  end
  local headers = {}
  while true do
    local line
    line, err = sock:receive("*l")
    if not line then
      sock:close()
      return nil, err
    end
    if line == "" then break end
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      name = lower(name)
      local old = headers[name]
      if old == nil then
        headers[name] = value
      elseif type(old) == "table" then
        old[#old + 1] = value
      else
        headers[name] = { old, value }
      end
    end
  end
  local res_body
  res_body, err = read_body(sock, headers, status, params.method)
  if not res_body then
    sock:close()
    return nil, err
  end
  if lower(headers.connection or "") == "close" then
    sock:close()
  else
    sock:setkeepalive(params.keepalive_timeout, params.keepalive_pool)
  end
  return { status = status, headers = headers, body = res_body }
end

return _M
