#!/usr/bin/env python3
"""Instruction-count phase of `make bench-envoy` (bench/envoy-bench.sh): the steady request of
bench/lua/steady.lua (POST /mcp, tools/call, Mcp-Session-Id), sent COUNT times sequentially on
one keep-alive connection -- a fixed request count, which wrk cannot do.

    bench/steady.py URL SESSION_ID COUNT

Prints `requests=COUNT connections=1 pods=P[,Q...] seconds=S`: pods are the distinct x-pod
headers of the answers, in order of first appearance. Exits 1 on any status other than 200,
and on a reconnect (the connection closed by the proxy): both make the count meaningless.
"""
import http.client
import sys
import time
import urllib.parse

BODY = b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: bench/steady.py URL SESSION_ID COUNT", file=sys.stderr)
        return 2
    url, sid, count = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-06-18",
        "Mcp-Session-Id": sid,
    }
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.connect()
    sock, pods = conn.sock, []
    t0 = time.monotonic()
    for i in range(count):
        conn.request("POST", url.path or "/", body=BODY, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            print(f"steady.py: request {i + 1}/{count} answered {resp.status}", file=sys.stderr)
            return 1
        if conn.sock is not sock:  # http.client reopens silently when the server closed
            print(f"steady.py: the connection was closed before request {i + 1}/{count}", file=sys.stderr)
            return 1
        pod = resp.getheader("x-pod", "-")
        if pod not in pods:
            pods.append(pod)
    seconds = time.monotonic() - t0
    conn.close()
    print(f"requests={count} connections=1 pods={','.join(pods)} seconds={seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
