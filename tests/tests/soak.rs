//! Chaos soak: N concurrent MCP sessions call continuously through two real Envoys while
//! a seeded chaos driver kills and restarts pods, Envoys, control instances and Redis.
//! The test fails on any loss.
//!
//! ```text
//!   sessions × lanes ── alternately ──▶ Envoy A ──▶ control 1 ─┐
//!                                   └─▶ Envoy B ──▶ control 2 ─┴─ Redis (AOF, fsync always)
//!   both Envoys (pinned routing) and both controls (recovery) ──▶ pod-0, pod-1, pod-2
//! ```
//!
//! `cargo test -p mcp-affinity-harness --test soak` runs the short profile (60 s of
//! traffic; part of `make test`); `make soak` the long one (5 minutes). Knobs:
//! `SOAK_DURATION_SECS` (60), `SOAK_SESSIONS` (50), `SOAK_LANES` (concurrent calls per
//! session, each through its own Envoy in turn: 2), `SOAK_THINK_MS` (upper bound of a
//! lane's pause between calls, 100; the pause is 25–100 % of it), `SOAK_SEED` (decimal or
//! 0x-hex; printed at start). The seed fixes the chaos schedule — which faults, in which
//! order, on which target, with which downtimes and gaps — and each lane's choice of
//! calls; how traffic interleaves with the faults is timing and is not replayed exactly.
//!
//! The Envoys run `envoy/envoy.yaml` with its shipped plugin configuration (control and
//! recovery timeouts as deployed), `--concurrency 2`; each control instance has
//! `--endpoints` listing the three pods. Calls: `ping` and `tools/list` (replay-safe in
//! control's default `--replay-safe-methods`; the demo server has no resources) and
//! `tools/call` of `whoami` and `echo` (not replay-safe). Beside them, `SOAK_TS_SESSIONS`
//! (2) sessions of the official TypeScript MCP SDK client call `echo` through a third Envoy,
//! C, which the chaos never restarts (the SDK's client has no second Envoy to fail over to)
//! but whose pods, control and Redis it shares. The lanes take turns at the
//! shapes real clients give a request (`mcp_client::Shape`): headers and body in one write,
//! the body written after the headers, a chunked body in pieces, HTTP/2 HEADERS then DATA.
//!
//! # The chaos
//!
//! Faults run **one at a time**: each ends with the system healthy again (the process
//! restarted and ready), then the driver waits until every session has answered a call
//! through each Envoy (the fault has "settled"), then pauses a seeded gap. The design
//! promises single-fault tolerance: a pod lost while the control its Envoy talks to is
//! down cannot be recovered (the filter then passes the upstream's answer through, as
//! documented), so overlapping faults would only test that documented limit. Every
//! round of the schedule is a seeded permutation of all fault kinds; the first round
//! always completes, so every profile covers every kind.
//!
//! - **pod outage** (twice per round, different pods): SIGKILL, 1–3.5 s down, restart in
//!   place (same address, no sessions). Its sessions meet connection failures (moved to a
//!   live pod by control) and, through an Envoy still holding the old pin after the
//!   restart, 404 (control answers with its newer pin). Calls in flight at the kill reset
//!   after being sent.
//! - **pod restart in place**: SIGKILL and restart at once: the 404 ("session unknown")
//!   path.
//! - **Envoy restart** (A and B): replaced the way a Service replaces an Envoy pod — it
//!   leaves the Service (clients send new calls to the other Envoy), the clients' calls in
//!   flight finish (`http.mcp.downstream_rq_active` is then 0 too), its counters are read
//!   (they start from 0 with the new process), SIGKILL; it is back in the Service while
//!   down (endpoints lag behind a dead pod), so clients are refused and fail over to the
//!   other Envoy for that call — counted, not failures; 0.3–2 s later it restarts on the
//!   same ports with empty shared data (pins come back from control). The soak's client
//!   opens a connection per call, so a stopped Envoy means "connection refused" to it.
//!   (Stopping a listener while calls still arrive would reset connections the kernel had
//!   already accepted for it — calls whose fate the client cannot know, which is why the
//!   Envoy leaves the Service first.)
//! - **control restart** (1 and 2): counters read, SIGKILL, 0.2–1.5 s down, restart.
//! - **Redis restart**: SIGKILL, 0.2–1.5 s down, restart on the same port and append-only
//!   file (`appendonly yes`, `appendfsync always`, data directory kept). It must hold the
//!   same number of keys afterwards; the fault ends when both controls are ready again
//!   (`/readyz`, what a readiness probe waits for).
//!
//! # What must hold (the test fails otherwise)
//!
//! - no session is lost (a 404 on a session: the client would have to start anew);
//! - no replay-safe call fails;
//! - a `tools/call` fails only with JSON-RPC -32003 ("outcome unknown", not replayed) and
//!   only when a pod was killed while it was in flight; the client's count of -32003
//!   answers equals the filters' `recoveries_not_replayed`; the filters count no
//!   `recoveries_failed`;
//! - every answer is right (`echo` returns its text, `tools/list` lists both tools,
//!   `mcp-session-id` on an answer is the client's own id), and a session changes pods
//!   (`whoami`) only after a fault of its pod;
//! - every fault settles within 20 s; Redis keeps every key across its restarts.
//!
//! **Out of the filter's reach, counted apart:** the demo pods (rmcp, stateful) answer a
//! POST with an SSE stream whose headers and priming event leave before the JSON-RPC
//! response event. A pod killed in between has already had its `200` forwarded to the
//! client — the filter decides on response headers, and Envoy gives it no body before
//! that decision (envoy/README.md) — so the client sees the answer cut, not -32003. Such a
//! cut is accepted only while a pod was being killed during the call; a replay-safe call
//! is then sent again (what replay-safe means to a client), a `tools/call` counts as
//! outcome unknown.
//!
//! At the end one summary is printed: calls made, failures by cause, fail-overs, sessions
//! lost, re-initializations (control `mcp_affinity_control_reinitializations_total`, both
//! instances), recoveries by outcome (the filters' counters, both Envoys), latency
//! percentiles. Counters of restarted processes are read before each restart and summed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser as _;
use futures::StreamExt;
use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions};
use mcp_affinity_harness::fixtures::redis::RedisServer;
use mcp_affinity_harness::mcp_client::{ACCEPT_BOTH, DEFAULT_PROTOCOL_VERSION, Shape, initialize_body, sse_data};
use mcp_affinity_harness::ts_client::TsClient;
use serde_json::{Value, json};

// ---- settings ------------------------------------------------------------------------

/// The run's knobs, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    duration: Duration,
    sessions: usize,
    lanes: usize,
    think_ms: u64,
    /// Sessions of the official TypeScript MCP SDK client (`SOAK_TS_SESSIONS`, 2; 0: none).
    ts_sessions: usize,
    seed: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => parse_u64(&v).unwrap_or_else(|| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seed = match std::env::var("SOAK_SEED") {
            Ok(v) if !v.trim().is_empty() => parse_u64(&v).unwrap_or_else(|| panic!("SOAK_SEED={v:?} is not a number")),
            _ => {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
                Rng(nanos ^ u64::from(std::process::id())).next()
            }
        };
        let s = Settings {
            duration: Duration::from_secs(env_u64("SOAK_DURATION_SECS", 60)),
            sessions: env_u64("SOAK_SESSIONS", 50) as usize,
            lanes: env_u64("SOAK_LANES", 2) as usize,
            think_ms: env_u64("SOAK_THINK_MS", 100),
            ts_sessions: env_u64("SOAK_TS_SESSIONS", 2) as usize,
            seed,
        };
        assert!(s.sessions >= 1 && s.lanes >= 1, "SOAK_SESSIONS and SOAK_LANES must be ≥ 1");
        assert!(s.duration >= Duration::from_secs(20), "SOAK_DURATION_SECS must be ≥ 20");
        s
    }
}

/// splitmix64: small, seedable, good enough for a schedule.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// An independent stream derived from this one.
    fn fork(&mut self, salt: u64) -> Rng {
        Rng(self.next() ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }
}

// ---- shared state of the traffic -------------------------------------------------------

const ENVOY_NAMES: [&str; 2] = ["A", "B"];
const POD_NAMES: [&str; 3] = ["pod-0", "pod-1", "pod-2"];
/// Every HTTP exchange of the soak's client is bounded by this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A call whose Envoys both refuse connections keeps failing over for at most this long.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);
/// A fault must settle (every session answered through each Envoy) within this.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Failures kept with their details (all are counted).
const KEEP_FAILURES: usize = 200;

