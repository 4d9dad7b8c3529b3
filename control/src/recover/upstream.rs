//! The HTTP side of recovery: talking to MCP server pods (Streamable HTTP) — send the
//! stored `initialize`, the `notifications/initialized`, replay the client's request, and
//! probe whether a pod still knows a session (`ping`, for `session_suspect`).
//!
//! Every call carries the deadline of the whole recovery; answers are read up to a byte
//! cap. A `text/event-stream` answer is read until the stream ends or, when the JSON-RPC
//! id of the request is known, until the event carrying its response has arrived (a
//! server may keep a POST's stream open after the response).

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

/// `Accept` of the control's own calls (both types, as the spec requires of clients).
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";
use mcp_affinity_proto::headers::{MCP_PROTOCOL_VERSION as PROTOCOL_HEADER, MCP_SESSION_ID as SESSION_HEADER};

/// Where and how to call a pod: its address, the MCP endpoint path (and query), the
/// client's `Host` and `Authorization` (used, never stored).
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// The pod, `ip:port`.
    pub endpoint: SocketAddr,
    /// Path and query, e.g. `/mcp?x=1`.
    pub path: &'a str,
    /// Sent as `Host`, when given.
    pub authority: Option<&'a str>,
    /// Sent as `Authorization`, when given.
    pub authorization: Option<&'a str>,
}

impl Target<'_> {
    fn url(&self) -> String {
        format!("http://{}{}", self.endpoint, self.path)
    }

    fn base_headers(&self) -> Result<HeaderMap, String> {
        let mut h = HeaderMap::new();
        if let Some(a) = self.authority {
            h.insert(HOST, value("authority", a)?);
        }
        if let Some(a) = self.authorization {
            h.insert(AUTHORIZATION, value("authorization", a)?);
        }
        Ok(h)
    }
}

fn value(name: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("`{name}` is not a valid header value"))
}

/// An answer read (up to the cap) from a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAnswer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, when present.
    pub content_type: Option<String>,
    /// The `Mcp-Session-Id` response header, when present.
    pub session_id: Option<String>,
    /// The body (or its prefix up to the response event for SSE).
    pub body: Vec<u8>,
}

impl PodAnswer {
    /// `true` when the answer is an SSE stream.
    pub fn is_sse(&self) -> bool {
        self.content_type.as_deref().is_some_and(is_sse)
    }

    /// The JSON-RPC messages of the body (SSE `data:` payloads, or the JSON body, a batch
    /// flattened).
    pub fn messages(&self) -> Vec<Value> {
        messages(&self.body, self.is_sse())
    }
}

/// Why a call to a pod failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// Nothing was sent: connecting failed (or the request could not be built).
    NotSent(String),
    /// The request was (or may have been) sent, but no complete answer came back
    /// (reset, timeout, answer over the cap).
    MaybeSent(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotSent(e) => write!(f, "not sent: {e}"),
            CallError::MaybeSent(e) => write!(f, "no complete answer: {e}"),
        }
    }
}

fn is_sse(content_type: &str) -> bool {
    content_type.trim_start().to_ascii_lowercase().starts_with("text/event-stream")
}

/// Sends one POST (or GET) and reads the answer: until the body ends, or for SSE until
/// the response to `wait_for_id` has arrived. Bounded by `deadline` and `max_bytes`.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    http: &reqwest::Client,
    target: &Target<'_>,
    method: reqwest::Method,
    headers: HeaderMap,
    body: String,
    wait_for_id: Option<&Value>,
    deadline: Instant,
    max_bytes: usize,
) -> Result<PodAnswer, CallError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(CallError::NotSent("recovery deadline passed".into()));
    }
    let mut all = target.base_headers().map_err(CallError::NotSent)?;
    all.extend(headers);
    let request = http.request(method, target.url()).headers(all).body(body).timeout(remaining);
    let mut response = match tokio::time::timeout_at(deadline, request.send()).await {
        Err(_) => return Err(CallError::MaybeSent(format!("no answer from {} in time", target.endpoint))),
        Ok(Err(e)) if e.is_connect() => return Err(CallError::NotSent(format!("connect {}: {e}", target.endpoint))),
        Ok(Err(e)) if e.is_builder() => return Err(CallError::NotSent(format!("request to {}: {e}", target.endpoint))),
        Ok(Err(e)) => return Err(CallError::MaybeSent(format!("{}: {e}", target.endpoint))),
        Ok(Ok(r)) => r,
    };
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut answer = PodAnswer {
        status: response.status().as_u16(),
        content_type: header(CONTENT_TYPE.as_str()),
        session_id: header(SESSION_HEADER),
        body: Vec::new(),
    };
    let sse = answer.is_sse();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) => return Err(CallError::MaybeSent(format!("answer of {} not complete in time", target.endpoint))),
            Ok(Err(e)) => return Err(CallError::MaybeSent(format!("read answer of {}: {e}", target.endpoint))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if answer.body.len() + chunk.len() > max_bytes {
            return Err(CallError::MaybeSent(format!("answer of {} exceeds {max_bytes} bytes", target.endpoint)));
        }
        answer.body.extend_from_slice(&chunk);
        if sse && let Some(id) = wait_for_id {
            // Only complete events (ending with a blank line) count.
            let text = String::from_utf8_lossy(&answer.body).replace("\r\n", "\n").replace('\r', "\n");
            if let Some(end) = text.rfind("\n\n")
                && sse_data(&text[..end + 2])
                    .iter()
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .any(|m| is_response_to(&m, id))
            {
                break;
            }
        }
    }
    Ok(answer)
}

