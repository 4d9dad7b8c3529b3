#!/usr/bin/env python3
"""Instruction-count phase of `make bench-envoy` (bench/envoy-bench.sh): a fixed number of
requests sent one after the other on one keep-alive connection -- a fixed request count,
which wrk cannot do.

    bench/sequential.py steady URL SESSION_ID COUNT
        the steady request of bench/lua/steady.lua (POST /mcp, tools/call, Mcp-Session-Id)
    bench/sequential.py initialize URL COUNT
        the `initialize` of bench/lua/initialize.lua (POST /mcp without Mcp-Session-Id):
        every answer must carry a new Mcp-Session-Id (each request makes a new session, as
        a client's first request does)

Prints `requests=COUNT connections=1 pods=P[,Q...] [sessions=S ]seconds=T`: pods are the
distinct x-pod headers of the answers, in order of first appearance; sessions (initialize)
the distinct session ids. Exits 1 on any status other than 200, on a reconnect (the
connection closed by the proxy), and for initialize on an answer without Mcp-Session-Id or
with a session id seen before: each makes the count meaningless.
"""
import http.client
import sys
import time
import urllib.parse

STEADY = b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'
INITIALIZE = (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
              b'"capabilities":{},"clientInfo":{"name":"wrk","version":"4"}}}')
USAGE = "usage: bench/sequential.py steady URL SESSION_ID COUNT | initialize URL COUNT"


def main() -> int:
    args = sys.argv[1:]
    if len(args) == 4 and args[0] == "steady":
        mode, url, sid, count = args
    elif len(args) == 3 and args[0] == "initialize":
        (mode, url, count), sid = args, None
    else:
        print(USAGE, file=sys.stderr)
        return 2
    url, count = urllib.parse.urlsplit(url), int(count)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if sid is not None:
        headers.update({"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": sid})
    body = STEADY if sid is not None else INITIALIZE
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.connect()
    sock, pods, sessions = conn.sock, [], set()
    t0 = time.monotonic()
    for i in range(count):
        conn.request("POST", url.path or "/", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        where = f"sequential.py {mode}: request {i + 1}/{count}"
        if resp.status != 200:
            print(f"{where} answered {resp.status}", file=sys.stderr)
            return 1
        if conn.sock is not sock:  # http.client reopens silently when the server closed
            print(f"{where}: the connection was closed before it", file=sys.stderr)
            return 1
        if sid is None:
            new = resp.getheader("mcp-session-id")
            if not new or new in sessions:
                print(f"{where}: answer without a new Mcp-Session-Id ({new!r})", file=sys.stderr)
                return 1
            sessions.add(new)
        pod = resp.getheader("x-pod", "-")
        if pod not in pods:
            pods.append(pod)
    seconds = time.monotonic() - t0
    conn.close()
    made = f"sessions={len(sessions)} " if sid is None else ""
    print(f"requests={count} connections=1 pods={','.join(pods)} {made}seconds={seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
