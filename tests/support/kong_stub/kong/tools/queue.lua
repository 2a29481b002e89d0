-- Stand-in for kong.tools.queue (Kong >= 3.3), enough of it for one plugin: entries go
-- to the handler from a zero-delay timer, one batch per entry; a batch the handler
-- fails is retried with doubling pauses until max_retry_time, as Kong's queue does.
local Queue = {}

local DEFAULTS = {
  max_batch_size = 1, max_coalescing_delay = 1, max_entries = 10000,
  max_retry_time = 60, initial_retry_delay = 0.01, max_retry_delay = 60,
}

Queue.stats = { enqueued = 0, delivered = 0, retried = 0, dropped = 0 }

function Queue.get_plugin_params(plugin_name, config, default_name)
  local params = {}
  for k, v in pairs(DEFAULTS) do
    params[k] = (config.queue or {})[k] or v
  end
  params.name = (config.queue or {}).name or default_name
  params.plugin = plugin_name
  return params
end

local function deliver(premature, params, handler, handler_conf, batch, started, delay)
  local ok, err = handler(handler_conf, batch)
  if ok then
    Queue.stats.delivered = Queue.stats.delivered + #batch
    return
  end
  local waited = ngx.now() - started
  if premature or waited + delay > params.max_retry_time then
    Queue.stats.dropped = Queue.stats.dropped + #batch
    ngx.log(ngx.ERR, "[queue ", params.name, "] batch dropped: ", err)
    return
  end
  Queue.stats.retried = Queue.stats.retried + 1
  ngx.log(ngx.WARN, "[queue ", params.name, "] handler failed, retrying: ", err)
  ngx.timer.at(delay, deliver, params, handler, handler_conf, batch, started,
               math.min(delay * 2, params.max_retry_delay))
end

function Queue.enqueue(params, handler, handler_conf, value)
  Queue.stats.enqueued = Queue.stats.enqueued + 1
  return ngx.timer.at(0, deliver, params, handler, handler_conf, { value }, ngx.now(),
                      params.initial_retry_delay)
end

return Queue