/// What a pod answered to the stored `initialize`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Initialized {
    /// The new backend session id (`Mcp-Session-Id` of the answer).
    pub session_id: String,
    /// `result.protocolVersion`, when present.
    pub protocol_version: Option<String>,
}

/// POSTs the stored `initialize` body and checks the answer: 2xx, a JSON-RPC result (not
/// an error) and a valid `Mcp-Session-Id`.
pub async fn initialize(
    http: &reqwest::Client,
    target: &Target<'_>,
    initialize_body: &str,
    deadline: Instant,
    max_bytes: usize,
) -> Result<Initialized, String> {
    let id = serde_json::from_str::<Value>(initialize_body).ok().and_then(|v| v.get("id").cloned());
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static(ACCEPT_BOTH));
    let answer = send(http, target, reqwest::Method::POST, headers, initialize_body.to_string(), id.as_ref(), deadline, max_bytes)
        .await
        .map_err(|e| format!("initialize: {e}"))?;
    if !(200..300).contains(&answer.status) {
        return Err(format!("initialize: HTTP {}: {}", answer.status, snippet(&answer.body)));
    }
    let messages = answer.messages();
    let response = messages
        .iter()
        .find(|m| m.get("result").is_some() || m.get("error").is_some())
        .ok_or_else(|| format!("initialize: no JSON-RPC response in the answer: {}", snippet(&answer.body)))?;
    if let Some(error) = response.get("error") {
        return Err(format!("initialize: JSON-RPC error {error}"));
    }
    let result = &response["result"];
    if !result.is_object() {
        return Err(format!("initialize: result is not an object: {result}"));
    }
    let session_id = answer.session_id.ok_or_else(|| "initialize: the answer has no Mcp-Session-Id".to_string())?;
    if !crate::session_id::is_valid_session_id(&session_id) {
        return Err("initialize: the answer's Mcp-Session-Id is not a valid session id".into());
    }
    let protocol_version = result.get("protocolVersion").and_then(Value::as_str).map(str::to_string);
    Ok(Initialized { session_id, protocol_version })
}

/// POSTs `notifications/initialized` (the stored body) in the new session; any 2xx is
/// success.
pub async fn notify_initialized(
    http: &reqwest::Client,
    target: &Target<'_>,
    body: &str,
    session_id: &str,
    protocol_version: Option<&str>,
    deadline: Instant,
    max_bytes: usize,
) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static(ACCEPT_BOTH));
    headers.insert(HeaderName::from_static(SESSION_HEADER), value("session id", session_id)?);
    if let Some(v) = protocol_version {
        headers.insert(HeaderName::from_static(PROTOCOL_HEADER), value("protocol version", v)?);
    }
    let answer = send(http, target, reqwest::Method::POST, headers, body.to_string(), None, deadline, max_bytes)
        .await
        .map_err(|e| format!("notifications/initialized: {e}"))?;
    if !(200..300).contains(&answer.status) {
        return Err(format!("notifications/initialized: HTTP {}: {}", answer.status, snippet(&answer.body)));
    }
    Ok(())
}

/// Best effort `DELETE` of a backend session control created but could not use (an
/// orphan), within `timeout`. Errors are only logged.
pub async fn delete_session(http: &reqwest::Client, target: &Target<'_>, session_id: &str, timeout: Duration) {
    let mut headers = HeaderMap::new();
    let Ok(v) = HeaderValue::from_str(session_id) else { return };
    headers.insert(HeaderName::from_static(SESSION_HEADER), v);
    let deadline = Instant::now() + timeout;
    if let Err(e) = send(http, target, reqwest::Method::DELETE, headers, String::new(), None, deadline, 64 * 1024).await {
        tracing::debug!(endpoint = %target.endpoint, error = %e, "delete of an orphaned backend session failed");
    }
}

