//! A small raw-HTTP MCP client (Streamable HTTP) for tests that must see exact statuses,
//! headers and bodies.
//!
//! Unlike a real MCP client it never retries or re-initializes on its own: every HTTP
//! exchange is one request, and every non-2xx answer surfaces as [`CallError::Http`].
//! Answers may be `application/json` or `text/event-stream` (SSE); both are parsed.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mcp_affinity_harness::mcp_client;
//! let session = mcp_client::connect("http://127.0.0.1:10000/mcp").await?;
//! let pod = session.whoami().await?;
//! let echoed = session.echo("hi").await?;
//! session.delete().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};

/// The protocol version [`initialize`] asks for (the first one with the
/// `MCP-Protocol-Version` header).
pub const DEFAULT_PROTOCOL_VERSION: &str = "2025-06-18";

/// The `Accept` header every POST sends (the spec requires both types).
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";

/// Timeout of every HTTP exchange (so a broken test fails instead of hanging).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A raw HTTP answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body, read to the end.
    pub body: Bytes,
}

impl RawResponse {
    /// A header's value as text (first value), if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as one JSON value, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `true` if `Content-Type` is `text/event-stream`.
    pub fn is_sse(&self) -> bool {
        self.header("content-type").is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"))
    }

    /// The JSON-RPC messages in the body: the `data:` of each SSE event (events with
    /// empty data, such as priming events, are skipped) when the answer is SSE,
    /// otherwise the JSON body (a batch array is flattened).
    pub fn messages(&self) -> Vec<Value> {
        if self.is_sse() {
            sse_data(&self.text()).iter().filter_map(|d| serde_json::from_str(d).ok()).collect()
        } else {
            match self.json() {
                Some(Value::Array(items)) => items,
                Some(v) => vec![v],
                None => Vec::new(),
            }
        }
    }
}

/// Why a JSON-RPC call failed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// A non-2xx HTTP answer (e.g. 404 for an unknown session).
    Http {
        /// HTTP status.
        status: StatusCode,
        /// Response headers.
        headers: HeaderMap,
        /// Response body as text.
        body: String,
    },
    /// A 2xx answer carrying a JSON-RPC error object.
    JsonRpc {
        /// HTTP status (usually 200).
        status: StatusCode,
        /// `error.code`.
        code: i64,
        /// `error.message`.
        message: String,
        /// `error.data`, if any.
        data: Option<Value>,
    },
    /// The request could not be sent or the answer not read (connection refused/reset,
    /// timeout).
    Transport(String),
    /// A 2xx answer that is not what the protocol says (no response with our id,
    /// unparsable body, a tool result without text, ...).
    Protocol(String),
}

impl CallError {
    /// The HTTP status, when an answer arrived.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CallError::Http { status, .. } | CallError::JsonRpc { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON-RPC error code: of a 2xx JSON-RPC error, or of a JSON-RPC error object
    /// in a non-2xx body (e.g. -32000 from TypeScript-SDK servers).
    pub fn jsonrpc_code(&self) -> Option<i64> {
        match self {
            CallError::JsonRpc { code, .. } => Some(*code),
            CallError::Http { body, .. } => serde_json::from_str::<Value>(body)
                .ok()?
                .pointer("/error/code")?
                .as_i64(),
            _ => None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Http { status, body, .. } => write!(f, "HTTP {status}: {body}"),
            CallError::JsonRpc { status, code, message, .. } => {
                write!(f, "JSON-RPC error {code} (HTTP {status}): {message}")
            }
            CallError::Transport(e) => write!(f, "transport error: {e}"),
            CallError::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// An HTTP client for tests: no proxy from the environment, [`REQUEST_TIMEOUT`].
pub fn http_client() -> reqwest::Client {
    Shape::OneWrite.client()
}

/// How a client puts a request on the wire. Envoy hands the filter the request headers as
/// soon as they are parsed and connects upstream at once, so whether the body arrives with
/// the headers or after them changes what the filter has seen when a pod fails: tests that
/// prove recovery run every shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// HTTP/1.1 with `Content-Length`, headers and body written together.
    #[default]
    OneWrite,
    /// HTTP/1.1 with `Content-Length`: the headers are written, then, after [`SHAPE_PAUSE`],
    /// the body (as Python's httpx/h11 writes a POST).
    SplitWrite,
    /// HTTP/1.1 `Transfer-Encoding: chunked`, the body in three chunks with a
    /// [`SHAPE_PAUSE`] before each.
    Chunked,
    /// HTTP/2 over cleartext with prior knowledge: a HEADERS frame, then, after
    /// [`SHAPE_PAUSE`], the DATA frames.
    Http2,
}

/// The pause between the pieces of a [`Shape::SplitWrite`], [`Shape::Chunked`] or
/// [`Shape::Http2`] request: long enough for Envoy to connect upstream (and fail) before
/// the body comes.
pub const SHAPE_PAUSE: Duration = Duration::from_millis(50);

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 4] = [Shape::OneWrite, Shape::SplitWrite, Shape::Chunked, Shape::Http2];
    /// The shapes that send the body after the headers.
    pub const SPLIT: [Shape; 3] = [Shape::SplitWrite, Shape::Chunked, Shape::Http2];