/// A moment of the run, microseconds since its start.
type Micros = u64;

/// A pod fault: the pod's sessions died somewhere in `[from, to]` (around the SIGKILL).
#[derive(Debug, Clone)]
struct PodFault {
    pod: usize,
    from: Micros,
    to: Micros,
}

/// What the client knows about one logical MCP session slot (a lost session is replaced
/// by a new one in the same slot).
struct Slot {
    index: usize,
    state: tokio::sync::Mutex<SlotState>,
    /// JSON-RPC ids, unique within the slot (so within each session).
    next_id: AtomicU64,
    /// Generation of the session that has answered a call (it "had been working").
    worked_generation: AtomicU64,
    /// When a call through Envoy A / B last succeeded.
    last_ok: [AtomicU64; 2],
    /// Per lane: when the lane's last finished call started (every call the lane made
    /// before that one has finished too).
    lane_done: Vec<AtomicU64>,
    /// The latest `whoami` observation of the current session.
    seen: Mutex<Option<Seen>>,
    /// The latest `whoami` observations (at most [`HISTORY`]), in the order they finished.
    history: Mutex<std::collections::VecDeque<Seen>>,
}

struct SlotState {
    session_id: String,
    generation: u64,
}

/// `whoami` answered `pod` during the call `[start, end]` of the slot's session
/// `generation`.
#[derive(Debug, Clone)]
struct Seen {
    generation: u64,
    pod: usize,
    start: Micros,
    end: Micros,
}

/// What everybody shares: the Envoys' URLs, the client, the clock, the pod-fault log.
struct Shared {
    urls: [String; 2],
    /// HTTP/1.1 and HTTP/2 (prior knowledge) clients.
    http: [reqwest::Client; 2],
    t0: Instant,
    stop: AtomicBool,
    pod_faults: Mutex<Vec<PodFault>>,
    replay_safe: BTreeSet<String>,
    lost: Mutex<Vec<Lost>>,
    /// Envoy A / B has left the Service: clients send new calls to the other Envoy.
    out_of_service: [AtomicBool; 2],
    /// Calls of the clients in flight to Envoy A / B (from before the connection to the
    /// end of the answer).
    in_flight: [AtomicU64; 2],
}

#[derive(Debug, Clone)]
struct Lost {
    at: Micros,
    slot: usize,
    session_id: String,
    had_worked: bool,
    envoy: usize,
    method: String,
    cause: String,
}

impl Shared {
    fn now(&self) -> Micros {
        self.t0.elapsed().as_micros() as u64
    }

    /// Whether a pod fault overlaps `[from, to]`; `pod` narrows it to one pod.
    fn pod_fault_during(&self, pod: Option<usize>, from: Micros, to: Micros) -> bool {
        self.pod_faults.lock().unwrap().iter().any(|f| pod.is_none_or(|p| p == f.pod) && f.from <= to && f.to >= from)
    }
}

fn secs(t: Micros) -> String {
    format!("{:8.3}s", t as f64 / 1e6)
}

/// A call sent through the Envoys.
struct Sent {
    answer: Answer,
    session_header: Option<String>,
    /// The Envoy that answered (or was tried last).
    envoy: usize,
    /// Connections refused (an Envoy was down): each one retried on the other Envoy.
    refused: u32,
    /// Times the chosen Envoy had left the Service (being stopped): sent to the other.
    out_of_service: u32,
}

/// The answer to one POST.
#[derive(Debug)]
enum Answer {
    /// 2xx with a JSON-RPC result.
    Result(Value),
    /// 2xx with a JSON-RPC error.
    RpcError { status: u16, code: i64, message: String },
    /// A non-2xx answer.
    Http { status: u16, code: Option<i64>, body: String },
    /// The TCP connection to Envoy was refused (or not established in time): the request
    /// was not sent.
    Refused(String),
    /// The exchange broke after the connection was established, before any answer.
    Transport(String),
    /// The answer started (status and headers arrived) and then broke: for the pod's SSE
    /// answers, the pod died after sending its headers and priming event.
    Cut(String),
    /// A 2xx answer that is not what the protocol says.
    Protocol(String),
}

impl Answer {
    /// For the report: everything the answer says.
    fn describe(&self) -> String {
        match self {
            Answer::Result(v) => format!("result {v}"),
            Answer::RpcError { status, code, message } => format!("HTTP {status}, JSON-RPC error {code}: {message}"),
            Answer::Http { status, body, .. } => format!("HTTP {status}: {body}"),
            Answer::Refused(e) => format!("connection refused: {e}"),
            Answer::Transport(e) => format!("transport: {e}"),
            Answer::Cut(e) => format!("answer cut: {e}"),
            Answer::Protocol(e) => format!("protocol: {e}"),
        }
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] slot {} session {} ({}) via Envoy {} on {}: {}",
            secs(self.at),
            self.slot,
            self.session_id,
            if self.had_worked { "had worked" } else { "had not answered yet" },
            ENVOY_NAMES[self.envoy],
            self.method,
            self.cause
        )
    }
}

/// An error with its sources (reqwest's `Display` alone hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn rpc_error_code(body: &str) -> Option<i64> {
    serde_json::from_str::<Value>(body).ok()?.pointer("/error/code")?.as_i64()
}

fn find_response(messages: impl IntoIterator<Item = Value>, id: &Value) -> Option<Value> {
    messages
        .into_iter()
        .find(|m| m.get("id") == Some(id) && (m.get("result").is_some() || m.get("error").is_some()))
}

