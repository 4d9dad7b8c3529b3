//! The machine's vocabulary with the host: the response head it reads ([`ResponseHead`]),
//! the actions it asks for ([`Op`]: header changes, calls to control, local replies), the
//! flow of the stream after an event ([`Flow`], [`Step`]) and control's answers ([`ControlAnswer`]).


use crate::jsonrpc::{self};


/// The property [`Op::WantResponse`] sets (`proxy_set_property`); Envoy keeps it as the
/// filter state `wasm.mcp_affinity.want_response` (Envoy
/// `source/extensions/common/wasm/context.cc`, `setProperty`: key `wasm.` + path), which
/// the response matcher reads (`envoy.matching.inputs.filter_state`).
pub const WANT_RESPONSE: &str = "mcp_affinity.want_response";

/// Response headers and the stream attributes known with them.
pub trait ResponseHead {
    /// `:status`, 0 when missing or not a number.
    fn status(&self) -> u16;
    /// A response header by lowercase name.
    fn header(&self, name: &str) -> Option<Vec<u8>>;
    /// Envoy `response.code_details` (`via_upstream` for a real upstream answer).
    fn code_details(&self) -> Option<Vec<u8>>;
    /// Envoy `response.flags` (bit set, `ResponseFlag`).
    fn flags(&self) -> u64;
    /// Envoy `upstream.address`, the upstream host that was selected (`ip:port`).
    fn upstream_address(&self) -> Option<Vec<u8>>;
    /// Envoy `upstream.request_attempt_count`: 1 for the first attempt, 2 after one retry
    /// (0 when unknown).
    fn attempt_count(&self) -> u64;
}

/// A header the machine writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The configured `pin_header` (routing header, e.g. `x-session-pod`).
    Pin,
    /// `mcp-session-id`.
    SessionId,
    /// `x-mcp-affinity-session` ([`crate::headers::CLIENT_SESSION`]).
    ClientSession,
    /// `x-mcp-affinity-pin` ([`crate::headers::RECOVERED_PIN`]).
    RecoveredPin,
}

/// What a call to control is about: `{prefix}/sessions/{id}` or `{prefix}/tasks/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Session,
    Task,
}

/// A call to the control service (`dispatch_http_call`), `{prefix}/sessions/{id}{suffix}`
/// or `{prefix}/tasks/{id}{suffix}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub resource: Resource,
    /// The session's or task's id (unencoded).
    pub id: String,
    pub suffix: &'static str,
    pub body: Option<Vec<u8>>,
    /// Overrides `control.timeout_ms` (milliseconds).
    pub timeout_ms: Option<u64>,
    /// `?wait_ms=N`: control waits up to N ms for a record that is not there yet.
    pub wait_ms: Option<u64>,
}

/// A local reply (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub content_type: String,
    /// `mcp-session-id` to put on the reply (the client's own id).
    pub session_id: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON-RPC error reply (`id: null`).
    pub(super) fn error(status: u32, code: i32, message: &str) -> Reply {
        Reply { status, content_type: "application/json".into(), session_id: None, body: jsonrpc::error_body(code, message) }
    }
}

/// An action on the stream (or, for [`Op::Wake`], on streams waiting for this one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    RemoveRequestHeader(Header),
    SetRequestHeader(Header, String),
    SetResponseHeader(Header, String),
    RemoveResponseHeader(Header),
    Call(Call),
    Reply(Reply),
    /// Marks the stream so that its response headers reach the filter: Envoy's response
    /// matcher (`envoy/envoy.yaml`) skips the filter for every 2xx answer unless the filter
    /// state [`WANT_RESPONSE`] is set. Sent on the request headers of the requests whose
    /// 2xx answer the filter acts on: a POST without session id (the answer may open a
    /// session), a DELETE (it ends one), a request sent under the backend's session id
    /// (the answer's id is the client's again).
    WantResponse,
    /// Apply `ops` to each waiting stream (paused in its request headers), then resume it
    /// if `resume`.
    Wake { waiters: Vec<u32>, ops: Vec<Op>, resume: bool },
}

/// What happens to the stream after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// (Event) let the headers or body go on.
    Continue,
    /// (Event) hold the stream; a later control answer resumes it or replies locally.
    Pause,
    /// (Control answer) resume the held request.
    ResumeRequest,
    /// (Control answer) resume the held response.
    ResumeResponse,
    /// (Control answer) nothing to resume: a local reply was sent, or nothing was held.
    Stay,
}

/// The result of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub ops: Vec<Op>,
    pub flow: Flow,
}

impl Step {
    pub(super) fn go(ops: Vec<Op>) -> Step {
        Step { ops, flow: Flow::Continue }
    }
    pub(super) fn hold(ops: Vec<Op>) -> Step {
        Step { ops, flow: Flow::Pause }
    }
    pub(super) fn flow(flow: Flow) -> Step {
        Step { ops: Vec::new(), flow }
    }
}

/// Control's answer to a call: `status` `None` when the call failed (reset, timeout, or
/// refused by the host).
#[derive(Debug, Clone, Default)]
pub struct ControlAnswer {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}


/// A request body for control: `value` as JSON text (the contract crate's types always
/// serialise).
pub fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the contract's types serialise")
}