    /// A client speaking this shape's HTTP version (no proxy from the environment,
    /// [`REQUEST_TIMEOUT`]).
    pub fn client(self) -> reqwest::Client {
        let b = reqwest::Client::builder().no_proxy().timeout(REQUEST_TIMEOUT);
        let b = if self == Shape::Http2 { b.http2_prior_knowledge() } else { b.http1_only() };
        b.build().expect("build reqwest client")
    }

    /// The body to send, in this shape's pieces. Sets `Content-Length` in `headers` where
    /// the shape declares one (hyper then frames the streamed body by it), removes it where
    /// it does not.
    pub fn body(self, body: Bytes, headers: &mut HeaderMap) -> reqwest::Body {
        let pieces: Vec<Bytes> = match self {
            Shape::OneWrite => {
                headers.remove(http::header::CONTENT_LENGTH);
                return reqwest::Body::from(body);
            }
            Shape::SplitWrite | Shape::Http2 => vec![body.clone()],
            Shape::Chunked => {
                let (a, b) = (body.len() / 3, 2 * body.len() / 3);
                vec![body.slice(..a), body.slice(a..b), body.slice(b..)]
            }
        };
        if self == Shape::Chunked {
            headers.remove(http::header::CONTENT_LENGTH);
        } else {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let stream = futures::stream::iter(pieces).then(|piece| async move {
            tokio::time::sleep(SHAPE_PAUSE).await;
            Ok::<_, std::io::Error>(piece)
        });
        reqwest::Body::wrap_stream(stream)
    }
}

/// POSTs `body` to `url` with exactly the given headers (plus what reqwest always adds:
/// `Host`, `Content-Length`, ...), for malformed or unusual requests. Nothing is added:
/// no `Accept`, no `Content-Type`, no session id.
pub async fn post_raw(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Result<RawResponse> {
    send_raw(&http_client(), reqwest::Method::POST, url, &header_map(headers)?, body.into()).await
}

/// Sends any request (`method`, exact `headers`, `body`) and reads the whole answer.
pub async fn send_raw(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<RawResponse> {
    send_shaped(http, Shape::OneWrite, method, url, headers, body).await
}

/// [`send_raw`] with the body written in `shape`'s pieces (`http` must speak the shape's
/// HTTP version: [`Shape::client`]).
pub async fn send_shaped(
    http: &reqwest::Client,
    shape: Shape,
    method: reqwest::Method,
    url: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<RawResponse> {
    let mut headers = headers.clone();
    let body = shape.body(body, &mut headers);
    let resp = http
        .request(method.clone(), url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.with_context(|| format!("read body of {method} {url}"))?;
    Ok(RawResponse { status, headers, body })
}

fn header_map(headers: &[(&str, &str)]) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("header name {k:?}"))?,
            HeaderValue::from_str(v).with_context(|| format!("header value {v:?}"))?,
        );
    }
    Ok(map)
}

/// The JSON-RPC `initialize` request body this client sends.
pub fn initialize_body(id: u64, protocol_version: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "initialize",
        "params": {
            "protocolVersion": protocol_version,
            "capabilities": {},
            "clientInfo": {"name": "mcp-affinity-test-client", "version": env!("CARGO_PKG_VERSION")}
        }
    })
}

