-- Configuration of the token-budget plugin. Defaults match the service's defaults
-- (HTTP check port 127.0.0.1:9193) and Envoy's shipped ext_authz settings (1 MiB of
-- request body, fail closed).
local typedefs = require "kong.db.schema.typedefs"

local MIB = 1024 * 1024

local fields = {
  -- The service's HTTP check/settle listener. https:// for mTLS off loopback.
  { service_url = typedefs.url { required = true, default = "http://127.0.0.1:9193" } },
  { connect_timeout = typedefs.timeout { default = 1000 } },
  { send_timeout = typedefs.timeout { default = 2000 } },
  -- A check may wait for room when a policy queues (during_peak: queue): raise this
  -- above the policy's max_wait if you use that.
  { read_timeout = typedefs.timeout { default = 2000 } },
  { keepalive_timeout = typedefs.timeout { default = 60000 } },
  { keepalive_pool_size = { type = "integer", required = true, default = 64, gt = 0 } },
  -- false: no answer from the service means 503 (nothing reserved, nothing spent).
  -- true: the request goes through unbudgeted and uncharged; a warning is logged.
  { fail_open = { type = "boolean", required = true, default = false } },
  -- The body lets the service estimate the tokens (model, max_tokens, prompt size).
  { send_body = { type = "boolean", required = true, default = true } },
  { max_body_size = { type = "integer", required = true, default = MIB,
                      between = { 1024, 64 * MIB } } },
  -- The most of a response copied for its settlement (the service reads 16 MiB,
  -- bounds.response_decoded_bytes); a longer one is sent as a truncated copy
  -- (x-authz-truncated: true) and charged its reservation, as ext_proc past its limit.
  { max_settle_body = { type = "integer", required = true, default = 16 * MIB,
                        between = { 1024, 64 * MIB } } },
  { ssl_verify = { type = "boolean", required = true, default = true } },
  -- The name the service's certificate is checked against (and sent as SNI); default:
  -- the host of service_url. Set it when that host is an IP address.
  { ssl_server_name = typedefs.host { required = false } },
  -- mTLS to the service: a client certificate from the CA given to the service as
  -- --tls-client-ca (that CA must sign only gateways).
  { client_cert = typedefs.certificate { required = false, referenceable = true } },
  { client_key = typedefs.key { required = false, referenceable = true, encrypted = true } },
}

-- Kong >= 3.3: settlements go through kong.tools.queue, configured like http-log's.
if typedefs.queue then
  fields[#fields + 1] = { queue = typedefs.queue }
end

return {
  name = "token-budget",
  fields = {
    { protocols = typedefs.protocols_http },
    { config = {
        type = "record",
        fields = fields,
        entity_checks = {
          { mutually_required = { "client_cert", "client_key" } },
        },
    } },
  },
}
