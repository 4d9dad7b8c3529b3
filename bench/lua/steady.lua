-- wrk script of `make bench-envoy`: the steady request of one pinned MCP session, a
-- `tools/call` POST carrying `Mcp-Session-Id` (given after `--`; the benchmark obtains it
-- by sending `initialize` through the same proxy first, so the filter has pinned it).
--   wrk -t1 -c16 -d5s --latency -s bench/lua/steady.lua http://127.0.0.1:PORT/mcp -- SESSION_ID
-- Prints one line `BENCH requests=… duration_us=… p50_us=… p99_us=… status_errors=… socket_errors=…`.

wrk.method = "POST"
wrk.path = "/mcp"
wrk.body = '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["MCP-Protocol-Version"] = "2025-06-18"

function init(args)
  if args[1] == nil or args[1] == "" then
    error("steady.lua: pass the session id after --")
  end
  -- wrk formats the request once, after init(): every request carries this header.
  wrk.headers["Mcp-Session-Id"] = args[1]
end

-- The result line, shared with the other scripts (report.lua, next to this file).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
