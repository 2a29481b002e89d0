package = "kong-plugin-token-budget"
version = "0.1.0-1"
-- The rock version (without the -1 revision) is the plugin's VERSION in handler.lua;
-- a test holds them equal.

source = {
  url = "git+https://github.com/authz/authz.git",
  tag = "v0.1.0",
  dir = "authz/kong",
}

description = {
  summary = "Token budgets for LLM routes: Kong asks the authz service before, settles after.",
  detailed = [[
    Calls the authz service's HTTP check API in the access phase (allow, or the
    service's 429/403 answer), copies the response as it streams without holding it
    back, and settles the real token usage from the log phase through kong.tools.queue.
  ]],
  license = "Apache-2.0",
}

dependencies = {
  "lua >= 5.1",
  -- lua-resty-http comes with Kong; nothing else is needed.
}

build = {
  type = "builtin",
  modules = {
    ["kong.plugins.token-budget.handler"] = "plugins/token-budget/handler.lua",
    ["kong.plugins.token-budget.schema"] = "plugins/token-budget/schema.lua",
    ["kong.plugins.token-budget.check"] = "plugins/token-budget/check.lua",
    ["kong.plugins.token-budget.client"] = "plugins/token-budget/client.lua",
    ["kong.plugins.token-budget.settle"] = "plugins/token-budget/settle.lua",
    ["kong.plugins.token-budget.usage_chunk"] = "plugins/token-budget/usage_chunk.lua",
  },
}