/// One MCP session, as the server answered `initialize`. Cheap to clone; clones share
/// the JSON-RPC id counter and the HTTP connection pool, so one session can be used from
/// several tasks at once.
#[derive(Debug, Clone)]
pub struct Session {
    /// The MCP endpoint URL, e.g. `http://127.0.0.1:10000/mcp`.
    pub url: String,
    /// The `Mcp-Session-Id` the server returned.
    pub session_id: String,
    /// The negotiated protocol version (`result.protocolVersion`), sent as
    /// `MCP-Protocol-Version` on every later request.
    pub protocol_version: String,
    /// The whole `initialize` result.
    pub initialize_result: Value,
    /// The raw HTTP answer to `initialize`.
    pub initialize_response: RawResponse,
    /// How this session's requests go on the wire ([`Session::shaped`]).
    pub shape: Shape,
    http: reqwest::Client,
    next_id: Arc<AtomicU64>,
}

/// Sends `initialize` to `url` (protocol [`DEFAULT_PROTOCOL_VERSION`]) and returns the
/// session. Does not send `notifications/initialized` (see [`connect`]). Fails unless
/// the answer is 2xx with a JSON-RPC result and an `Mcp-Session-Id` header.
pub async fn initialize(url: &str) -> Result<Session> {
    initialize_with(url, DEFAULT_PROTOCOL_VERSION, &[]).await
}

/// [`initialize`], then `notifications/initialized` (which must get 202): a session
/// ready for tool calls, as a real client would have it.
pub async fn connect(url: &str) -> Result<Session> {
    let session = initialize(url).await?;
    session.notify_initialized().await?;
    Ok(session)
}