impl Shared {
    /// One POST of `body` (a JSON-RPC request with `id`, or a notification when `id` is
    /// `None`) on `url`, with `session` as `Mcp-Session-Id` when given.
    async fn post(&self, shape: Shape, url: &str, session: Option<&str>, body: &str, id: Option<u64>) -> (Answer, Option<String>) {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("accept", reqwest::header::HeaderValue::from_static(ACCEPT_BOTH));
        headers.insert("content-type", reqwest::header::HeaderValue::from_static("application/json"));
        headers.insert("mcp-protocol-version", reqwest::header::HeaderValue::from_static(DEFAULT_PROTOCOL_VERSION));
        if let Some(s) = session.and_then(|s| reqwest::header::HeaderValue::from_str(s).ok()) {
            headers.insert("mcp-session-id", s);
        }
        let body = shape.body(body.to_string().into(), &mut headers);
        let req = self.http[usize::from(shape == Shape::Http2)].post(url).headers(headers).body(body);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return (Answer::Refused(chain(&e)), None),
            Err(e) => return (Answer::Transport(format!("no response: {}", chain(&e))), None),
        };
        let status = resp.status().as_u16();
        let session_header = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        if let (Some(mine), Some(seen)) = (session, &session_header)
            && mine != seen
        {
            return (Answer::Protocol(format!("the answer carries session id {seen:?}, not the client's {mine:?}")), session_header);
        }
        let is_sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        if !(200..300).contains(&status) {
            // Classified by its status: an error status is an error answer (a 404 always a
            // lost session) even when its body breaks off.
            let body = resp.text().await.unwrap_or_else(|e| format!("<the body broke: {}>", chain(&e)));
            return (Answer::Http { status, code: rpc_error_code(&body), body }, session_header);
        }
        let Some(id) = id else {
            // A notification: 202, no body expected.
            let _ = resp.bytes().await;
            return (Answer::Result(Value::Null), session_header);
        };
        let id = json!(id);
        let message = if is_sse {
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            loop {
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        buf.extend_from_slice(&chunk);
                        let text = String::from_utf8_lossy(&buf).replace("\r\n", "\n");
                        if let Some(end) = text.rfind("\n\n")
                            && let Some(m) = find_response(sse_data(&text[..end + 2]).iter().filter_map(|d| serde_json::from_str(d).ok()), &id)
                        {
                            break Some(m);
                        }
                    }
                    Some(Err(e)) => {
                        return (
                            Answer::Cut(format!("HTTP {status} SSE answer cut before the response event: {}", chain(&e))),
                            session_header,
                        );
                    }
                    None => {
                        let text = String::from_utf8_lossy(&buf).replace("\r\n", "\n") + "\n\n";
                        break find_response(sse_data(&text).iter().filter_map(|d| serde_json::from_str(d).ok()), &id);
                    }
                }
            }
        } else {
            match resp.bytes().await {
                Ok(b) => match serde_json::from_slice::<Value>(&b) {
                    Ok(Value::Array(items)) => find_response(items, &id),
                    Ok(v) => find_response([v], &id),
                    Err(_) => {
                        return (
                            Answer::Protocol(format!("HTTP {status}, body is not JSON: {}", String::from_utf8_lossy(&b))),
                            session_header,
                        );
                    }
                },
                Err(e) => return (Answer::Cut(format!("HTTP {status} JSON answer cut: {}", chain(&e))), session_header),
            }
        };
        let Some(message) = message else {
            return (Answer::Protocol(format!("HTTP {status}: no response with id {id}")), session_header);
        };
        if let Some(err) = message.get("error") {
            return (
                Answer::RpcError {
                    status,
                    code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                    message: err.get("message").and_then(Value::as_str).unwrap_or_default().to_string(),
                },
                session_header,
            );
        }
        match message.get("result") {
            Some(r) => (Answer::Result(r.clone()), session_header),
            None => (Answer::Protocol(format!("response without result: {message}")), session_header),
        }
    }

    /// [`Shared::post`] through Envoy `envoy`, as a client of a Service over both Envoys:
    /// an Envoy that left the Service (about to be stopped) is not tried, and one whose
    /// connection is refused (stopped, its endpoint not yet removed) is retried on the
    /// other Envoy — back and forth, pausing, while neither takes the call, up to
    /// [`FAILOVER_DEADLINE`].
    async fn post_failover(&self, shape: Shape, envoy: usize, session: Option<&str>, body: &str, id: Option<u64>) -> Sent {
        let deadline = Instant::now() + FAILOVER_DEADLINE;
        let mut sent = Sent { answer: Answer::Result(Value::Null), session_header: None, envoy, refused: 0, out_of_service: 0 };
        loop {
            let e = sent.envoy;
            // Counted in flight before looking at the gate, so that the chaos driver, which
            // closes the gate and then waits for no call in flight, never misses this one.
            self.in_flight[e].fetch_add(1, Ordering::SeqCst);
            let gated = self.out_of_service[e].load(Ordering::SeqCst);
            let answer = if gated {
                None
            } else {
                let (answer, header) = self.post(shape, &self.urls[e], session, body, id).await;
                sent.session_header = header;
                Some(answer)
            };
            self.in_flight[e].fetch_sub(1, Ordering::SeqCst);
            match answer {
                None => sent.out_of_service += 1,
                Some(Answer::Refused(err)) => {
                    sent.refused += 1;
                    if Instant::now() >= deadline {
                        sent.answer = Answer::Transport(format!("no Envoy took the call for {FAILOVER_DEADLINE:?}: {err}"));
                        return sent;
                    }
                }
                Some(answer) => {
                    sent.answer = answer;
                    return sent;
                }
            }
            sent.envoy ^= 1;
            if (sent.refused + sent.out_of_service).is_multiple_of(2) {
                // Neither Envoy took it: wait a little before trying again.
                if Instant::now() >= deadline {
                    sent.answer = Answer::Transport(format!("no Envoy took the call for {FAILOVER_DEADLINE:?}"));
                    return sent;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// `initialize` + `notifications/initialized`, through `envoy` (failing over on
    /// refusal). Returns the new session id.
    async fn open_session(&self, envoy: usize) -> Result<String> {
        let body = initialize_body(0, DEFAULT_PROTOCOL_VERSION).to_string();
        let Sent { answer, session_header: header, envoy: via, .. } = self.post_failover(Shape::OneWrite, envoy, None, &body, Some(0)).await;
        match answer {
            Answer::Result(r) if r.get("protocolVersion").is_some() => {}
            other => bail!("initialize through Envoy {}: {}", ENVOY_NAMES[via], other.describe()),
        }
        let id = header.ok_or_else(|| anyhow!("initialize through Envoy {}: no Mcp-Session-Id", ENVOY_NAMES[via]))?;
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
        let Sent { answer, envoy: via, .. } = self.post_failover(Shape::OneWrite, envoy, Some(&id), &note, None).await;
        match answer {
            Answer::Result(_) => Ok(id),
            other => bail!("notifications/initialized of {id} through Envoy {}: {}", ENVOY_NAMES[via], other.describe()),
        }
    }
}

// ---- the TypeScript SDK lanes --------------------------------------------------------------

/// What the TypeScript SDK lanes counted.
#[derive(Debug, Default)]
struct TsTally {
    sessions: u64,
    calls: u64,
    ok: u64,
    /// `tools/call` answered -32003 "outcome unknown" (a reset after the request was sent);
    /// cross-checked with the filters' `recoveries_not_replayed` like the raw lanes'.
    rpc_32003: u64,
    /// Calls that failed otherwise while a pod had a fault (an SSE answer cut after its
    /// headers); bounded by the pod faults.
    cut_while_a_pod_died: u64,
    failures: Vec<String>,
}

impl TsTally {
    fn merge(&mut self, o: TsTally) {
        self.sessions += o.sessions;
        self.calls += o.calls;
        self.ok += o.ok;
        self.rpc_32003 += o.rpc_32003;
        self.cut_while_a_pod_died += o.cut_while_a_pod_died;
        self.failures.extend(o.failures);
    }
}

/// Waits for `lanes` until `deadline`, handing each one's tally to `merge`; a lane that
/// panicked or did not stop in time (then aborted) is a problem named after `what`.
async fn join_lanes<T>(lanes: Vec<tokio::task::JoinHandle<T>>, deadline: tokio::time::Instant, what: &str, problems: &mut Vec<String>, mut merge: impl FnMut(T)) {
    for mut lane in lanes {
        match tokio::time::timeout_at(deadline, &mut lane).await {
            Ok(Ok(t)) => merge(t),
            Ok(Err(e)) => problems.push(format!("{what} panicked: {e}")),
            Err(_) => {
                lane.abort();
                problems.push(format!("{what} did not stop in time"));
            }
        }
    }
}

/// One session of the official TypeScript MCP SDK client (`tests/clients/ts`, its own HTTP
/// stack and session handling) calling `echo` in a loop through Envoy C until the soak
/// stops. Every call must return its text; the excuses are the raw lanes' (-32003, or a cut
/// while a pod died).
async fn run_ts_lane(shared: Arc<Shared>, url: String, index: usize, think_ms: u64) -> TsTally {
    let mut t = TsTally::default();
    let mut ts = match TsClient::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            t.failures.push(format!("ts{index}: connect: {e:#}"));
            return t;
        }
    };
    t.sessions = 1;
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let text = format!("ts{index}-{n}");
        let start = shared.now();
        let answer = ts.call("echo", json!({"text": text})).await;
        let end = shared.now();
        t.calls += 1;
        match answer {
            Ok(got) if got == text => t.ok += 1,
            Ok(got) => t.failures.push(format!("ts{index} call {n}: echo answered {got:?}")),
            Err(e) if e.to_string().contains("-32003") => t.rpc_32003 += 1,
            Err(e) if shared.pod_fault_during(None, start, end) => {
                t.cut_while_a_pod_died += 1;
                println!("soak: [{}..{}] ts{index} call {n}: failed while a pod died: {e:#}", secs(start), secs(end));
            }
            Err(e) => t.failures.push(format!("ts{index} call {n} [{}..{}]: {e:#}", secs(start), secs(end))),
        }
        tokio::time::sleep(Duration::from_millis(think_ms)).await;
    }
    let _ = ts.close().await;
    t
}

// ---- one lane of traffic -----------------------------------------------------------------

/// The calls the soak makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Ping,
    ToolsList,
    Whoami,
    Echo,
}

impl Call {
    fn pick(rng: &mut Rng) -> Call {
        match rng.below(10) {
            0 | 1 => Call::Ping,
            2 | 3 => Call::ToolsList,
            4..=6 => Call::Whoami,
            _ => Call::Echo,
        }
    }

    fn method(self) -> &'static str {
        match self {
            Call::Ping => "ping",
            Call::ToolsList => "tools/list",
            Call::Whoami | Call::Echo => "tools/call",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Call::Ping => "ping",
            Call::ToolsList => "tools/list",
            Call::Whoami => "tools/call whoami",
            Call::Echo => "tools/call echo",
        }
    }
}

