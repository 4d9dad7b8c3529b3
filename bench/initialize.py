#!/usr/bin/env python3
"""Instruction-count phase of `make bench-envoy` (bench/envoy-bench.sh), initialize path: the
`initialize` of bench/lua/initialize.lua (POST /mcp without Mcp-Session-Id), sent COUNT times
sequentially on one keep-alive connection; every answer must be 200 and carry a new
Mcp-Session-Id (each request makes a new session, as a client's first request does).

    bench/initialize.py URL COUNT

Prints `requests=COUNT connections=1 pods=P[,Q...] sessions=S seconds=T`: pods are the distinct
x-pod headers of the answers, in order of first appearance; sessions the distinct session ids.
Exits 1 on any status other than 200, an answer without Mcp-Session-Id, a session id seen
before, and on a reconnect (the connection closed by the proxy): each makes the count meaningless.
"""
import http.client
import sys
import time
import urllib.parse

BODY = (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
        b'"capabilities":{},"clientInfo":{"name":"wrk","version":"4"}}}')


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: bench/initialize.py URL COUNT", file=sys.stderr)
        return 2
    url, count = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2])
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.connect()
    sock, pods, sessions = conn.sock, [], set()
    t0 = time.monotonic()
    for i in range(count):
        conn.request("POST", url.path or "/", body=BODY, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            print(f"initialize.py: request {i + 1}/{count} answered {resp.status}", file=sys.stderr)
            return 1
        if conn.sock is not sock:  # http.client reopens silently when the server closed
            print(f"initialize.py: the connection was closed before request {i + 1}/{count}", file=sys.stderr)
            return 1
        sid = resp.getheader("mcp-session-id")
        if not sid:
            print(f"initialize.py: answer {i + 1}/{count} has no Mcp-Session-Id", file=sys.stderr)
            return 1
        if sid in sessions:
            print(f"initialize.py: answer {i + 1}/{count} repeats session {sid}", file=sys.stderr)
            return 1
        sessions.add(sid)
        pod = resp.getheader("x-pod", "-")
        if pod not in pods:
            pods.append(pod)
    seconds = time.monotonic() - t0
    conn.close()
    print(f"requests={count} connections=1 pods={','.join(pods)} sessions={len(sessions)} seconds={seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