/// JSON-RPC id of the probe `ping` (a string no client is likely to use).
pub const PROBE_ID: &str = "mcp-affinity-probe";

/// Body of the probe: a JSON-RPC `ping` request.
pub const PROBE_BODY: &str = r#"{"jsonrpc":"2.0","id":"mcp-affinity-probe","method":"ping"}"#;

/// What a probe of a pinned session found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The pod answered, and not with a session-not-found answer: it knows the session.
    Alive,
    /// The pod answered that it does not know the session ([`is_session_unknown`]).
    SessionUnknown,
    /// No answer: connecting failed, or the answer did not complete in time (the message
    /// says why).
    Unreachable(String),
}

impl Probe {
    /// The metric label (`alive`, `session_unknown`, `unreachable`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Probe::Alive => "alive",
            Probe::SessionUnknown => "session_unknown",
            Probe::Unreachable(_) => "unreachable",
        }
    }
}

/// POSTs a JSON-RPC `ping` ([`PROBE_BODY`]) in session `session_id` and classifies the
/// answer: a session-not-found answer ([`is_session_unknown`]) is
/// [`Probe::SessionUnknown`], any other answer (whatever its status) is [`Probe::Alive`],
/// a transport failure (not sent, no complete answer by `deadline`) is
/// [`Probe::Unreachable`].
pub async fn probe(
    http: &reqwest::Client,
    target: &Target<'_>,
    session_id: &str,
    protocol_version: Option<&str>,
    errors: &SessionErrors,
    deadline: Instant,
    max_bytes: usize,
) -> Probe {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static(ACCEPT_BOTH));
    match value("backend session id", session_id) {
        Ok(v) => headers.insert(HeaderName::from_static(SESSION_HEADER), v),
        Err(e) => return Probe::Unreachable(e),
    };
    if let Some(v) = protocol_version.and_then(|v| HeaderValue::from_str(v).ok()) {
        headers.insert(HeaderName::from_static(PROTOCOL_HEADER), v);
    }
    let id = Value::String(PROBE_ID.to_string());
    match send(http, target, reqwest::Method::POST, headers, PROBE_BODY.to_string(), Some(&id), deadline, max_bytes).await {
        Ok(answer) if is_session_unknown_by(errors, &answer) => Probe::SessionUnknown,
        Ok(_) => Probe::Alive,
        Err(e) => Probe::Unreachable(e.to_string()),
    }
}


pub use mcp_affinity_proto::recover::SessionErrors;

/// `true` when `answer` says the server does not know the session, by `rules` (a status
/// alone, or a JSON-RPC error of a body status: [`SessionErrors::is_session_error`]).
pub fn is_session_unknown_by(rules: &SessionErrors, answer: &PodAnswer) -> bool {
    if rules.statuses.contains(&answer.status) {
        return true;
    }
    rules.body_statuses.contains(&answer.status)
        && answer.messages().iter().any(|m| {
            let Some(error) = m.get("error") else { return false };
            let Some(code) = error.get("code").and_then(Value::as_i64) else { return false };
            rules.is_session_error(code, error.get("message").and_then(Value::as_str))
        })
}

/// [`is_session_unknown_by`] the default rules.
pub fn is_session_unknown(answer: &PodAnswer) -> bool {
    is_session_unknown_by(&SessionErrors::default(), answer)
}

/// The client request headers of a replay: `Mcp-Session-Id` = the backend id, and the
/// client's content type, accept and protocol version when given.
pub fn replay_headers(
    backend_session_id: &str,
    content_type: Option<&str>,
    accept: Option<&str>,
    protocol_version: Option<&str>,
) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    h.insert(HeaderName::from_static(SESSION_HEADER), value("backend session id", backend_session_id)?);
    if let Some(v) = content_type {
        h.insert(CONTENT_TYPE, value("content_type", v)?);
    }
    if let Some(v) = accept {
        h.insert(ACCEPT, value("accept", v)?);
    }
    if let Some(v) = protocol_version {
        h.insert(HeaderName::from_static(PROTOCOL_HEADER), value("protocol_version", v)?);
    }
    Ok(h)
}

/// `true` when `message` is the JSON-RPC response (result or error) to `id`.
pub fn is_response_to(message: &Value, id: &Value) -> bool {
    message.get("id") == Some(id) && (message.get("result").is_some() || message.get("error").is_some())
}

