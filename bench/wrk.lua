-- wrk script for the authz benchmark.
--
--   wrk ... -s bench/wrk.lua URL -- REQUESTS_FILE [RATE]
--
-- REQUESTS_FILE holds pre-formatted HTTP requests (one POST per distinct user, each with
-- its own Authorization header and the same JSON body), separated by a line "\0\n":
-- built once in Python, so wrk only rotates over strings (no per-request Lua work).
-- RATE (requests/s for this thread, optional) paces sending to a fixed schedule: each
-- send claims the next slot, so the thread keeps RATE whatever the latency (as long as
-- connections are free), the wrk2 idea without wrk2. done() prints one JSON line.
-- ONCE ("once" as the third argument, RATE 0 for none): every request of the file is
-- sent exactly once, then the thread stops once all are answered: no second pass over
-- the file, and no request cut between its Check and its response by the end of -d.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
  int getpid(void);
  long syscall(long number, ...);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local requests = {}
local n, i = 0, 0
local once = false
local interval, next_slot = nil, nil
local answered = 0

local function stop_when_all_answered(status, headers, body)
  answered = answered + 1
  if answered >= n and answered - 1 < n then
    wrk.thread:stop()
    -- wrk's main thread sleeps out -d whatever the threads do; SIGINT to it (tgkill,
    -- syscall 234 on x86_64: to that thread, not any) ends the sleep, and wrk reports.
    local pid = ffi.C.getpid()
    ffi.C.syscall(234, ffi.cast("long", pid), ffi.cast("long", pid), ffi.cast("long", 2))
  end
end

-- Pacing: each send claims the next slot of the schedule; a send that is late goes at
-- once (and the schedule is reset if it fell a second behind, instead of bursting).
local function paced_delay()
  local t = now_ms()
  if next_slot == nil or next_slot < t - 1000 then next_slot = t end
  local slot = next_slot
  next_slot = next_slot + interval
  local d = slot - t
  if d < 0 then return 0 end
  return math.floor(d)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  for req in string.gmatch(data, "(.-)%z\n") do
    n = n + 1
    requests[n] = req
  end
  assert(n > 0, "no requests in " .. args[1])
  local rate = tonumber(args[2] or "0")
  if rate and rate > 0 then
    interval = 1000 / rate
    -- Defined only when pacing: wrk checks for delay() after init, and takes a slower
    -- path per request when it exists.
    delay = paced_delay
  end
  if args[3] == "once" then
    once = true
    response = stop_when_all_answered -- wrk calls response() only if it exists
  end
end

function request()
  if once and i >= n then return requests[n] end -- until the stop: the last one again
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f, "errors": ' ..
    '{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