/// A failed call, kept for the report.
#[derive(Debug, Clone)]
struct Failure {
    start: Micros,
    end: Micros,
    slot: usize,
    session_id: String,
    envoy: usize,
    call: Call,
    cause: String,
    detail: String,
}

/// What one lane counted (merged at the end).
#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    ok: u64,
    safe_calls: u64,
    safe_failed: u64,
    tool_calls: u64,
    tool_failed: u64,
    /// -32003 on a `tools/call` with a pod fault during the call.
    outcome_unknown: u64,
    /// Every -32003 the client got (any method, explained or not).
    rpc_32003: u64,
    /// `tools/call` answers cut after their headers while a pod died (outcome unknown to
    /// the client, not -32003: out of the filter's reach).
    tool_cut: u64,
    /// Replay-safe calls sent again after their answer was cut while a pod died.
    safe_resent_after_cut: u64,
    /// Connections refused by a stopped Envoy, each retried on the other Envoy.
    refused: u64,
    /// Calls sent to the other Envoy because the chosen one had left the Service.
    out_of_service: u64,
    calls_failed_over: u64,
    moves: u64,
    unexplained_moves: Vec<String>,
    causes: BTreeMap<String, u64>,
    failures: Vec<Failure>,
    failures_total: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.calls += o.calls;
        self.ok += o.ok;
        self.safe_calls += o.safe_calls;
        self.safe_failed += o.safe_failed;
        self.tool_calls += o.tool_calls;
        self.tool_failed += o.tool_failed;
        self.outcome_unknown += o.outcome_unknown;
        self.rpc_32003 += o.rpc_32003;
        self.tool_cut += o.tool_cut;
        self.safe_resent_after_cut += o.safe_resent_after_cut;
        self.refused += o.refused;
        self.out_of_service += o.out_of_service;
        self.calls_failed_over += o.calls_failed_over;
        self.moves += o.moves;
        self.unexplained_moves.extend(o.unexplained_moves);
        for (k, v) in o.causes {
            *self.causes.entry(k).or_default() += v;
        }
        self.failures_total += o.failures_total;
        self.failures.extend(o.failures);
        self.latencies_us.extend(o.latencies_us);
    }
}

/// The cause of a failed call, as the summary groups them.
fn cause_of(answer: &Answer) -> String {
    match answer {
        Answer::Http { status, code: Some(c), .. } => format!("HTTP {status} JSON-RPC {c}"),
        Answer::Http { status, code: None, .. } => format!("HTTP {status}"),
        Answer::RpcError { code, .. } => format!("JSON-RPC {code}"),
        Answer::Refused(_) => "transport: refused".into(),
        Answer::Transport(d) if d.starts_with("no response") => "transport: no response".into(),
        Answer::Transport(d) if d.starts_with("both Envoys") => "transport: both Envoys refused".into(),
        Answer::Transport(_) => "transport".into(),
        Answer::Cut(_) => "answer cut after its headers".into(),
        Answer::Protocol(_) => "protocol".into(),
        Answer::Result(_) => "wrong result".into(),
    }
}

/// Checks a successful result; `Err` says what is wrong with it.
fn check_result(call: Call, result: &Value, echo_text: &str) -> Result<Option<usize>, String> {
    let text = || result.pointer("/content/0/text").and_then(Value::as_str);
    match call {
        Call::Ping => result.is_object().then_some(None).ok_or_else(|| format!("ping result {result}")),
        Call::ToolsList => {
            let names: BTreeSet<&str> =
                result.get("tools").and_then(Value::as_array).into_iter().flatten().filter_map(|t| t.get("name")?.as_str()).collect();
            (names.contains("echo") && names.contains("whoami")).then_some(None).ok_or_else(|| format!("tools/list result {result}"))
        }
        Call::Echo => (result.get("isError") != Some(&json!(true)) && text() == Some(echo_text))
            .then_some(None)
            .ok_or_else(|| format!("echo of {echo_text:?} answered {result}")),
        Call::Whoami => match text().and_then(|t| POD_NAMES.iter().position(|p| *p == t)) {
            Some(pod) if result.get("isError") != Some(&json!(true)) => Ok(Some(pod)),
            _ => Err(format!("whoami answered {result}")),
        },
    }
}

async fn run_lane(shared: Arc<Shared>, slot: Arc<Slot>, lane: usize, mut rng: Rng, think_ms: u64) -> Tally {
    let mut t = Tally::default();
    let mut envoy = (slot.index + lane) % 2;
    // Lanes take turns at the client shapes: one write, split writes, chunked, HTTP/2.
    let shape = Shape::ALL[(slot.index + lane) % Shape::ALL.len()];
    while !shared.stop.load(Ordering::Relaxed) {
        let (session_id, generation) = {
            let s = slot.state.lock().await;
            (s.session_id.clone(), s.generation)
        };
        let call = Call::pick(&mut rng);
        let id = slot.next_id.fetch_add(1, Ordering::Relaxed);
        let echo_text = format!("s{}-{}-{id}", slot.index, generation);
        let params = match call {
            Call::Ping | Call::ToolsList => json!({}),
            Call::Whoami => json!({"name": "whoami", "arguments": {}}),
            Call::Echo => json!({"name": "echo", "arguments": {"text": echo_text}}),
        };
        let body = json!({"jsonrpc": "2.0", "id": id, "method": call.method(), "params": params}).to_string();
        let safe = shared.replay_safe.contains(call.method());
        let start = shared.now();
        let mut attempt_start = start;
        let mut retries = 0;
        let (mut refused, mut out_of_service) = (0, 0);
        let sent = loop {
            let sent = shared.post_failover(shape, envoy, Some(&session_id), &body, Some(id)).await;
            refused += sent.refused;
            out_of_service += sent.out_of_service;
            // A replay-safe call whose answer was cut because a pod died after it had
            // started answering is sent again (that is what replay-safe means to a client):
            // the answer's headers had already reached the client, out of the filter's reach.
            if safe && retries < 2 && matches!(sent.answer, Answer::Cut(_)) && its_pod_died(&shared, &slot, generation, attempt_start, shared.now()) {
                retries += 1;
                t.safe_resent_after_cut += 1;
                println!(
                    "soak: [{}..{}] slot {} {} via Envoy {}: answer cut while a pod died, sent again: {}",
                    secs(attempt_start),
                    secs(shared.now()),
                    slot.index,
                    call.label(),
                    ENVOY_NAMES[sent.envoy],
                    sent.answer.describe()
                );
                attempt_start = shared.now();
                continue;
            }
            break sent;
        };
        let (answer, via) = (sent.answer, sent.envoy);
        let end = shared.now();
        t.calls += 1;
        if safe { t.safe_calls += 1 } else { t.tool_calls += 1 }
        t.refused += u64::from(refused);
        t.out_of_service += u64::from(out_of_service);
        if refused + out_of_service > 0 {
            t.calls_failed_over += 1;
        }
        let verdict = match &answer {
            Answer::Result(r) => check_result(call, r, &echo_text),
            _ => Err(String::new()),
        };
        match verdict {
            Ok(pod) => {
                t.ok += 1;
                t.latencies_us.push((end - start).min(u64::from(u32::MAX)) as u32);
                slot.last_ok[via].fetch_max(end, Ordering::Relaxed);
                slot.worked_generation.store(generation, Ordering::Relaxed);
                if let Some(pod) = pod {
                    observe(&shared, &slot, &mut t, Seen { generation, pod, start, end });
                }
            }
            Err(wrong) => {
                let cause = if wrong.is_empty() { cause_of(&answer) } else { "wrong result".to_string() };
                let detail = if wrong.is_empty() { answer.describe() } else { wrong };
                let is_32003 = matches!(answer, Answer::RpcError { code: -32003, .. });
                if is_32003 {
                    t.rpc_32003 += 1;
                }
                let pod_died = its_pod_died(&shared, &slot, generation, start, end);
                if !safe && is_32003 && pod_died {
                    t.outcome_unknown += 1;
                } else if !safe && matches!(answer, Answer::Cut(_)) && pod_died {
                    t.tool_cut += 1;
                    println!(
                        "soak: [{}..{}] slot {} {} via Envoy {}: answer cut while a pod died (outcome unknown): {}",
                        secs(start),
                        secs(end),
                        slot.index,
                        call.label(),
                        ENVOY_NAMES[via],
                        answer.describe()
                    );
                } else {
                    if safe { t.safe_failed += 1 } else { t.tool_failed += 1 }
                    let cause = if (is_32003 || matches!(answer, Answer::Cut(_))) && !pod_died {
                        format!("{cause} without a fault of the session's pod during the call")
                    } else {
                        cause.clone()
                    };
                    *t.causes.entry(cause.clone()).or_default() += 1;
                    t.failures_total += 1;
                    if t.failures.len() < KEEP_FAILURES {
                        t.failures.push(Failure { start, end, slot: slot.index, session_id: session_id.clone(), envoy: via, call, cause: cause.clone(), detail });
                    }
                }
                if matches!(answer, Answer::Http { status: 404, .. }) {
                    replace_lost_session(&shared, &slot, generation, via, call, &cause).await;
                }
            }
        }
        slot.lane_done[lane].fetch_max(start, Ordering::Relaxed);
        envoy ^= 1;
        let pause = Duration::from_millis(think_ms / 4 + rng.below(think_ms - think_ms / 4 + 1));
        tokio::time::sleep(pause).await;
    }
    t
}

