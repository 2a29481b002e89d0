-- luacheck from this directory (kong/): the plugin under OpenResty's globals.
std = "ngx_lua"
globals = { "kong" }
max_line_length = 100
unused_args = false
redefined = false

files["spec/"] = {
  std = "+busted",
  -- The specs install their stand-ins for Kong's and nginx's globals.
  globals = { "kong", "ngx" },
}
