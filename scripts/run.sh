#!/usr/bin/env bash
# Starts a local mcp-affinity stack and stops all of it on Ctrl-C:
#   - three demo MCP pods on 127.0.0.1:8081-8083 (unless UPSTREAMS is set), dual-era: 2025
#     sessions and MCP 2026-07-28 requests on one endpoint, with tasks (tool slow_task),
#   - the control service on 127.0.0.1:9901 (embedded in-memory store) and its replay
#     listener on 127.0.0.1:9902 (mutual TLS: certificates made by scripts/replay-certs.sh
#     for this run, so that only Envoy reaches it),
#   - real Envoy running the filter on http://127.0.0.1:10000/mcp (admin on :15000), with
#     the default bootstrap envoy/envoy-stateful-session.yaml (pins applied by Envoy's
#     stateful session to members of the MCP cluster only; a failed request retried by
#     Envoy, body included, to control's replay listener) rendered for these addresses by
#     mcp-affinity-envoy-config. BOOTSTRAP=original-dst runs envoy/envoy.yaml instead.
# Environment: UPSTREAMS=ip:port,ip:port  put your own MCP servers behind Envoy;
#              LISTEN (default 127.0.0.1:10000), ADMIN (default 127.0.0.1:15000),
#              CONTROL (default 127.0.0.1:9901), REPLAY (default 127.0.0.1:9902);
#              BOOTSTRAP (default stateful-session; original-dst: envoy/envoy.yaml);
#              ENVOY (default: .venv-envoy-1.40.0/bin/envoy, installed by `make setup-envoy`);
#              ENVOY_LOG_LEVEL (default warn; e.g. debug, or info for the filter's own logs).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug
WASM=target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm
ENVOY=${ENVOY:-$PWD/.venv-envoy-1.40.0/bin/envoy}
LISTEN=${LISTEN:-127.0.0.1:10000}
ADMIN=${ADMIN:-127.0.0.1:15000}
CONTROL=${CONTROL:-127.0.0.1:9901}
REPLAY=${REPLAY:-127.0.0.1:9902}
BOOTSTRAP=${BOOTSTRAP:-stateful-session}
case "$BOOTSTRAP" in
  stateful-session|original-dst) ;;
  *) echo "BOOTSTRAP=$BOOTSTRAP: expected stateful-session (default) or original-dst" >&2; exit 1 ;;
esac
RUN_DIR=$(mktemp -d)
pids=()

if [[ ! -x "$ENVOY" ]]; then
  echo "Envoy not found at $ENVOY: run \`make setup-envoy\` or set ENVOY=/path/to/envoy" >&2
  exit 1
fi

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

# Envoy's admin GET /ready answers "LIVE" once its listeners (and the filter's VMs) are up.
envoy_live() { # admin host:port
  (exec 3<>"/dev/tcp/${1%:*}/${1#*:}" &&
    printf 'GET /ready HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n\r\n' "$1" >&3 &&
    tr -d '\r' <&3 | grep -x LIVE >/dev/null) 2>/dev/null
}
wait_envoy_ready() { # admin host:port, envoy pid
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "Envoy exited during startup (see its log above)" >&2; exit 1; }
    envoy_live "$1" && return 0
    sleep 0.1
  done
  echo "Envoy was not ready within 60 s" >&2; exit 1
}

if [[ -n "${UPSTREAMS:-}" ]]; then
  IFS=',' read -r -a upstreams <<<"$UPSTREAMS"
else
  upstreams=()
  for i in 1 2 3; do
    addr="127.0.0.1:808$i"
    "$BIN/mcp-affinity-demo-server" --listen "$addr" --name "pod-$i" --era dual &
    pids+=($!); upstreams+=("$addr")
  done
fi

MCP_AFFINITY_CONTROL_TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export MCP_AFFINITY_CONTROL_TOKEN
(umask 077; printf '%s' "$MCP_AFFINITY_CONTROL_TOKEN" >"$RUN_DIR/control.token")
# Control re-initializes sessions on these endpoints when their pod is gone (recovery); with
# the default bootstrap, Envoy's retry brings it the failed request on its replay listener.
control_args=(--listen "$CONTROL" --store memory --endpoints "$(IFS=,; echo "${upstreams[*]}")")
if [[ "$BOOTSTRAP" == stateful-session ]]; then
  # The replay listener answers Envoy only: mutual TLS with certificates made for this run.
  scripts/replay-certs.sh "$RUN_DIR/replay-tls" 1
  control_args+=(--replay-listen "$REPLAY" --replay-tls-cert "$RUN_DIR/replay-tls/control.crt"
    --replay-tls-key "$RUN_DIR/replay-tls/control.key" --replay-client-ca "$RUN_DIR/replay-tls/ca.crt")
  pinning='"pin_encoding": "base64", "recovery": { "replay_by": "envoy_retry" },'
  bootstrap_args=(--bootstrap envoy/envoy-stateful-session.yaml --replay "$REPLAY" --replay-tls "$RUN_DIR/replay-tls")
