//! A raw MCP 2026-07-28 client for tests: one HTTP POST per request, no session, no
//! `initialize`, exact statuses and headers visible.
//!
//! # What a request carries
//! Headers (SEP-2243; built by [`request_headers`]):
//! ```text
//! Content-Type: application/json
//! Accept: application/json, text/event-stream
//! MCP-Protocol-Version: 2026-07-28
//! Mcp-Method: tasks/get
//! Mcp-Name: 0b6c1c1e-8a9b-4c50-9a39-2bd7b3a1d6f2
//! ```
//! `Mcp-Name` is sent for the methods that have one: `tools/call` and `prompts/get`
//! (`params.name`), `resources/read|subscribe|unsubscribe` (`params.uri`),
//! `tasks/get|update|cancel` (`params.taskId`). Its value is the plain text, or
//! `=?base64?<standard Base64 of the UTF-8>?=` only when the text cannot be a header
//! value as is (leading/trailing space or tab, a control or non-ASCII character, or text
//! that itself looks like `=?base64?…?=`): [`encode_header_value`], rmcp's rule.
//!
//! Body (built by [`request_body`]): the JSON-RPC request with the per-request `_meta`
//! the 2026-07-28 revision requires (rmcp routes a request without both required keys
//! to its 2025 path):
//! ```json
//! {"jsonrpc":"2.0","id":7,"method":"tasks/get","params":{"taskId":"0b6c…","_meta":{
//!   "io.modelcontextprotocol/protocolVersion":"2026-07-28",
//!   "io.modelcontextprotocol/clientInfo":{"name":"mcp-affinity-era2026-client","version":"0.1.0"},
//!   "io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}}}
//! ```
//! `clientCapabilities` is `{}` unless the request declares the tasks extension
//! ([`Options::declare_tasks`]; the `tasks/*` helpers always do, as rmcp answers an
//! undeclared `tasks/*` with -32021).
//!
//! # What an answer is
//! `application/json` with the JSON-RPC response, or `text/event-stream` whose events
//! carry it (priming events with empty `data:` skipped); both are read. A JSON-RPC error
//! is [`Error::Rpc`] whatever the HTTP status: rmcp answers -32602 (e.g. unknown task id)
//! with 200, -32020 (header mismatch), -32021 (missing required client capability) and
//! -32022 (unsupported protocol version) with 400, -32601 (method not found) with 404.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};

use crate::mcp_client::{self, RawResponse};

/// The protocol revision this client speaks.
pub const PROTOCOL_VERSION: &str = "2026-07-28";
/// Identifier of the tasks extension (SEP-2663).
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";
/// `_meta` key of the per-request protocol version.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of the per-request client capabilities.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of the per-request client info.
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// JSON-RPC error code for invalid params; the answer to an unknown task id.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC error code "missing required client capability".
pub const MISSING_REQUIRED_CLIENT_CAPABILITY: i64 = -32021;
/// JSON-RPC error code for SEP-2243 headers that do not match the body.
pub const HEADER_MISMATCH: i64 = -32020;

const BASE64_PREFIX: &str = "=?base64?";
const BASE64_SUFFIX: &str = "?=";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

mod listen;
pub use listen::{ACKNOWLEDGED, Listening, listen};

/// How one request is sent, beyond the method and params.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Declare the tasks extension in `_meta` client capabilities
    /// (`{"extensions":{"io.modelcontextprotocol/tasks":{}}}`). [`get_task`],
    /// [`get_task_with`], [`cancel_task`] and [`update_task`] always declare it (rmcp
    /// answers an undeclared `tasks/*` with -32021); [`request`] does as told.
    pub declare_tasks: bool,
    /// Headers set after the standard ones; one with the name of a standard header
    /// replaces it (e.g. a deliberately wrong `Mcp-Name`); others are added (e.g. a
    /// routing header of the filter).
    pub headers: Vec<(String, String)>,
    /// Standard headers to leave out (case-insensitive names, e.g. `Mcp-Name`).
    pub omit: Vec<String>,
    /// How the request goes on the wire (one write, headers then body, chunked, HTTP/2).
    pub shape: mcp_client::Shape,
}

impl Options {
    /// Options that declare the tasks extension.
    pub fn tasks() -> Options {
        Options { declare_tasks: true, ..Options::default() }
    }

