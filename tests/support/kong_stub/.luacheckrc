-- luacheck for the Kong PDK stand-in: OpenResty globals, and it installs `kong`.
std = "ngx_lua"
globals = { "kong" }
max_line_length = 100