else
  pinning='"pin_encoding": "plain", "recovery": { "replay_by": "filter" },'
  bootstrap_args=(--bootstrap envoy/envoy.yaml)
fi
"$BIN/mcp-affinity-control" "${control_args[@]}" &
control_pid=$!
pids+=("$control_pid")

# The filter reads the token from Envoy's environment (vm_config host_env_keys).
cat >"$RUN_DIR/filter.json" <<JSON
{
  "pin_header": "x-session-pod", $pinning
  "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN", "timeout_ms": 1000 }
}
JSON

args=(--listen "$LISTEN" --admin "$ADMIN" --wasm "$WASM" --control "$CONTROL" --filter-config "$RUN_DIR/filter.json" "${bootstrap_args[@]}")
for u in "${upstreams[@]}"; do args+=(--upstream "$u"); done
"$BIN/mcp-affinity-envoy-config" "${args[@]}" >"$RUN_DIR/envoy.yaml"

for u in "${upstreams[@]}"; do wait_port "$u"; done
wait_port "$CONTROL"

"$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --disable-hot-restart -l "${ENVOY_LOG_LEVEL:-warn}" &
envoy_pid=$!
pids+=("$envoy_pid")
wait_envoy_ready "$ADMIN" "$envoy_pid"
wait_port "$LISTEN"

cat <<MSG

mcp-affinity is running (Envoy $("$ENVOY" --version 2>/dev/null | sed -n 's|.*/\([0-9][0-9.]*\)/.*|\1|p'), pid $envoy_pid, bootstrap $BOOTSTRAP).
  MCP endpoint (Streamable HTTP):  http://$LISTEN/mcp
  upstream MCP servers:            ${upstreams[*]}
  control service:                 http://$CONTROL  (/healthz, /readyz, /metrics; /v1 token in $RUN_DIR/control.token)
  Envoy admin:                     http://$ADMIN  (loopback only)
  filter counters:                 curl -s $ADMIN/stats?filter=wasmcustom

Point an MCP client at it, e.g.
  npx @modelcontextprotocol/inspector   (transport "Streamable HTTP", URL http://$LISTEN/mcp)
or by hand:
  curl -si http://$LISTEN/mcp -H 'content-type: application/json' \\
       -H 'accept: application/json, text/event-stream' \\
       -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}'
  then repeat with -H 'mcp-session-id: <id>' and a tools/call of "whoami": it always names the same pod.
MCP 2026-07-28 (no session): a tools/call of "slow_task" declaring the tasks extension answers a
task; its tasks/get (Mcp-Name: <taskId>) always reaches the pod that holds it:
  curl -s http://$LISTEN/mcp -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
       -H 'mcp-protocol-version: 2026-07-28' -H 'mcp-method: tools/call' -H 'mcp-name: slow_task' \
       -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow_task","arguments":{"ms":5000},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"curl","version":"1"},"io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}}}'
  curl -s http://$LISTEN/mcp -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
       -H 'mcp-protocol-version: 2026-07-28' -H 'mcp-method: tasks/get' -H 'mcp-name: <taskId>' \
       -d '{"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId":"<taskId>","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"curl","version":"1"},"io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}}}'
  (filter counters tasks_pinned, tasks_routed)

Drain a pod as a rolling update's preStop hook would: its sessions move to another pod on
their next request, with no error; new tasks go to other pods while its tasks finish there, and
the command returns once none is left (\`undrain\` undoes it):
  MCP_AFFINITY_CONTROL_TOKEN_FILE=$RUN_DIR/control.token $BIN/mcp-affinity-control drain ${upstreams[0]} --url http://$CONTROL --settle 3

Kill a demo pod (kill <pid>: ${pids[*]:0:${#upstreams[@]}}) to see its sessions recovered on
another pod on their next request, with the same session id and no error.

Ctrl-C stops everything.
MSG
# Demo pods may be killed to try recovery; the stack stops when Envoy or control exits.
wait -n "$envoy_pid" "$control_pid"
echo "Envoy or control exited; stopping the rest" >&2
