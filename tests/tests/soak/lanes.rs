//! The traffic: a lane is one of a session slot's concurrent callers, alternating between
//! Envoys A and B in the client shape its turn gives it, picking seeded calls and checking
//! every answer (which failures a fault of the session's pod excuses, which `whoami` moves
//! it explains, a lost session replaced); beside them, the TypeScript SDK lanes through
//! Envoy C. What they count is `tally.rs`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_affinity_harness::mcp_client::Shape;
use mcp_affinity_harness::ts_client::TsClient;
use serde_json::{Value, json};

use crate::client::{Answer, Micros, REQUEST_TIMEOUT, Shared, secs};
use crate::mesh::{ENVOY_NAMES, POD_NAMES};
use crate::schedule::Rng;
use crate::tally::{Failure, Tally, TsTally};

/// Failures kept with their details (all are counted).
const KEEP_FAILURES: usize = 200;

/// What the client knows about one logical MCP session slot (a lost session is replaced
/// by a new one in the same slot).
pub struct Slot {
    pub index: usize,
    pub state: tokio::sync::Mutex<SlotState>,
    /// JSON-RPC ids, unique within the slot (so within each session).
    pub next_id: AtomicU64,
    /// Generation of the session that has answered a call (it "had been working").
    pub worked_generation: AtomicU64,
    /// When a call through Envoy A / B last succeeded.
    pub last_ok: [AtomicU64; 2],
    /// Per lane: when the lane's last finished call started (every call the lane made
    /// before that one has finished too).
    pub lane_done: Vec<AtomicU64>,
    /// The latest `whoami` observation of the current session.
    pub seen: Mutex<Option<Seen>>,
    /// The latest `whoami` observations (at most [`HISTORY`]), in the order they finished.
    pub history: Mutex<std::collections::VecDeque<Seen>>,
}

impl Slot {
    /// Slot `index` with its first session, `session_id`, driven by `lanes` lanes.
    pub fn new(index: usize, session_id: String, lanes: usize) -> Slot {
        Slot {
            index,
            state: tokio::sync::Mutex::new(SlotState { session_id, generation: 1 }),
            next_id: AtomicU64::new(1),
            worked_generation: AtomicU64::new(0),
            last_ok: [AtomicU64::new(0), AtomicU64::new(0)],
            lane_done: (0..lanes).map(|_| AtomicU64::new(0)).collect(),
            seen: Mutex::new(None),
            history: Mutex::new(std::collections::VecDeque::new()),
        }
    }
}

pub struct SlotState {
    pub session_id: String,
    pub generation: u64,
}

/// `whoami` answered `pod` during the call `[start, end]` of the slot's session
/// `generation`.
#[derive(Debug, Clone)]
pub struct Seen {
    pub generation: u64,
    pub pod: usize,
    pub start: Micros,
    pub end: Micros,
}

/// A session the client lost (a 404 on it), for the report.
#[derive(Debug, Clone)]
pub struct Lost {
    pub at: Micros,
    pub slot: usize,
    pub session_id: String,
    pub had_worked: bool,
    pub envoy: usize,
    pub method: String,
    pub cause: String,
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

/// The calls the soak makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Ping,
    ToolsList,
    Whoami,
    Echo,
}

impl Call {
    pub fn pick(rng: &mut Rng) -> Call {
        match rng.below(10) {
            0 | 1 => Call::Ping,
            2 | 3 => Call::ToolsList,
            4..=6 => Call::Whoami,
            _ => Call::Echo,
        }
    }

    pub fn method(self) -> &'static str {
        match self {
            Call::Ping => "ping",
            Call::ToolsList => "tools/list",
            Call::Whoami | Call::Echo => "tools/call",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Call::Ping => "ping",
            Call::ToolsList => "tools/list",
            Call::Whoami => "tools/call whoami",
            Call::Echo => "tools/call echo",
        }
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

pub async fn run_lane(shared: Arc<Shared>, slot: Arc<Slot>, lane: usize, mut rng: Rng, think_ms: u64) -> Tally {
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

/// Waits for `lanes` until `deadline`, handing each one's tally to `merge`; a lane that
/// panicked or did not stop in time (then aborted) is a problem named after `what`.
pub async fn join_lanes<T>(lanes: Vec<tokio::task::JoinHandle<T>>, deadline: tokio::time::Instant, what: &str, problems: &mut Vec<String>, mut merge: impl FnMut(T)) {
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
pub async fn run_ts_lane(shared: Arc<Shared>, url: String, index: usize, think_ms: u64) -> TsTally {
    let mut t = TsTally::default();
    // A connect whose `initialize` meets a pod's death fails like any request cut then; a
    // client connects again (twice at most here, and only then).
    let mut ts = loop {
        let start = shared.now();
        match TsClient::connect(&url).await {
            Ok(c) => break c,
            Err(e) if t.connects_retried < 2 && shared.pod_fault_during(None, start, shared.now()) => {
                println!("soak: ts{index}: connect failed while a pod died, connecting again: {e:#}");
                t.connects_retried += 1;
            }
            Err(e) => {
                t.failures.push(format!("ts{index}: connect: {e:#}"));
                return t;
            }
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
