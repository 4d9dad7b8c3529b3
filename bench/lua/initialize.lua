-- wrk script of `make bench-envoy`: MCP `initialize` (POST without `Mcp-Session-Id`).
-- Every request starts a new session: the canned pods answer each with a distinct
-- `Mcp-Session-Id`, which the filter pins (and, with control, records there).
--   wrk -t1 -c1 -d5s --latency -s bench/lua/initialize.lua http://127.0.0.1:PORT/mcp
--   wrk -t1 -c16 -d300s -s bench/lua/initialize.lua URL -- N   stops after N responses
-- Prints one line `BENCH requests=… duration_us=… p50_us=… p99_us=… status_errors=… socket_errors=…`.

wrk.method = "POST"
wrk.path = "/mcp"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"wrk","version":"4"}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"

local limit = nil
local seen = 0

function init(args)
  limit = tonumber(args[1])
  if limit ~= nil then
    -- Defined only with a limit: wrk skips response parsing when `response` is nil.
    response = function(status, headers, body)
      seen = seen + 1
      if seen >= limit then
        wrk.thread:stop()
      end
    end
  end
end

-- The result line, shared with the other scripts (report.lua, next to this file).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