    /// Adds (or replaces, for a standard name) header `name: value`.
    pub fn header(mut self, name: &str, value: &str) -> Options {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Leaves out standard header `name`.
    pub fn without(mut self, name: &str) -> Options {
        self.omit.push(name.to_string());
        self
    }
}

/// A JSON-RPC error answer.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// HTTP status it came with (200 for -32602; 400 for -32020/-32021/-32022; 404 for -32601).
    pub status: StatusCode,
    /// `error.code`, e.g. [`INVALID_PARAMS`] for an unknown task id.
    pub code: i64,
    /// `error.message`, e.g. `unknown task: <id>`.
    pub message: String,
    /// `error.data`, if any (for -32021: `{"requiredCapabilities": …}`).
    pub data: Option<Value>,
}

impl RpcError {
    /// The error object `error` of a JSON-RPC response that came with HTTP `status`.
    pub fn from_message(status: StatusCode, error: &Value) -> RpcError {
        RpcError {
            status,
            code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: error.get("message").and_then(Value::as_str).unwrap_or_default().to_string(),
            data: error.get("data").cloned(),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub enum Error {
    /// A JSON-RPC error (any HTTP status).
    Rpc(RpcError),
    /// An HTTP answer that is not a JSON-RPC message (e.g. 406, 415, a proxy's 503).
    Http {
        /// HTTP status.
        status: StatusCode,
        /// Response headers.
        headers: HeaderMap,
        /// Body as text.
        body: String,
    },
    /// The request could not be sent or the answer not read.
    Transport(String),
    /// A 2xx answer that is not what the protocol says (no response with our id, a
    /// result of the wrong shape, ...).
    Protocol(String),
}

impl Error {
    /// The JSON-RPC error code, if this is [`Error::Rpc`].
    pub fn rpc_code(&self) -> Option<i64> {
        match self {
            Error::Rpc(e) => Some(e.code),
            _ => None,
        }
    }

    /// The HTTP status, when an answer arrived.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Rpc(e) => Some(e.status),
            Error::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Rpc(e) => write!(f, "JSON-RPC error {} (HTTP {}): {}", e.code, e.status, e.message),
            Error::Http { status, body, .. } => write!(f, "HTTP {status}: {body}"),
            Error::Transport(e) => write!(f, "transport error: {e}"),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// A successful JSON-RPC answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The whole HTTP answer (status, headers, body).
    pub raw: RawResponse,
    /// The JSON-RPC response's `result`.
    pub result: Value,
}

/// The seed state of a task (`CreateTaskResult`, `resultType: "task"`).
#[derive(Debug, Clone)]
pub struct CreateTask {
    /// `taskId`: what `tasks/get|update|cancel` name (in `params.taskId` and `Mcp-Name`).
    pub task_id: String,
    /// `status`, normally `working`.
    pub status: String,
    /// `ttlMs` (`None`: null, unlimited).
    pub ttl_ms: Option<u64>,
    /// `pollIntervalMs`, if given.
    pub poll_interval_ms: Option<u64>,
    /// The whole `result` object.
    pub raw: Value,
}

/// The answer to a `tools/call`.
#[derive(Debug, Clone)]
pub enum ToolAnswer {
    /// The server made the call a task.
    Task(CreateTask),
    /// A synchronous `CallToolResult` (`resultType` `complete` or absent): the whole
    /// `result` object.
    Complete(Value),
}

impl ToolAnswer {
    /// The task, if the call became one.
    pub fn task(self) -> Option<CreateTask> {
        match self {
            ToolAnswer::Task(t) => Some(t),
            ToolAnswer::Complete(_) => None,
        }
    }

    /// The first text content of a synchronous result.
    pub fn text(&self) -> Option<&str> {
        match self {
            ToolAnswer::Complete(result) => first_text(result),
            ToolAnswer::Task(_) => None,
        }
    }
}

/// A task's state as `tasks/get` answers it (`DetailedTask`).
#[derive(Debug, Clone)]
pub struct TaskState {
    /// `taskId`.
    pub task_id: String,
    /// `status`: `working`, `input_required`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// `statusMessage`, if any.
    pub status_message: Option<String>,
    /// `result` (a `CallToolResult` object) once `completed`.
    pub result: Option<Value>,
    /// `error` (a JSON-RPC error object) once `failed`.
    pub error: Option<Value>,
    /// `pollIntervalMs`, if given.
    pub poll_interval_ms: Option<u64>,
    /// `ttlMs` (`None`: null or absent).
    pub ttl_ms: Option<u64>,
    /// The whole `result` object of the `tasks/get` answer.
    pub raw: Value,
}

impl TaskState {
    /// `true` for `completed`, `failed` and `cancelled`.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// The first text content of the task's `result`.
    pub fn result_text(&self) -> Option<&str> {
        self.result.as_ref().and_then(first_text)
    }
}

fn first_text(result: &Value) -> Option<&str> {
    result.get("content")?.as_array()?.iter().find_map(|c| c.get("text")?.as_str())
}

/// rmcp's (SEP-2243) encoding of a `Mcp-Name`/`Mcp-Param-*` value: the text itself, or
/// `=?base64?<Base64>?=` when it starts or ends with a space or tab, has a character
/// outside `0x20..=0x7E`, or already has the `=?base64?…?=` form.
pub fn encode_header_value(value: &str) -> String {
    let needs = !value.is_empty()
        && (value.starts_with([' ', '\t'])
            || value.ends_with([' ', '\t'])
            || value.chars().any(|c| !(' '..='~').contains(&c))
            || (value.starts_with(BASE64_PREFIX) && value.ends_with(BASE64_SUFFIX)));
    if needs {
        format!("{BASE64_PREFIX}{}{BASE64_SUFFIX}", base64::engine::general_purpose::STANDARD.encode(value))
    } else {
        value.to_string()
    }
}

/// The `Mcp-Name` text (before encoding) of a request, for the methods that carry one.
pub fn mcp_name(method: &str, params: &Value) -> Option<String> {
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        "tasks/get" | "tasks/update" | "tasks/cancel" => "taskId",
        _ => return None,
    };
    params.get(key)?.as_str().map(str::to_string)
}

/// The `params._meta` of a 2026-07-28 request: protocol version, client info and
/// client capabilities (with the tasks extension if `declare_tasks`).
pub fn request_meta(declare_tasks: bool) -> Value {
    let capabilities = if declare_tasks { json!({"extensions": {TASKS_EXTENSION: {}}}) } else { json!({}) };
    json!({
        META_PROTOCOL_VERSION: PROTOCOL_VERSION,
        META_CLIENT_INFO: {"name": "mcp-affinity-era2026-client", "version": env!("CARGO_PKG_VERSION")},
        META_CLIENT_CAPABILITIES: capabilities,
    })
}

/// The JSON-RPC request body: `params` (an object, or null for none) with
/// [`request_meta`] merged into its `_meta`.
pub fn request_body(id: u64, method: &str, params: Value, declare_tasks: bool) -> Value {
    let mut params = match params {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let meta = params.entry("_meta").or_insert_with(|| json!({}));
    if let (Some(meta), Value::Object(ours)) = (meta.as_object_mut(), request_meta(declare_tasks)) {
        for (k, v) in ours {
            meta.entry(k).or_insert(v);
        }
    }
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// The headers of a 2026-07-28 request (see the module docs), with `options`' changes.
pub fn request_headers(method: &str, params: &Value, options: &Options) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    let mut set = |name: &str, value: &str| -> anyhow::Result<()> {
        let name = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("header name {name:?}"))?;
        if options.omit.iter().any(|o| name.as_str().eq_ignore_ascii_case(o)) {
            return Ok(());
        }
        headers.insert(name, HeaderValue::from_str(value).with_context(|| format!("header value {value:?}"))?);
        Ok(())
    };
    set("content-type", "application/json")?;
    set("accept", mcp_client::ACCEPT_BOTH)?;
    set("mcp-protocol-version", PROTOCOL_VERSION)?;
    set("mcp-method", method)?;
    if let Some(name) = mcp_name(method, params) {
        set("mcp-name", &encode_header_value(&name))?;
    }
    for (name, value) in &options.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("header name {name:?}"))?;
        headers.insert(name, HeaderValue::from_str(value).with_context(|| format!("header value {value:?}"))?);
    }
    Ok(headers)
}

