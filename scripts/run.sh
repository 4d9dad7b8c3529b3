#!/usr/bin/env bash
# Starts a local mcp-affinity stack and stops all of it on Ctrl-C:
#   - three demo MCP pods on 127.0.0.1:8081-8083 (unless UPSTREAMS is set),
#   - the control service on 127.0.0.1:9901 (embedded in-memory store),
#   - the dev proxy running the filter on http://127.0.0.1:10000/mcp (stats on :10001).
# Environment: UPSTREAMS=ip:port,ip:port  put your own MCP servers behind the proxy;
#              LISTEN (default 127.0.0.1:10000), CONTROL (default 127.0.0.1:9901).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug
WASM=target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm
LISTEN=${LISTEN:-127.0.0.1:10000}
ADMIN=${ADMIN:-127.0.0.1:10001}
CONTROL=${CONTROL:-127.0.0.1:9901}
RUN_DIR=$(mktemp -d)
pids=()

cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN_DIR"
}
trap cleanup INT TERM EXIT

wait_port() { # host:port
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}

if [[ -n "${UPSTREAMS:-}" ]]; then
  IFS=',' read -r -a upstreams <<<"$UPSTREAMS"
else
  upstreams=()
  for i in 1 2 3; do
    addr="127.0.0.1:808$i"
    "$BIN/mcp-affinity-demo-server" --listen "$addr" --name "pod-$i" &
    pids+=($!); upstreams+=("$addr")
  done
fi

MCP_AFFINITY_CONTROL_TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export MCP_AFFINITY_CONTROL_TOKEN
# Control re-initializes sessions on these endpoints when their pod is gone (recovery).
"$BIN/mcp-affinity-control" --listen "$CONTROL" --store memory --endpoints "$(IFS=,; echo "${upstreams[*]}")" &
pids+=($!)

cat >"$RUN_DIR/filter.json" <<JSON
{
  "pin_header": "x-session-pod",
  "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN", "timeout_ms": 1000 }
}
JSON

for u in "${upstreams[@]}"; do wait_port "$u"; done
wait_port "$CONTROL"

args=(--listen "$LISTEN" --admin "$ADMIN" --wasm "$WASM" --filter-config "$RUN_DIR/filter.json"
      --cluster "mcp_affinity_control=$CONTROL" --vm-env MCP_AFFINITY_CONTROL_TOKEN)
for u in "${upstreams[@]}"; do args+=(--upstream "$u"); done
"$BIN/mcp-affinity-devproxy" "${args[@]}" &
pids+=($!)
wait_port "$LISTEN"

cat <<MSG

mcp-affinity is running.
  MCP endpoint (Streamable HTTP):  http://$LISTEN/mcp
  upstream MCP servers:            ${upstreams[*]}
  control service:                 http://$CONTROL  (/healthz, /readyz, /metrics; token in this shell's env)
  filter metrics:                  http://$ADMIN/stats

Point an MCP client at it, e.g.
  npx @modelcontextprotocol/inspector   (transport "Streamable HTTP", URL http://$LISTEN/mcp)
or by hand:
  curl -si http://$LISTEN/mcp -H 'content-type: application/json' \\
       -H 'accept: application/json, text/event-stream' \\
       -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}'
  then repeat with -H 'mcp-session-id: <id>' and a tools/call of "whoami": it always names the same pod.

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
echo "a process exited; stopping the rest" >&2