/// [`initialize`] with a chosen protocol version and extra request headers.
pub async fn initialize_with(url: &str, protocol_version: &str, extra_headers: &[(&str, &str)]) -> Result<Session> {
    let http = http_client();
    let mut headers = header_map(&[("accept", ACCEPT_BOTH), ("content-type", "application/json")])?;
    for (k, v) in header_map(extra_headers)? {
        if let Some(k) = k {
            headers.insert(k, v);
        }
    }
    let body = Bytes::from(initialize_body(0, protocol_version).to_string());
    let resp = send_raw(&http, reqwest::Method::POST, url, &headers, body).await?;
    if !resp.status.is_success() {
        bail!("initialize: HTTP {}: {}", resp.status, resp.text());
    }
    let message = find_response(&resp.messages(), &json!(0))
        .ok_or_else(|| anyhow!("initialize: no JSON-RPC response in answer: {}", resp.text()))?;
    if let Some(err) = message.get("error") {
        bail!("initialize: JSON-RPC error: {err}");
    }
    let result = message.get("result").cloned().ok_or_else(|| anyhow!("initialize: no result: {message}"))?;
    let session_id = resp
        .header("mcp-session-id")
        .ok_or_else(|| anyhow!("initialize: answer has no Mcp-Session-Id header"))?
        .to_string();
    let protocol_version = result
        .get("protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or(protocol_version)
        .to_string();
    Ok(Session {
        url: url.to_string(),
        session_id,
        protocol_version,
        initialize_result: result,
        initialize_response: resp,
        shape: Shape::OneWrite,
        http,
        next_id: Arc::new(AtomicU64::new(1)),
    })
}

impl Session {
    /// A session handle for a known id, without sending `initialize` (e.g. to send a
    /// made-up or expired id).
    pub fn with_id(url: &str, session_id: &str) -> Session {
        Session {
            url: url.to_string(),
            session_id: session_id.to_string(),
            protocol_version: DEFAULT_PROTOCOL_VERSION.to_string(),
            initialize_result: Value::Null,
            initialize_response: RawResponse {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::new(),
            },
            shape: Shape::OneWrite,
            http: http_client(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The same session (id, JSON-RPC id counter) with its requests written in `shape`,
    /// over a client of its own.
    pub fn shaped(&self, shape: Shape) -> Session {
        Session { shape, http: shape.client(), ..self.clone() }
    }

    /// `serverInfo.name` from the `initialize` result, if any.
    pub fn server_name(&self) -> Option<&str> {
        self.initialize_result.pointer("/serverInfo/name").and_then(Value::as_str)
    }

    /// The headers every request of this session carries: `Mcp-Session-Id`,
    /// `MCP-Protocol-Version`, `Accept` (both types) and `Content-Type: application/json`.
    pub fn default_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("mcp-session-id", HeaderValue::from_str(&self.session_id).expect("session id is a header value"));
        h.insert(
            "mcp-protocol-version",
            HeaderValue::from_str(&self.protocol_version).expect("protocol version is a header value"),
        );
        h.insert(http::header::ACCEPT, HeaderValue::from_static(ACCEPT_BOTH));
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h
    }

    /// POSTs `body` with [`Session::default_headers`]; `headers` are set on top
    /// (replacing a default of the same name). For odd requests within a session.
    pub async fn post_raw(&self, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Result<RawResponse> {
        let mut map = self.default_headers();
        for (k, v) in header_map(headers)? {
            if let Some(k) = k {
                map.insert(k, v);
            }
        }
        send_shaped(&self.http, self.shape, reqwest::Method::POST, &self.url, &map, body.into()).await
    }

    /// Sends `notifications/initialized`; fails unless the answer is 202.
    pub async fn notify_initialized(&self) -> Result<RawResponse> {
        let body = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
        let resp = self.post_raw(&[], body).await?;
        if resp.status != StatusCode::ACCEPTED {
            bail!("notifications/initialized: HTTP {}: {}", resp.status, resp.text());
        }
        Ok(resp)
    }

    /// Sends a JSON-RPC request and returns its `result`. SSE answers are read only until
    /// the response with this request's id arrives.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        let mut headers = self.default_headers();
        let body = self.shape.body(body.into(), &mut headers);
        let resp = self
            .http
            .post(&self.url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::Transport(format!("POST {} ({method}): {e}", self.url)))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(CallError::Http { status, headers, body });
        }
        let is_sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        let message = if is_sse {
            read_sse_response(resp, &json!(id)).await?
        } else {
            let body = resp.bytes().await.map_err(|e| CallError::Transport(format!("read body: {e}")))?;
            let raw = RawResponse { status, headers, body };
            find_response(&raw.messages(), &json!(id))
                .ok_or_else(|| CallError::Protocol(format!("no response with id {id} in: {}", raw.text())))?
        };
        if let Some(err) = message.get("error") {
            return Err(CallError::JsonRpc {
                status,
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err.get("message").and_then(Value::as_str).unwrap_or_default().to_string(),
                data: err.get("data").cloned(),
            });
        }
        message
            .get("result")
            .cloned()
            .ok_or_else(|| CallError::Protocol(format!("response without result: {message}")))
    }

    /// `tools/call` of `name` with `arguments` (a JSON object); returns the JSON-RPC
    /// `result` (a `CallToolResult`: `content`, `isError`, ...).
    pub async fn call_tool(&self, name: &str, arguments: Value) -> Result<Value, CallError> {
        self.request("tools/call", json!({"name": name, "arguments": arguments})).await
    }

    /// `tools/call` and the text of its first content block; a result with
    /// `isError: true` is a [`CallError::Protocol`].
    pub async fn call_tool_text(&self, name: &str, arguments: Value) -> Result<String, CallError> {
        let result = self.call_tool(name, arguments).await?;
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Err(CallError::Protocol(format!("tool {name} failed: {result}")));
        }
        result
            .pointer("/content/0/text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| CallError::Protocol(format!("tool {name}: no text content in {result}")))
    }

    /// Calls the demo server's `whoami` tool: the name of the pod that answered.
    pub async fn whoami(&self) -> Result<String, CallError> {
        self.call_tool_text("whoami", json!({})).await
    }

    /// `whoami` as one raw POST that must answer 200 and must not show the client any
    /// session id but its own (MCP sessions behind mcp-affinity keep their id through
    /// recovery). Panics otherwise; for end-to-end assertions.
    pub async fn whoami_keeping_id(&self) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"whoami","arguments":{}}});
        let r = self.post_raw(&[], body.to_string()).await.expect("POST whoami");
        assert_eq!(r.status, 200, "{}", r.text());
        if let Some(seen) = r.header("mcp-session-id") {
            assert_eq!(seen, self.session_id, "the client saw another session id");
        }
        let m = r.messages().into_iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("no answer: {}", r.text()));
        m["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("{m}")).to_string()
    }

    /// Calls the demo server's `echo` tool.
    pub async fn echo(&self, text: &str) -> Result<String, CallError> {
        self.call_tool_text("echo", json!({"text": text})).await
    }

    /// `tools/list`: the names of the tools (first page).
    pub async fn list_tools(&self) -> Result<Vec<String>, CallError> {
        let result = self.request("tools/list", json!({})).await?;
        let tools = result
            .get("tools")
            .and_then(Value::as_array)
            .ok_or_else(|| CallError::Protocol(format!("tools/list without tools: {result}")))?;
        Ok(tools.iter().filter_map(|t| t.get("name")?.as_str().map(str::to_string)).collect())
    }

    /// `DELETE` with the session id (ends the session). Returns the raw answer whatever
    /// its status; only a transport failure is an error.
    pub async fn delete(&self) -> Result<RawResponse> {
        let mut headers = self.default_headers();
        headers.remove(http::header::CONTENT_TYPE);
        send_raw(&self.http, reqwest::Method::DELETE, &self.url, &headers, Bytes::new()).await
    }
}

