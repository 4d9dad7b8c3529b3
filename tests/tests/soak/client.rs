//! The soak's MCP client and what the traffic shares ([`Shared`]): the clock, the stop
//! flag, the pod-fault log, the Envoys' Service gates. One POST, read to its JSON-RPC
//! answer and classified ([`Answer`]); fail-over between Envoys A and B as a client of a
//! Service over both; opening a session.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures::StreamExt;
use mcp_affinity_harness::mcp_client::{ACCEPT_BOTH, DEFAULT_PROTOCOL_VERSION, Shape, initialize_body, sse_data};
use serde_json::{Value, json};

use crate::lanes::Lost;
use crate::mesh::ENVOY_NAMES;

/// Every HTTP exchange of the soak's client is bounded by this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A call whose Envoys both refuse connections keeps failing over for at most this long.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);

/// A moment of the run, microseconds since its start.
pub type Micros = u64;

/// A pod fault: the pod's sessions died somewhere in `[from, to]` (around the SIGKILL).
#[derive(Debug, Clone)]
pub struct PodFault {
    pub pod: usize,
    pub from: Micros,
    pub to: Micros,
}

/// What everybody shares: the Envoys' URLs, the client, the clock, the pod-fault log.
pub struct Shared {
    pub urls: [String; 2],
    /// HTTP/1.1 and HTTP/2 (prior knowledge) clients.
    pub http: [reqwest::Client; 2],
    pub t0: Instant,
    pub stop: AtomicBool,
    pub pod_faults: Mutex<Vec<PodFault>>,
    pub replay_safe: BTreeSet<String>,
    pub lost: Mutex<Vec<Lost>>,
    /// Envoy A / B has left the Service: clients send new calls to the other Envoy.
    pub out_of_service: [AtomicBool; 2],
    /// Calls of the clients in flight to Envoy A / B (from before the connection to the
    /// end of the answer).
    pub in_flight: [AtomicU64; 2],
}

impl Shared {
    /// The traffic's shared state before it starts, its client sending to `urls` (Envoys
    /// A and B).
    pub fn new(urls: [String; 2], replay_safe: BTreeSet<String>) -> Shared {
        let client = |h2: bool| {
            let b = reqwest::Client::builder()
                .no_proxy()
                // A connection per request: a stopped Envoy refuses it (see the test's docs).
                .pool_max_idle_per_host(0)
                .connect_timeout(Duration::from_secs(1))
                .timeout(REQUEST_TIMEOUT);
            if h2 { b.http2_prior_knowledge() } else { b.http1_only() }.build().unwrap()
        };
        let http = [client(false), client(true)];
        Shared {
            urls,
            http,
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            pod_faults: Mutex::new(Vec::new()),
            replay_safe,
            lost: Mutex::new(Vec::new()),
            out_of_service: [AtomicBool::new(false), AtomicBool::new(false)],
            in_flight: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn now(&self) -> Micros {
        self.t0.elapsed().as_micros() as u64
    }

    /// Whether a pod fault overlaps `[from, to]`; `pod` narrows it to one pod.
    pub fn pod_fault_during(&self, pod: Option<usize>, from: Micros, to: Micros) -> bool {
        self.pod_faults.lock().unwrap().iter().any(|f| pod.is_none_or(|p| p == f.pod) && f.from <= to && f.to >= from)
    }
}

pub fn secs(t: Micros) -> String {
    format!("{:8.3}s", t as f64 / 1e6)
}

/// A call sent through the Envoys.
pub struct Sent {
    pub answer: Answer,
    pub session_header: Option<String>,
    /// The Envoy that answered (or was tried last).
    pub envoy: usize,
    /// Connections refused (an Envoy was down): each one retried on the other Envoy.
    pub refused: u32,
    /// Times the chosen Envoy had left the Service (being stopped): sent to the other.
    pub out_of_service: u32,
}

/// The answer to one POST.
#[derive(Debug)]
pub enum Answer {
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
    pub fn describe(&self) -> String {
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
    pub async fn post(&self, shape: Shape, url: &str, session: Option<&str>, body: &str, id: Option<u64>) -> (Answer, Option<String>) {
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

    /// Runs `call` through Envoy `envoy` unless that Envoy left the Service (`None`),
    /// counted in flight meanwhile. Counted before looking at the gate, so that the chaos
    /// driver, which closes the gate and then waits for no call in flight, never misses it.
    pub async fn through_gate<T>(&self, envoy: usize, call: impl std::future::Future<Output = T>) -> Option<T> {
        self.in_flight[envoy].fetch_add(1, Ordering::SeqCst);
        let answer = if self.out_of_service[envoy].load(Ordering::SeqCst) { None } else { Some(call.await) };
        self.in_flight[envoy].fetch_sub(1, Ordering::SeqCst);
        answer
    }

    /// [`Shared::post`] through Envoy `envoy`, as a client of a Service over both Envoys:
    /// an Envoy that left the Service (about to be stopped) is not tried, and one whose
    /// connection is refused (stopped, its endpoint not yet removed) is retried on the
    /// other Envoy — back and forth, pausing, while neither takes the call, up to
    /// [`FAILOVER_DEADLINE`].
    pub async fn post_failover(&self, shape: Shape, envoy: usize, session: Option<&str>, body: &str, id: Option<u64>) -> Sent {
        let deadline = Instant::now() + FAILOVER_DEADLINE;
        let mut sent = Sent { answer: Answer::Result(Value::Null), session_header: None, envoy, refused: 0, out_of_service: 0 };
        loop {
            let e = sent.envoy;
            let answer = self.through_gate(e, self.post(shape, &self.urls[e], session, body, id)).await.map(|(answer, header)| {
                sent.session_header = header;
                answer
            });
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
    pub async fn open_session(&self, envoy: usize) -> Result<String> {
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