/// Sends one 2026-07-28 request and returns the whole HTTP answer, whatever it is.
/// Returns the id used with it.
pub async fn send_raw(url: &str, method: &str, params: Value, options: &Options) -> anyhow::Result<(u64, RawResponse)> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let headers = request_headers(method, &params, options)?;
    let body = request_body(id, method, params, options.declare_tasks);
    let http = if options.shape == mcp_client::Shape::OneWrite { mcp_client::http_client() } else { options.shape.client() };
    let raw = mcp_client::send_shaped(&http, options.shape, reqwest::Method::POST, url, &headers, Bytes::from(body.to_string())).await?;
    Ok((id, raw))
}

/// Sends one 2026-07-28 request and reads its JSON-RPC answer (JSON or SSE).
///
/// Errors: [`Error::Rpc`] for a JSON-RPC error (any status), [`Error::Http`] for any
/// other non-2xx answer, [`Error::Transport`] when nothing arrived, [`Error::Protocol`]
/// for a 2xx answer without a response to this request.
pub async fn request(url: &str, method: &str, params: Value, options: &Options) -> Result<Answer, Error> {
    let (id, raw) = send_raw(url, method, params, options).await.map_err(|e| Error::Transport(format!("{e:#}")))?;
    let response = raw.messages().into_iter().find(|m| m.get("id") == Some(&json!(id)) || is_error_without_id(m));
    match response {
        Some(m) if m.get("error").is_some() => Err(Error::Rpc(RpcError::from_message(raw.status, &m["error"]))),
        Some(m) if raw.status.is_success() => match m.get("result") {
            Some(result) => Ok(Answer { result: result.clone(), raw }),
            None => Err(Error::Protocol(format!("response without result: {m}"))),
        },
        _ if !raw.status.is_success() => {
            Err(Error::Http { status: raw.status, body: raw.text(), headers: raw.headers })
        }
        _ => Err(Error::Protocol(format!("no response to request {id} in HTTP {}: {}", raw.status, raw.text()))),
    }
}