/// The message in `messages` that is the JSON-RPC response (result or error) to `id`.
fn find_response(messages: &[Value], id: &Value) -> Option<Value> {
    messages
        .iter()
        .find(|m| m.get("id") == Some(id) && (m.get("result").is_some() || m.get("error").is_some()))
        .cloned()
}

/// Reads an SSE answer until the response to `id` arrives (so a stream that stays open
/// after the response does not hang the caller).
async fn read_sse_response(resp: reqwest::Response, id: &Value) -> Result<Value, CallError> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = String::new();
    loop {
        // Complete events end with a blank line; parse those seen so far.
        let text = String::from_utf8_lossy(&buf).replace("\r\n", "\n");
        if let Some(end) = text.rfind("\n\n") {
            for data in sse_data(&text[..end + 2]) {
                if let Ok(message) = serde_json::from_str::<Value>(&data)
                    && let Some(found) = find_response(std::slice::from_ref(&message), id)
                {
                    return Ok(found);
                }
            }
            seen = text.clone();
        }
        match stream.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(CallError::Transport(format!("read SSE: {e}"))),
            None => {
                // A last event without the trailing blank line.
                let text = String::from_utf8_lossy(&buf).replace("\r\n", "\n") + "\n\n";
                return sse_data(&text)
                    .iter()
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .find_map(|m| find_response(std::slice::from_ref(&m), id))
                    .ok_or_else(|| {
                        CallError::Protocol(format!("SSE stream ended without a response to id {id}: {seen:?}"))
                    });
            }
        }
    }
}

/// The `data` of each event of an SSE text: the control service's parser (the one that
/// reads pods' answers during recovery), so tests and control read SSE alike.
pub use mcp_affinity_control::recover::upstream::sse_data;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_data_skips_priming_and_joins_lines() {
        let text = "id: 0\nretry: 3000\ndata:\n\n: comment\nevent: message\ndata: {\"a\":\ndata: 1}\n\ndata:x";
        assert_eq!(sse_data(text), vec!["{\"a\":\n1}".to_string(), "x".to_string()]);
    }

    #[test]
    fn messages_of_json_and_sse() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
        let sse = RawResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from("id: 0\ndata:\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n"),
        };
        assert_eq!(find_response(&sse.messages(), &json!(1)), Some(json!({"jsonrpc":"2.0","id":1,"result":{}})));
        let js = RawResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from("[{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-1,\"message\":\"m\"}}]"),
        };
        assert!(find_response(&js.messages(), &json!(2)).is_some());
        assert!(find_response(&js.messages(), &json!(3)).is_none());
    }
}
