-- The one place that speaks HTTP/1.1 to the service (check and settle alike), with
-- resty.http as Kong bundles it. The service's HTTP port takes the gRPC port's trust
-- rules: loopback, or mTLS with a client certificate its CA signed for gateways.
local http = require "resty.http"

local setmetatable = setmetatable

local _M = {}

-- Parsed certificates per plugin configuration (Kong reuses a configuration table
-- until it changes, so each PEM pair is parsed once, not per request).
local parsed = setmetatable({}, { __mode = "k" })

local function client_certificate(conf)
  if not conf.client_cert then
    return nil
  end
  local pair = parsed[conf]
  if pair then
    return pair
  end
  local ssl = require "ngx.ssl"
  local cert, err = ssl.parse_pem_cert(conf.client_cert)
  if not cert then
    return nil, "client_cert: " .. tostring(err)
  end
  local key
  key, err = ssl.parse_pem_priv_key(conf.client_key)
  if not key then
    return nil, "client_key: " .. tostring(err)
  end
  pair = { cert = cert, key = key }
  parsed[conf] = pair
  return pair
end

-- nil and an error string when the service gave no HTTP answer.
function _M.request(conf, method, path, headers, body)
  local pair, err = client_certificate(conf)
  if err then
    return nil, err
  end
  local httpc = http.new()
  httpc:set_timeouts(conf.connect_timeout, conf.send_timeout, conf.read_timeout)
  local base = conf.service_url:gsub("/+$", "")
  return httpc:request_uri(base .. path, {
    method = method,
    headers = headers,
    body = body,
    ssl_verify = conf.ssl_verify,
    ssl_server_name = conf.ssl_server_name,
    ssl_client_cert = pair and pair.cert,
    ssl_client_priv_key = pair and pair.key,
    keepalive_timeout = conf.keepalive_timeout,
    keepalive_pool = conf.keepalive_pool_size,
  })
end

return _M