fn is_error_without_id(m: &Value) -> bool {
    m.get("error").is_some() && m.get("id").is_none_or(Value::is_null)
}

/// `tools/call` of `tool` with `args` (an object); [`ToolAnswer::Task`] if the server
/// made it a task (only possible when `options.declare_tasks`).
pub async fn call_tool(url: &str, tool: &str, args: Value, options: &Options) -> Result<ToolAnswer, Error> {
    let answer = request(url, "tools/call", json!({"name": tool, "arguments": args}), options).await?;
    tool_answer(answer.result)
}

/// [`call_tool`] declaring the tasks extension: the server may answer a task.
pub async fn call_tool_as_task(url: &str, tool: &str, args: Value) -> Result<ToolAnswer, Error> {
    call_tool(url, tool, args, &Options::tasks()).await
}

fn tool_answer(result: Value) -> Result<ToolAnswer, Error> {
    if result.get("resultType").and_then(Value::as_str) != Some("task") {
        return Ok(ToolAnswer::Complete(result));
    }
    let task_id = result
        .get("taskId")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Protocol(format!("task result without taskId: {result}")))?;
    Ok(ToolAnswer::Task(CreateTask {
        task_id: task_id.to_string(),
        status: result.get("status").and_then(Value::as_str).unwrap_or_default().to_string(),
        ttl_ms: result.get("ttlMs").and_then(Value::as_u64),
        poll_interval_ms: result.get("pollIntervalMs").and_then(Value::as_u64),
        raw: result,
    }))
}

/// `tasks/get` of `task_id` (`Mcp-Name: <task_id>`). An id the server does not hold is
/// `Err(Error::Rpc)` with code [`INVALID_PARAMS`] (-32602).
pub async fn get_task(url: &str, task_id: &str) -> Result<TaskState, Error> {
    get_task_with(url, task_id, &Options::tasks()).await
}

/// [`get_task`] with `options` (extra headers, a wrong `Mcp-Name`, ...); the tasks
/// extension is declared whatever `options.declare_tasks` says.
pub async fn get_task_with(url: &str, task_id: &str, options: &Options) -> Result<TaskState, Error> {
    let options = Options { declare_tasks: true, ..options.clone() };
    let answer = request(url, "tasks/get", json!({"taskId": task_id}), &options).await?;
    let r = answer.result;
    Ok(TaskState {
        task_id: r.get("taskId").and_then(Value::as_str).unwrap_or_default().to_string(),
        status: r
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Protocol(format!("tasks/get result without status: {r}")))?
            .to_string(),
        status_message: r.get("statusMessage").and_then(Value::as_str).map(str::to_string),
        result: r.get("result").cloned(),
        error: r.get("error").cloned(),
        poll_interval_ms: r.get("pollIntervalMs").and_then(Value::as_u64),
        ttl_ms: r.get("ttlMs").and_then(Value::as_u64),
        raw: r,
    })
}

