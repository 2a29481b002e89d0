-- Stand-in for kong.db.schema.typedefs: the types the plugin's schema uses, carrying
-- their defaults (no validation: that is Kong's and is not tested here).
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

return {
  url = typedef({ type = "string" }),
  host = typedef({ type = "string" }),
  timeout = typedef({ type = "integer" }),
  protocols_http = typedef({ type = "set", default = { "http", "https" } }),
  certificate = typedef({ type = "string" }),
  key = typedef({ type = "string" }),
  queue = typedef({ type = "record", fields = {} }),
}