/// Whether the session's pod may have died during the call `[start, end]`: a pod had a
/// fault during the call, and — when a `whoami` that finished before the call showed
/// where the session lived (the latest such one, kept in the slot's history even when a
/// later observation overlaps the call) — that pod had a fault between that observation
/// and the end of the call (if it did before the call, the session moved somewhere the
/// client has not seen yet, and any pod dying during the call may be its new one). A later
/// observation overlapping the call may already show the session's next pod, so it decides
/// nothing.
fn its_pod_died(shared: &Shared, slot: &Slot, generation: u64, start: Micros, end: Micros) -> bool {
    if !shared.pod_fault_during(None, start, end) {
        return false;
    }
    // The last observation of this session that finished before the call started (an
    // observation overlapping the call may already show the session's next pod).
    let before = slot.history.lock().unwrap().iter().rev().find(|s| s.generation == generation && s.end < start).cloned();
    match before {
        Some(seen) => shared.pod_fault_during(Some(seen.pod), seen.start, end),
        // No pod seen before the call: any pod's fault during the call may be its.
        None => true,
    }
}

/// How many `whoami` observations a slot keeps for [`its_pod_died`].
const HISTORY: usize = 16;

/// Records a `whoami` answer; a change of pod must follow a fault of the previous pod.
fn observe(shared: &Shared, slot: &Slot, t: &mut Tally, now: Seen) {
    {
        let mut history = slot.history.lock().unwrap();
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(now.clone());
    }
    let mut seen = slot.seen.lock().unwrap();
    if let Some(prev) = seen.as_ref()
        && prev.generation == now.generation
        && prev.pod != now.pod
    {
        t.moves += 1;
        // Calls overlap (several lanes): whichever answered first, the pod it named had a
        // fault between that call's start and the other call's end.
        let explained = shared.pod_fault_during(Some(prev.pod), prev.start, now.end) || shared.pod_fault_during(Some(now.pod), now.start, prev.end);
        if !explained {
            t.unexplained_moves.push(format!(
                "slot {} moved {} (seen {}..{}) → {} (seen {}..{}) without a fault of either pod in between",
                slot.index,
                POD_NAMES[prev.pod],
                secs(prev.start),
                secs(prev.end),
                POD_NAMES[now.pod],
                secs(now.start),
                secs(now.end)
            ));
        }
    }
    // The later call is the newer state (a newer session replaces an older one's).
    if seen.as_ref().is_none_or(|p| now.generation > p.generation || (now.generation == p.generation && now.start >= p.start)) {
        *seen = Some(now);
    }
}

/// A 404: the session is gone for the client, which starts a new one (once per session,
/// whichever lane saw it first).
async fn replace_lost_session(shared: &Shared, slot: &Slot, generation: u64, envoy: usize, call: Call, cause: &str) {
    let mut state = slot.state.lock().await;
    if state.generation != generation {
        return;
    }
    shared.lost.lock().unwrap().push(Lost {
        at: shared.now(),
        slot: slot.index,
        session_id: state.session_id.clone(),
        had_worked: slot.worked_generation.load(Ordering::Relaxed) == generation,
        envoy,
        method: call.label().to_string(),
        cause: cause.to_string(),
    });
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        match shared.open_session(envoy).await {
            Ok(id) => {
                state.session_id = id;
                state.generation += 1;
                *slot.seen.lock().unwrap() = None;
                slot.history.lock().unwrap().clear();
                return;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("soak: slot {}: new session failed: {e:#}", slot.index);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                eprintln!("soak: slot {}: giving up on a new session for now: {e:#}", slot.index);
                return;
            }
        }
    }
}

// ---- the mesh and the chaos --------------------------------------------------------------

/// Counters read from processes that restart (they count from 0 again after a restart):
/// read before each restart and at the end, summed.
#[derive(Debug, Default, Clone)]
struct Counters(BTreeMap<String, f64>);

impl Counters {
    fn add(&mut self, k: &str, v: f64) {
        *self.0.entry(k.to_string()).or_default() += v;
    }
    fn get(&self, k: &str) -> f64 {
        self.0.get(k).copied().unwrap_or(0.0)
    }
}

const FILTER_COUNTERS: &[&str] = &[
    "recoveries_replayed",
    "recoveries_not_replayed",
    "recoveries_failed",
    "sessions_verified",
    "unknown_session",
    "requests_unpinned",
    "control_lookups",
    "control_errors",
    "recovery_body_too_large",
];

/// `(name, metric suffix, labels)` of control metrics summed over restarts.
const CONTROL_COUNTERS: &[(&str, &str, &str)] = &[
    ("reinitializations", "reinitializations_total", ""),
    ("recoveries replayed", "recoveries_total", "outcome=\"replayed\""),
    ("recoveries not_replayed", "recoveries_total", "outcome=\"not_replayed\""),
    ("recoveries failed", "recoveries_total", "outcome=\"failed\""),
    ("recoveries alive", "recoveries_total", "outcome=\"alive\""),
    ("replays", "replays_total", ""),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    PodOutage,
    PodRestartInPlace,
    EnvoyRestart(usize),
    ControlRestart(usize),
    RedisRestart,
}

#[derive(Debug, Clone)]
struct Fault {
    kind: FaultKind,
    pod: usize,
    down: Duration,
    gap: Duration,
}

/// The seeded schedule: rounds, each a permutation of every fault kind (two pod outages
/// on different pods and one restart in place).
struct Schedule {
    rng: Rng,
    round: Vec<Fault>,
    rounds: u64,
}

impl Schedule {
    fn next(&mut self) -> (u64, Fault) {
        if self.round.is_empty() {
            self.rounds += 1;
            let rng = &mut self.rng;
            let mut pods = [0, 1, 2];
            rng.shuffle(&mut pods);
            let mut kinds = vec![
                (FaultKind::PodOutage, pods[0]),
                (FaultKind::PodOutage, pods[1]),
                (FaultKind::PodRestartInPlace, pods[2]),
                (FaultKind::EnvoyRestart(0), 0),
                (FaultKind::EnvoyRestart(1), 0),
                (FaultKind::ControlRestart(0), 0),
                (FaultKind::ControlRestart(1), 0),
                (FaultKind::RedisRestart, 0),
            ];
            rng.shuffle(&mut kinds);
            self.round = kinds
                .into_iter()
                .rev()
                .map(|(kind, pod)| {
                    let down = match kind {
                        FaultKind::PodOutage => rng.millis(1000, 3500),
                        FaultKind::PodRestartInPlace => Duration::ZERO,
                        FaultKind::EnvoyRestart(_) => rng.millis(300, 2000),
                        FaultKind::ControlRestart(_) | FaultKind::RedisRestart => rng.millis(200, 1500),
                    };
                    Fault { kind, pod, down, gap: rng.millis(500, 2000) }
                })
                .collect();
        }
        (self.rounds, self.round.pop().expect("a round has faults"))
    }
}

/// The plugin configuration shipped in `envoy/envoy.yaml` (the soak runs the filter as
/// deployed: its control and recovery timeouts, not the fixtures' shorter ones), and the
/// environment variable it reads control's token from.
fn shipped_plugin_config() -> Result<(String, String)> {
    let path = mcp_affinity_harness::envoy::shipped_bootstrap();
    let config = mcp_affinity_harness::envoy::plugin_configuration(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("the wasm filter configuration in {}", path.display()))?;
    let json: Value = serde_json::from_str(&config).context("the shipped plugin configuration is JSON")?;
    let token_env = json
        .pointer("/control/token_env")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the shipped plugin configuration has no control.token_env: {json}"))?
        .to_string();
    Ok((config, token_env))
}