/// The JSON-RPC messages of a body: SSE `data:` payloads when `sse`, else the JSON body
/// (a batch array flattened). Unparsable parts are skipped.
pub fn messages(body: &[u8], sse: bool) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    if sse {
        sse_data(&text).iter().filter_map(|d| serde_json::from_str(d).ok()).collect()
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => items,
            Ok(v) => vec![v],
            Err(_) => Vec::new(),
        }
    }
}

/// The `data` of each SSE event (multi-line data joined with `\n`); events without data or
/// with empty data (priming events) are skipped.
pub fn sse_data(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut data: Option<String> = None;
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            if let Some(d) = data.take()
                && !d.is_empty()
            {
                out.push(d);
            }
            continue;
        }
        let (field, v) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => data = Some(v.to_string()),
            }
        }
    }
    if let Some(d) = data
        && !d.is_empty()
    {
        out.push(d);
    }
    out
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_json_and_sse_messages() {
        let sse = b"id: 0\nretry: 3000\ndata:\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        let m = messages(sse, true);
        assert_eq!(m, [json!({"jsonrpc":"2.0","id":1,"result":{}})]);
        assert!(is_response_to(&m[0], &json!(1)));
        assert!(!is_response_to(&m[0], &json!(2)));
        assert_eq!(messages(br#"[{"a":1},{"b":2}]"#, false).len(), 2);
        assert!(messages(b"not json", false).is_empty());
        assert_eq!(sse_data("data: a\r\ndata: b\r\n\r\ndata:x"), ["a\nb", "x"]);
    }

    fn answer(status: u16, content_type: &str, body: &str) -> PodAnswer {
        PodAnswer { status, content_type: Some(content_type.into()), session_id: None, body: body.as_bytes().to_vec() }
    }

    #[test]
    fn classifies_session_unknown_answers() {
        let ts = r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#;
        assert!(is_session_unknown(&answer(400, "application/json", ts)));
        assert!(is_session_unknown(&answer(404, "text/plain", "Not Found: Session not found")));
        assert!(is_session_unknown(&answer(404, "application/json", "")));
        let nf = r#"{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":1}"#;
        assert!(is_session_unknown(&answer(400, "application/json", nf)));
        assert!(is_session_unknown(&answer(400, "text/event-stream", &format!("event: message\ndata: {nf}\n\n"))));
        assert!(is_session_unknown(&answer(400, "application/json", &ts.replace("session", "SESSION"))));
        // A genuine 400, another error code, another status, or no JSON: the session is alive.
        let bad = r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: invalid params"},"id":1}"#;
        assert!(!is_session_unknown(&answer(400, "application/json", bad)));
        let other = r#"{"jsonrpc":"2.0","error":{"code":-32602,"message":"unknown session tool"},"id":1}"#;
        assert!(!is_session_unknown(&answer(400, "application/json", other)));
        assert!(!is_session_unknown(&answer(200, "application/json", nf)));
        assert!(!is_session_unknown(&answer(500, "application/json", ts)));
        assert!(!is_session_unknown(&answer(400, "text/plain", "Bad Request: session")));
        assert!(!is_session_unknown(&answer(200, "application/json", r#"{"jsonrpc":"2.0","id":"mcp-affinity-probe","result":{}}"#)));
        let custom = SessionErrors { statuses: vec![410], message_patterns: vec!["expired".into()], ..SessionErrors::default() };
        assert!(is_session_unknown_by(&custom, &answer(410, "text/plain", "")));
        assert!(!is_session_unknown_by(&custom, &answer(404, "text/plain", "")), "the configured statuses replace the defaults");
        let expired = r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Session expired"},"id":1}"#;
        assert!(is_session_unknown_by(&custom, &answer(400, "application/json", expired)));
    }

    #[tokio::test]
    async fn probe_of_a_closed_port_is_unreachable() {
        let endpoint = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let target = Target { endpoint, path: "/mcp", authority: None, authorization: None };
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = probe(&http, &target, "s-1", Some("2025-06-18"), &SessionErrors::default(), deadline, 1024).await;
        assert!(matches!(&got, Probe::Unreachable(e) if e.starts_with("not sent")), "{got:?}");
    }

    #[test]
    fn probe_body_is_a_ping_request() {
        let v: Value = serde_json::from_str(PROBE_BODY).unwrap();
        assert_eq!(v, json!({"jsonrpc":"2.0","id":PROBE_ID,"method":"ping"}));
        assert_eq!([Probe::Alive.as_str(), Probe::SessionUnknown.as_str(), Probe::Unreachable(String::new()).as_str()],
            ["alive", "session_unknown", "unreachable"]);
    }
}