/// Polls `tasks/get` (every `pollIntervalMs`, at most 1 s apart) until the task is
/// terminal; `Err(Error::Protocol)` if it is not within `timeout`, or the first error.
pub async fn wait_task(url: &str, task_id: &str, timeout: Duration) -> Result<TaskState, Error> {
    wait_task_with(url, task_id, timeout, &Options::tasks()).await
}

/// [`wait_task`], each poll sent with `options` ([`get_task_with`]; e.g. another
/// [`mcp_client::Shape`]).
pub async fn wait_task_with(url: &str, task_id: &str, timeout: Duration, options: &Options) -> Result<TaskState, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = get_task_with(url, task_id, options).await?;
        if state.is_terminal() {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            return Err(Error::Protocol(format!("task {task_id} still {} after {timeout:?}", state.status)));
        }
        let pause = state.poll_interval_ms.unwrap_or(100).min(1000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// `tasks/cancel` of `task_id`: the empty acknowledgement (the task settles later;
/// cancellation is cooperative). Unknown id: -32602.
pub async fn cancel_task(url: &str, task_id: &str) -> Result<Value, Error> {
    Ok(request(url, "tasks/cancel", json!({"taskId": task_id}), &Options::tasks()).await?.result)
}

/// `tasks/update` of `task_id` with `input_responses` (an object keyed by the task's
/// `inputRequests` keys): the empty acknowledgement. Unknown id: -32602.
pub async fn update_task(url: &str, task_id: &str, input_responses: Value) -> Result<Value, Error> {
    let params = json!({"taskId": task_id, "inputResponses": input_responses});
    Ok(request(url, "tasks/update", params, &Options::tasks()).await?.result)
}

/// `server/discover`: the server's `result` (`supportedVersions`, `capabilities` —
/// `extensions["io.modelcontextprotocol/tasks"]` when it serves tasks —,
/// `serverInfo`, ...).
pub async fn server_discover(url: &str) -> Result<Value, Error> {
    Ok(request(url, "server/discover", json!({}), &Options::default()).await?.result)
}

/// `tools/list`: the tool names.
pub async fn list_tools(url: &str) -> Result<Vec<String>, Error> {
    let result = request(url, "tools/list", json!({}), &Options::default()).await?.result;
    let tools = result
        .get("tools")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Protocol(format!("tools/list without tools: {result}")))?;
    Ok(tools.iter().filter_map(|t| t.get("name")?.as_str().map(str::to_string)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_base64_only_when_needed() {
        assert_eq!(encode_header_value("0b6c1c1e-8a9b-4c50"), "0b6c1c1e-8a9b-4c50");
        assert_eq!(encode_header_value("a b"), "a b");
        assert_eq!(encode_header_value(" a"), "=?base64?IGE=?=");
        assert_eq!(encode_header_value("é"), "=?base64?w6k=?=");
        assert_eq!(encode_header_value("=?base64?x?="), "=?base64?PT9iYXNlNjQ/eD89?=");
    }

    #[test]
    fn body_and_headers_of_tasks_get() {
        let params = json!({"taskId": "t-1"});
        let body = request_body(3, "tasks/get", params.clone(), true);
        assert_eq!(body["params"]["taskId"], "t-1");
        assert_eq!(body["params"]["_meta"][META_PROTOCOL_VERSION], PROTOCOL_VERSION);
        assert_eq!(body["params"]["_meta"][META_CLIENT_CAPABILITIES]["extensions"][TASKS_EXTENSION], json!({}));
        let h = request_headers("tasks/get", &params, &Options::default().header("Mcp-Name", "other")).unwrap();
        assert_eq!(h["mcp-method"], "tasks/get");
        assert_eq!(h["mcp-name"], "other");
        assert_eq!(h["mcp-protocol-version"], PROTOCOL_VERSION);
        let h = request_headers("tasks/get", &params, &Options::default().without("mcp-name")).unwrap();
        assert!(!h.contains_key("mcp-name"));
    }
}