struct Mesh {
    pods: Vec<Pod>,
    redis: RedisServer,
    redis_dir: PathBuf,
    controls: Vec<ControlService>,
    envoys: Vec<Proxy>,
    /// Envoy C: the TypeScript SDK lanes' (never restarted: the SDK's client fails over to
    /// no other Envoy), paired with control 1.
    ts_envoy: Proxy,
    filter: [Counters; 2],
    control: [Counters; 2],
}

impl Mesh {
    fn start() -> Result<Mesh> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let redis_dir = std::env::temp_dir().join(format!("mcp-affinity-soak-redis-{}-{nanos}", std::process::id()));
        let redis = RedisServer::start_persistent(&redis_dir).context("redis")?;
        let pods: Vec<Pod> = POD_NAMES.iter().map(|n| Pod::start(n)).collect::<Result<_>>().context("pods")?;
        let endpoints = pods.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",");
        let controls = (0..2)
            .map(|_| ControlService::start_with(&redis.url(), &["--endpoints".into(), endpoints.clone()]))
            .collect::<Result<Vec<_>>>()
            .context("control")?;
        let upstreams: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
        let (filter_config, token_env) = shipped_plugin_config()?;
        let envoy = |c: &ControlService| {
            Proxy::start(
                &upstreams,
                ProxyOptions {
                    filter_config: filter_config.clone(),
                    clusters: vec![c.proxy_cluster()],
                    vm_env: vec![(token_env.clone(), TEST_TOKEN.into())],
                    concurrency: Some(2),
                    ..Default::default()
                },
            )
        };
        let envoys = controls.iter().map(envoy).collect::<Result<Vec<_>>>().context("envoy")?;
        let ts_envoy = envoy(&controls[0]).context("envoy C")?;
        Ok(Mesh { pods, redis, redis_dir, controls, envoys, ts_envoy, filter: Default::default(), control: Default::default() })
    }

    async fn read_filter(&mut self, i: usize) -> Result<()> {
        for name in FILTER_COUNTERS {
            let v = self.envoys[i].metric(name).await.with_context(|| format!("Envoy {} {name}", ENVOY_NAMES[i]))?;
            self.filter[i].add(name, v as f64);
        }
        Ok(())
    }

    async fn read_control(&mut self, i: usize) -> Result<()> {
        for (name, suffix, labels) in CONTROL_COUNTERS {
            let v = self.controls[i].metric(suffix, labels).await.with_context(|| format!("control {} {suffix}", i + 1))?;
            self.control[i].add(name, v);
        }
        Ok(())
    }

    async fn envoy_stat(&self, i: usize, name: &str) -> Result<i64> {
        let text = reqwest::get(format!("http://{}/stats?filter={name}", self.envoys[i].admin)).await?.text().await?;
        text.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().parse::<i64>()))
            .ok_or_else(|| anyhow!("no stat {name} in {text:?}"))?
            .context("stat value")
    }

    fn redis_keys(&self) -> Result<u64> {
        let reply = self.redis.command(&["DBSIZE"])?;
        reply.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("DBSIZE answered {reply:?}"))
    }
}

async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the chaos driver did.
#[derive(Debug, Default)]
struct ChaosLog {
    timeline: Vec<String>,
    counts: BTreeMap<String, u64>,
    rounds_done: u64,
    settle_timeouts: Vec<String>,
    problems: Vec<String>,
    redis_keys: Vec<(u64, u64)>,
    max_settle: Duration,
}

struct Chaos<'a> {
    mesh: &'a mut Mesh,
    shared: &'a Shared,
    slots: &'a [Arc<Slot>],
    log: ChaosLog,
}

impl Chaos<'_> {
    fn note(&mut self, line: String) {
        let line = format!("[{}] {line}", secs(self.shared.now()));
        println!("soak: {line}");
        self.log.timeline.push(line);
    }

    /// Runs one fault to its end (the system healthy again). Errors are problems of the
    /// harness or of a process that does not come back.
    async fn run(&mut self, f: &Fault) -> Result<()> {
        match f.kind {
            FaultKind::PodOutage | FaultKind::PodRestartInPlace => {
                let name = POD_NAMES[f.pod];
                // Registered (open-ended) before the kill: a call that sees its effect checks
                // the log as soon as it ends, maybe before the kill returns.
                let from = self.shared.now();
                let at = {
                    let mut faults = self.shared.pod_faults.lock().unwrap();
                    faults.push(PodFault { pod: f.pod, from, to: Micros::MAX });
                    faults.len() - 1
                };
                let close = |to: Micros| self.shared.pod_faults.lock().unwrap()[at].to = to;
                if f.kind == FaultKind::PodRestartInPlace {
                    let restarted = tokio::task::block_in_place(|| self.mesh.pods[f.pod].restart());
                    let to = self.shared.now();
                    close(to);
                    restarted?;
                    self.note(format!("pod {name}: SIGKILL + restart in place (sessions lost) during [{}, {}]", secs(from), secs(to)));
                } else {
                    tokio::task::block_in_place(|| self.mesh.pods[f.pod].kill());
                    let to = self.shared.now();
                    close(to);
                    self.note(format!("pod {name}: SIGKILL during [{}, {}], down for {:?}", secs(from), secs(to), f.down));
                    tokio::time::sleep(f.down).await;
                    tokio::task::block_in_place(|| self.mesh.pods[f.pod].restart())?;
                    self.note(format!("pod {name}: restarted in place"));
                }
            }
            FaultKind::EnvoyRestart(i) => {
                let name = ENVOY_NAMES[i];
                // Replaced the way a Service replaces an Envoy pod: it leaves the Service
                // (clients send new calls to the other Envoy), the calls in flight finish,
                // then it stops. Stopping a listener with calls still arriving would reset
                // connections the kernel had accepted for it: calls whose outcome the client
                // could not know.
                self.shared.out_of_service[i].store(true, Ordering::SeqCst);
                let shared = self.shared;
                let drained = poll_until(&format!("Envoy {name}: client calls in flight finish"), REQUEST_TIMEOUT + Duration::from_secs(10), || async move {
                    shared.in_flight[i].load(Ordering::SeqCst) == 0
                })
                .await?;
                let mesh = &*self.mesh;
                poll_until(&format!("Envoy {name}: no request active (http.mcp.downstream_rq_active) once no client call is in flight"), Duration::from_secs(5), || async move {
                    mesh.envoy_stat(i, "http.mcp.downstream_rq_active").await.is_ok_and(|n| n == 0)
                })
                .await?;
                self.mesh.read_filter(i).await?;
                tokio::task::block_in_place(|| self.mesh.envoys[i].kill());
                // Back in the Service while it is down (endpoints lag behind a dead pod):
                // clients try it, are refused, and fail over.
                self.shared.out_of_service[i].store(false, Ordering::SeqCst);
                self.note(format!(
                    "Envoy {name}: left the Service, in-flight calls done after {drained:?}, counters read, SIGKILL, down for {:?} (connections refused)",
                    f.down
                ));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.envoys[i].restart())?;
                self.note(format!("Envoy {name}: restarted (empty shared data)"));
            }
            FaultKind::ControlRestart(i) => {
                self.mesh.read_control(i).await?;
                tokio::task::block_in_place(|| self.mesh.controls[i].kill());
                self.note(format!("control {}: counters read, SIGKILL, down for {:?}", i + 1, f.down));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.controls[i].restart())?;
                self.note(format!("control {}: restarted", i + 1));
            }
            FaultKind::RedisRestart => {
                let before = self.mesh.redis_keys()?;
                tokio::task::block_in_place(|| self.mesh.redis.kill());
                self.note(format!("redis: {before} keys, SIGKILL, down for {:?}", f.down));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.redis.restart())?;
                let after = self.mesh.redis_keys()?;
                self.log.redis_keys.push((before, after));
                let bases: Vec<String> = self.mesh.controls.iter().map(|c| c.base_url()).collect();
                let ready = poll_until("both controls ready after the Redis restart", Duration::from_secs(15), || {
                    let bases = bases.clone();
                    async move {
                        for b in &bases {
                            match reqwest::get(format!("{b}/readyz")).await {
                                Ok(r) if r.status().is_success() => {}
                                _ => return false,
                            }
                        }
                        true
                    }
                })
                .await?;
                self.note(format!("redis: restarted from its append-only file with {after} keys; controls ready after {ready:?}"));
            }
        }
        *self.log.counts.entry(fault_label(f.kind)).or_default() += 1;
        Ok(())
    }

    /// Waits until every session has answered through each Envoy since `since`, and every
    /// call in flight at `since` has finished (so no recovery the fault caused is still
    /// running when the next fault starts).
    async fn settle(&mut self, since: Micros, what: &str) {
        let slots = self.slots;
        let r = poll_until(&format!("settle after {what}"), SETTLE_TIMEOUT, || async move {
            slots.iter().all(|s| {
                s.last_ok.iter().all(|t| t.load(Ordering::Relaxed) > since) && s.lane_done.iter().all(|t| t.load(Ordering::Relaxed) > since)
            })
        })
        .await;
        match r {
            Ok(d) => self.log.max_settle = self.log.max_settle.max(d),
            Err(e) => {
                let behind: Vec<usize> =
                    slots.iter().filter(|s| s.last_ok.iter().chain(&s.lane_done).any(|t| t.load(Ordering::Relaxed) <= since)).map(|s| s.index).collect();
                let line = format!("{e:#}; slots without a success through both Envoys (or with a call in flight) since: {behind:?}");
                self.note(format!("SETTLE TIMEOUT: {line}"));
                self.log.settle_timeouts.push(line);
            }
        }
    }
}

fn fault_label(k: FaultKind) -> String {
    match k {
        FaultKind::PodOutage => "pod outage (kill, down, restart in place)".into(),
        FaultKind::PodRestartInPlace => "pod restart in place (immediate)".into(),
        FaultKind::EnvoyRestart(i) => format!("Envoy {} restart", ENVOY_NAMES[i]),
        FaultKind::ControlRestart(i) => format!("control {} restart", i + 1),
        FaultKind::RedisRestart => "Redis restart (AOF kept)".into(),
    }
}

// ---- the test ------------------------------------------------------------------------------

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_loses_nothing() {
    let settings = Settings::from_env();
    println!(
        "soak: seed {:#018x} (SOAK_SEED={:#x} replays the schedule), {} s, {} sessions × {} lanes",
        settings.seed,
        settings.seed,
        settings.duration.as_secs(),
        settings.sessions,
        settings.lanes
    );
    let mut rng = Rng(settings.seed);
    let mut schedule = Schedule { rng: rng.fork(1), round: Vec::new(), rounds: 0 };

    let mut mesh = tokio::task::block_in_place(Mesh::start).expect("start the mesh");
    let replay_safe: BTreeSet<String> = mcp_affinity_control::config::Config::try_parse_from(["mcp-affinity-control"])
        .expect("control's default flags")
        .replay_safe_methods
        .into_iter()
        .collect();
    assert!(replay_safe.contains("ping") && replay_safe.contains("tools/list") && !replay_safe.contains("tools/call"), "{replay_safe:?}");

    let client = |h2: bool| {
        let b = reqwest::Client::builder()
            .no_proxy()
            // A connection per request: a stopped Envoy refuses it (see the module docs).
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(1))
            .timeout(REQUEST_TIMEOUT);
        if h2 { b.http2_prior_knowledge() } else { b.http1_only() }.build().unwrap()
    };
    let http = [client(false), client(true)];
    let shared = Arc::new(Shared {
        urls: [mesh.envoys[0].url(), mesh.envoys[1].url()],
        http,
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        pod_faults: Mutex::new(Vec::new()),
        replay_safe,
        lost: Mutex::new(Vec::new()),
        out_of_service: [AtomicBool::new(false), AtomicBool::new(false)],
        in_flight: [AtomicU64::new(0), AtomicU64::new(0)],
    });

    // Sessions, opened alternately through A and B before any chaos.
    let opened = futures::future::join_all((0..settings.sessions).map(|i| {
        let shared = shared.clone();
        async move { shared.open_session(i % 2).await.with_context(|| format!("open session {i}")) }
    }))
    .await;
    let slots: Vec<Arc<Slot>> = opened
        .into_iter()
        .enumerate()
        .map(|(index, id)| {
            Arc::new(Slot {
                index,
                state: tokio::sync::Mutex::new(SlotState { session_id: id.expect("initial sessions"), generation: 1 }),
                next_id: AtomicU64::new(1),
                worked_generation: AtomicU64::new(0),
                last_ok: [AtomicU64::new(0), AtomicU64::new(0)],
                lane_done: (0..settings.lanes).map(|_| AtomicU64::new(0)).collect(),
                seen: Mutex::new(None),
                history: Mutex::new(std::collections::VecDeque::new()),
            })
        })
        .collect();
    println!("soak: [{}] {} sessions open; traffic starts", secs(shared.now()), slots.len());

    let traffic_start = Instant::now();
    let lanes: Vec<_> = slots
        .iter()
        .flat_map(|slot| (0..settings.lanes).map(move |lane| (slot.clone(), lane)))
        .map(|(slot, lane)| {
            let lane_rng = rng.fork(1000 + (slot.index * 16 + lane) as u64);
            tokio::spawn(run_lane(shared.clone(), slot, lane, lane_rng, settings.think_ms))
        })
        .collect();
    let ts_lanes: Vec<_> = (0..settings.ts_sessions).map(|i| tokio::spawn(run_ts_lane(shared.clone(), mesh.ts_envoy.url(), i, settings.think_ms))).collect();

    // Chaos: warm-up, then faults one at a time until too little time is left for one
    // more fault and its settling (the first round always completes).
    let quiet_tail = Duration::from_secs(8);
    let mut chaos = Chaos { mesh: &mut mesh, shared: &shared, slots: &slots, log: ChaosLog::default() };
    chaos.settle(0, "warm-up").await;
    loop {
        let (round, fault) = schedule.next();
        let left = settings.duration.saturating_sub(traffic_start.elapsed());
        if round > 1 && left < quiet_tail + fault.down + fault.gap + Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(fault.gap).await;
        if let Err(e) = chaos.run(&fault).await {
            let line = format!("fault {:?} failed: {e:#}", fault.kind);
            chaos.note(line.clone());
            chaos.log.problems.push(line);
            break;
        }
        let end = shared.now();
        chaos.settle(end, &fault_label(fault.kind)).await;
        if schedule.round.is_empty() {
            chaos.log.rounds_done = round;
        }
    }
    let chaos_end = traffic_start.elapsed();
    let mut log = std::mem::take(&mut chaos.log);
    drop(chaos);
    // Quiet traffic until the duration is over (at least the quiet tail).
    let until = settings.duration.max(chaos_end + quiet_tail);
    tokio::time::sleep(until.saturating_sub(traffic_start.elapsed())).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    // A lane stops after its current call (bounded by the request and fail-over deadlines).
    let join_deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT + FAILOVER_DEADLINE + Duration::from_secs(10);
    join_lanes(lanes, join_deadline, "a lane", &mut log.problems, |t| tally.merge(t)).await;
    let mut ts = TsTally::default();
    join_lanes(ts_lanes, join_deadline, "a TypeScript SDK lane", &mut log.problems, |t| ts.merge(t)).await;
    let ts_not_replayed = mesh.ts_envoy.metric("recoveries_not_replayed").await.unwrap_or(-1) as f64;
    let traffic_secs = traffic_start.elapsed().as_secs_f64();
    for (i, name) in ENVOY_NAMES.iter().enumerate() {
        if let Err(e) = mesh.read_filter(i).await {
            log.problems.push(format!("final filter counters of Envoy {name}: {e:#}"));
        }
        if let Err(e) = mesh.read_control(i).await {
            log.problems.push(format!("final control counters of control {}: {e:#}", i + 1));
        }
    }

    // ---- the summary ----
    let filter = |k: &str| mesh.filter[0].get(k) + mesh.filter[1].get(k);
    let control = |k: &str| mesh.control[0].get(k) + mesh.control[1].get(k);
    let lost = shared.lost.lock().unwrap().clone();
    let lost_working = lost.iter().filter(|l| l.had_worked).count();
    let mut lat = std::mem::take(&mut tally.latencies_us);
    lat.sort_unstable();
    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(s, "================ mcp-affinity chaos soak: summary ================");
    let _ = writeln!(
        s,
        "seed {:#018x} | traffic {traffic_secs:.1} s | {} sessions × {} lanes | 2 Envoys (--concurrency 2) → 2 controls → Redis (AOF) | 3 pods",
        settings.seed, settings.sessions, settings.lanes
    );
    let _ = writeln!(
        s,
        "faults: {} (complete rounds: {}; longest settle {:?}): {}",
        log.counts.values().sum::<u64>(),
        log.rounds_done,
        log.max_settle,
        log.counts.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        s,
        "calls: {} made, {} ok ({:.0}/s) | replay-safe (ping, tools/list): {} made, {} failed | tools/call: {} made, {} failed",
        tally.calls,
        tally.ok,
        tally.calls as f64 / traffic_secs,
        tally.safe_calls,
        tally.safe_failed,
        tally.tool_calls,
        tally.tool_failed
    );
    let _ = writeln!(
        s,
        "failed by cause: {}",
        if tally.causes.is_empty() {
            "none".to_string()
        } else {
            tally.causes.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        }
    );
    let _ = writeln!(
        s,
        "outcome unknown (tools/call -32003 while a pod died, not replayed; not failures): {} | all -32003 seen by the client: {} | filter recoveries_not_replayed: {}",
        tally.outcome_unknown,
        tally.rpc_32003,
        filter("recoveries_not_replayed")
    );
    let _ = writeln!(
        s,
        "answers cut after their headers while a pod died (out of the filter's reach; not failures): tools/call {} (outcome unknown), replay-safe {} (sent again)",
        tally.tool_cut, tally.safe_resent_after_cut
    );
    let _ = writeln!(
        s,
        "fail-overs to the other Envoy (not failures): {} connections refused by a stopped Envoy, {} calls while an Envoy was leaving the Service; {} calls concerned",
        tally.refused, tally.out_of_service, tally.calls_failed_over
    );
    let _ = writeln!(s, "sessions lost: {} ({} after having worked)", lost.len(), lost_working);
    let _ = writeln!(
        s,
        "re-initializations (control, both instances): {} | control recoveries: replayed {}, not_replayed {}, failed {}, alive {} | replays {}",
        control("reinitializations"),
        control("recoveries replayed"),
        control("recoveries not_replayed"),
        control("recoveries failed"),
        control("recoveries alive"),
        control("replays")
    );
    let _ = writeln!(
        s,
        "recoveries (filters, both Envoys): replayed {}, not_replayed {}, failed {} | unknown_session {}, requests_unpinned {}, control_lookups {}, control_errors {}",
        filter("recoveries_replayed"),
        filter("recoveries_not_replayed"),
        filter("recoveries_failed"),
        filter("unknown_session"),
        filter("requests_unpinned"),
        filter("control_lookups"),
        filter("control_errors")
    );
    let redis = if log.redis_keys.iter().all(|(a, b)| a == b) {
        let counts: BTreeSet<u64> = log.redis_keys.iter().map(|(a, _)| *a).collect();
        format!("{} restarts, every key kept ({})", log.redis_keys.len(), counts.iter().map(|n| format!("{n}→{n}")).collect::<Vec<_>>().join(", "))
    } else {
        log.redis_keys.iter().map(|(a, b)| format!("{a}→{b}")).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(
        s,
        "session moves (whoami changed pod): {}, unexplained: {} | Redis keys before→after restart: {redis}",
        tally.moves,
        tally.unexplained_moves.len()
    );
    let _ = writeln!(
        s,
        "latency of successful calls: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    let _ = writeln!(
        s,
        "TypeScript SDK client (through Envoy C): {} sessions, {} calls, {} ok, {} -32003 (Envoy C recoveries_not_replayed {ts_not_replayed}), {} cut while a pod died, {} failed",
        ts.sessions,
        ts.calls,
        ts.ok,
        ts.rpc_32003,
        ts.cut_while_a_pod_died,
        ts.failures.len()
    );

    // ---- the verdict ----
    let mut violations: Vec<String> = Vec::new();
    if !lost.is_empty() {
        let lines: Vec<String> = lost.iter().take(20).map(|l| format!("  {l}")).collect();
        violations.push(format!("{} sessions lost:\n{}", lost.len(), lines.join("\n")));
    }
    if tally.safe_failed > 0 {
        violations.push(format!("{} replay-safe calls failed", tally.safe_failed));
    }
    if tally.tool_failed > 0 {
        violations.push(format!("{} tools/call failed otherwise than -32003 during a pod fault", tally.tool_failed));
    }
    // A cut answer is excused only by a fault of its session's pod during the call; and a pod
    // fault can cut at most the calls in flight at once (one per lane of each session).
    let pod_faults = shared.pod_faults.lock().unwrap().len() as u64;
    let cut_bound = pod_faults * (settings.sessions * settings.lanes) as u64;
    if tally.tool_cut + tally.safe_resent_after_cut > cut_bound {
        violations.push(format!(
            "{} answers cut while a pod died, more than {pod_faults} pod faults can cut ({cut_bound}: sessions × lanes each)",
            tally.tool_cut + tally.safe_resent_after_cut
        ));
    }
    if tally.rpc_32003 as f64 != filter("recoveries_not_replayed") {
        violations.push(format!(
            "the client saw {} -32003 answers, the filters counted {} recoveries_not_replayed",
            tally.rpc_32003,
            filter("recoveries_not_replayed")
        ));
    }
    if ts.rpc_32003 as f64 != ts_not_replayed {
        violations.push(format!("the TypeScript SDK saw {} -32003 answers, Envoy C's filter counted {ts_not_replayed} recoveries_not_replayed", ts.rpc_32003));
    }
    if !ts.failures.is_empty() {
        let lines: Vec<String> = ts.failures.iter().take(20).map(|l| format!("  {l}")).collect();
        violations.push(format!("{} TypeScript SDK calls failed:\n{}", ts.failures.len(), lines.join("\n")));
    }
    if ts.sessions != settings.ts_sessions as u64 || (settings.ts_sessions > 0 && ts.ok == 0) {
        violations.push(format!("TypeScript SDK lanes: {} of {} sessions ran, {} calls ok", ts.sessions, settings.ts_sessions, ts.ok));
    }
    if ts.cut_while_a_pod_died > pod_faults * settings.ts_sessions as u64 {
        violations.push(format!("{} TypeScript SDK calls cut while a pod died, more than {pod_faults} pod faults can cut", ts.cut_while_a_pod_died));
    }
    if filter("recoveries_failed") > 0.0 {
        violations.push(format!("the filters counted {} recoveries_failed", filter("recoveries_failed")));
    }
    if !tally.unexplained_moves.is_empty() {
        violations.push(format!("unexplained session moves: {:#?}", &tally.unexplained_moves[..tally.unexplained_moves.len().min(20)]));
    }
    if !log.settle_timeouts.is_empty() {
        violations.push(format!("faults that did not settle: {:#?}", log.settle_timeouts));
    }
    if let Some((a, b)) = log.redis_keys.iter().find(|(a, b)| a != b) {
        violations.push(format!("Redis had {a} keys before its restart and {b} after"));
    }
    if log.rounds_done < 1 {
        violations.push("the first round of faults did not complete".into());
    }
    violations.extend(log.problems.iter().cloned());
    let _ = writeln!(s, "verdict: {}", if violations.is_empty() { "PASS — nothing lost" } else { "FAIL" });
    let _ = write!(s, "==================================================================");
    println!("{s}");

    if !violations.is_empty() {
        let mut failures = std::mem::take(&mut tally.failures);
        failures.sort_by_key(|f| f.start);
        let details: Vec<String> = failures
            .iter()
            .take(40)
            .map(|f| {
                format!(
                    "[{}..{}] slot {} session {} via Envoy {} {}: {} — {}",
                    secs(f.start),
                    secs(f.end),
                    f.slot,
                    f.session_id,
                    ENVOY_NAMES[f.envoy],
                    f.call.label(),
                    f.cause,
                    f.detail.chars().take(400).collect::<String>()
                )
            })
            .collect();
        let _ = std::fs::remove_dir_all(&mesh.redis_dir);
        panic!(
            "chaos soak failed (seed {:#x}; replay with SOAK_SEED={:#x}):\n- {}\n\nfailed calls (first {} of {}):\n{}\n\nchaos timeline:\n{}\n\n{s}",
            settings.seed,
            settings.seed,
            violations.join("\n- "),
            details.len(),
            tally.failures_total,
            details.join("\n"),
            log.timeline.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&mesh.redis_dir);
}
