//! One HTTP stream's decisions, independent of the host: events in (request headers, a
//! request body chunk, response headers, a control answer, the end of the stream), a
//! [`Step`] out (header changes, calls to control, a local reply, and whether the stream
//! goes on). The proxy-wasm layer (`proxy/stream.rs`) only translates.
//!
//! The machine encodes the rules real Envoy imposes on a proxy-wasm HTTP filter (checked
//! in proxy-wasm-cpp-host `src/context.cc` and Envoy
//! `source/extensions/common/wasm/context.cc`; each has a unit test below):
//! 1. **A headers `Pause` stops the body too.** `convertVmCallResultToFilterHeadersStatus`
//!    turns StopIteration into `StopAllIterationAndWatermark`: no body event reaches the
//!    filter until it resumes the stream itself. So request headers are never paused to
//!    read the body: a POST without session id goes on at once and its body is copied
//!    chunk by chunk as it streams. Headers are paused only while waiting for control,
//!    and the control answer resumes them.
//! 2. **Request headers are readable only in the request-headers event** (and while that
//!    event's pause holds the stream): Envoy drops its pointer to them once the callback
//!    continued, and a later read fails (the SDK then panics). The `request.*` attributes
//!    go through the same pointer, so they are gone too. The machine gets the request
//!    headers as one serialised map ([`HeaderPairs`], one host call) and keeps that
//!    buffer when a recovery may need the request later.
//! 3. **A response body cannot be read before deciding on the response headers** (rule 1
//!    on the response side). A small error answer that may mean "session unknown" (400
//!    JSON, as TypeScript-SDK servers answer) is therefore held on its headers while
//!    control verifies the session with a probe ([`Reason::SessionSuspect`]); alive →
//!    the original answer goes on unchanged.
//! 4. **Response headers are writable only in the response-headers event** or while
//!    paused there (the session id the client sees is rewritten then).
//! 5. **Once the router is done, the rest of the request body never reaches the filter.**
//!    A router local reply (pinned pod gone) or an upstream answer can come before the
//!    body did (HTTP/1.1 clients that write headers and body apart, chunked bodies, HTTP/2
//!    DATA frames); Envoy then reads the body off the connection but calls no decoder
//!    filter with it (`-l trace`: `request end stream timestamp recorded`, no `decode data
//!    called`). So a replay is sent only for a body whose end the filter saw; Envoy's
//!    buffer filter ahead of this one (`envoy/envoy.yaml`) makes that every body.

use hashbrown::{HashMap, HashSet};

use crate::config::{FilterConfig, ReplayBy, UnknownSession};
use crate::drain::Draining;
use crate::control::{PatchSession, PutSession, parse_record, to_body};
use crate::header_map::HeaderPairs;
use crate::headers::{AUTHORITY, CONTENT_LENGTH, CONTENT_TYPE, MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, METHOD, PATH, RECOVERED_PIN};
use crate::jsonrpc::{self, BodyKind};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::pin_cache::PinCache;
use crate::record_queue::{self, NewRecord, RecordQueue};
use crate::recovery::{self, OriginalRequest, Outcome, Placement, Reason, RecoverRequest, StatusVerdict};
use crate::session_id;
use crate::store::{self, SharedData, Updated};

/// JSON-RPC method of the notification that completes MCP initialisation.
const INITIALIZED: &str = "notifications/initialized";

/// The property [`Op::WantResponse`] sets (`proxy_set_property`); Envoy keeps it as the
/// filter state `wasm.mcp_affinity.want_response` (Envoy
/// `source/extensions/common/wasm/context.cc`, `setProperty`: key `wasm.` + path), which
/// the response matcher reads (`envoy.matching.inputs.filter_state`).
pub const WANT_RESPONSE: &str = "mcp_affinity.want_response";

/// Host services the machine uses besides the stream itself.
pub trait Env {
    /// Envoy shared data (process-wide, all worker VMs).
    fn shared(&mut self) -> &mut dyn SharedData;
    /// Wall clock, Unix seconds (`proxy_get_current_time_nanoseconds`).
    fn now_secs(&self) -> u64;
    /// Adds one to a counter.
    fn count(&mut self, counter: Counter);
    /// The process-wide count of pin changes, counter `pins_changed` (`proxy_get_metric`:
    /// a number, no bytes copied into the VM).
    fn pins_changed(&self) -> u64;
}

/// State one VM (one Envoy worker thread) shares between its streams.
#[derive(Debug, Default)]
pub struct Vm {
    /// The next shared-data bucket this VM's sweep looks at.
    pub sweep_cursor: u32,
    /// Control lookups in flight on this VM: session id → waiting stream context ids. One
    /// lookup per session per VM; the other streams wait for it.
    pub lookups: HashMap<String, Vec<u32>>,
    /// Sessions whose last-seen should be refreshed in control on the next tick.
    pub touches: HashSet<String>,
    /// This VM's copies of the pins it used ([`crate::pin_cache`]).
    pub pins: PinCache,
    /// New sessions' records waiting for the root context's tick ([`crate::record_queue`]).
    pub records: RecordQueue,
    /// The draining upstream hosts, adopted from shared data on the tick.
    pub draining: Draining,
    /// Open pinned GET streams (server-to-client SSE): context id → upstream host. Ended
    /// when their upstream starts draining ([`Vm::streams_to_end`]).
    pub open_gets: HashMap<u32, String>,
}

impl Vm {
    /// The open GET streams whose upstream is draining: the root context ends them
    /// (`proxy_close_stream`) so that their clients reopen them, on a live pod.
    pub fn streams_to_end(&self) -> Vec<u32> {
        if self.draining.is_empty() {
            return Vec::new();
        }
        let mut ids: Vec<u32> = self.open_gets.iter().filter(|(_, u)| self.draining.contains(u)).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }
}

/// What one event sees of the plugin and its VM.
pub struct Ctx<'a> {
    pub cfg: &'a FilterConfig,
    /// A control service is configured.
    pub control: bool,
    pub vm: &'a mut Vm,
    pub env: &'a mut dyn Env,
}

impl Ctx<'_> {
    fn recoverable(&self) -> bool {
        self.control && self.cfg.recovery.enabled
    }

    /// The filter replays failed requests itself through control (`replay_by: filter`):
    /// pinned requests' bodies are copied.
    fn replays_itself(&self) -> bool {
        self.recoverable() && self.cfg.recovery.replay_by == ReplayBy::Filter
    }

    /// Envoy's retry carries failed requests to control's replay listener (`replay_by:
    /// envoy_retry`): nothing is copied; the answer may carry a new pin.
    fn envoy_retries(&self) -> bool {
        self.recoverable() && self.cfg.recovery.replay_by == ReplayBy::EnvoyRetry
    }

    fn count(&mut self, c: Counter) {
        self.env.count(c);
    }

    /// The change count this VM's cached pins are checked against; no host call when the
    /// cache is off.
    fn pins_changed(&self) -> u64 {
        if self.cfg.local_pins == 0 { 0 } else { self.env.pins_changed() }
    }

    /// Writes a new pin (no VM can hold a copy of it).
    fn put_pin(&mut self, session_id: &str, pin: &Pin) {
        self.write_pin(session_id, pin, false);
    }

    /// Writes a changed pin: shared data first, then the change count that makes every
    /// VM's copy of it stale.
    fn change_pin(&mut self, session_id: &str, pin: &Pin) {
        self.write_pin(session_id, pin, true);
    }

    /// Writes a pin to shared data (counting an eviction it caused), counts a change, and
    /// keeps this VM's copy.
    fn write_pin(&mut self, session_id: &str, pin: &Pin, changed: bool) {
        if store::put(self.env.shared(), self.cfg.layout(), session_id, pin) == Updated::Evicted {
            self.count(Counter::PinsEvicted);
        }
        if changed {
            self.count(Counter::PinsChanged);
        }
        let changes = self.pins_changed();
        self.vm.pins.put(session_id, pin, changes, self.cfg.local_pins);
    }

    /// Refreshes the last-seen time of a pin (shared data and this VM's copy).
    fn touch_pin(&mut self, session_id: &str, now: u64) {
        store::touch(self.env.shared(), self.cfg.layout(), session_id, now);
        self.vm.pins.update(session_id, |p| p.last_seen = p.last_seen.max(now));
    }

    /// Marks a pin as past `notifications/initialized` (shared data and this VM's copy).
    fn mark_recorded(&mut self, session_id: &str) {
        store::mark_recorded(self.env.shared(), self.cfg.layout(), session_id);
        self.vm.pins.update(session_id, |p| p.recorded = true);
    }

    /// `?wait_ms=` for calls about an existing session: control waits this long for a
    /// record whose (asynchronous) write may still be in flight.
    fn record_wait(&self) -> Option<u64> {
        self.cfg.control.as_ref().map(|c| c.lookup_wait_ms).filter(|ms| *ms > 0)
    }

    /// Pins `session_id` where control says the session lives now (after a recovery or a
    /// move; control has recorded it, so nothing is left to record).
    fn repin(&mut self, session_id: &str, new: &Placement) -> Pin {
        let pin = Pin {
            upstream: new.upstream.clone(),
            generation: new.generation,
            last_seen: self.env.now_secs(),
            backend_session_id: new.backend_session_id.clone(),
            recorded: true,
        };
        self.change_pin(session_id, &pin);
        pin
    }

    /// Forgets a pin: shared data, this VM's copy, and every other VM's (a change).
    fn forget_pin(&mut self, session_id: &str) {
        store::forget(self.env.shared(), self.cfg.layout(), session_id);
        self.vm.pins.remove(session_id);
        self.count(Counter::PinsChanged);
    }

    /// The pin of a session: this VM's copy while no pin changed since it was taken, else
    /// shared data (then copied).
    fn get_pin(&mut self, session_id: &str) -> Option<Pin> {
        let changes = self.pins_changed();
        let now = self.env.now_secs();
        if let Some(pin) = self.vm.pins.get(session_id, changes, now, self.cfg.session_ttl_secs) {
            return Some(pin.clone());
        }
        let pin = store::get(self.env.shared(), self.cfg.layout(), session_id)?;
        self.vm.pins.put(session_id, &pin, changes, self.cfg.local_pins);
        Some(pin)
    }
}

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

/// A call to the control service (`dispatch_http_call`), `{prefix}/sessions/{id}{suffix}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub session_id: String,
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
    fn error(status: u32, code: i32, message: &str) -> Reply {
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
    fn go(ops: Vec<Op>) -> Step {
        Step { ops, flow: Flow::Continue }
    }
    fn hold(ops: Vec<Op>) -> Step {
        Step { ops, flow: Flow::Pause }
    }
    fn flow(flow: Flow) -> Step {
        Step { ops: Vec::new(), flow }
    }
}

/// Control's answer to a call: `status` `None` when the call failed (reset, timeout, or
/// refused by the host).
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

/// A bounded copy of a request body, taken chunk by chunk as it streams upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyCopy {
    Off,
    On {
        bytes: Vec<u8>,
        limit: usize,
        /// The end of the stream was seen: `bytes` is the whole body the client sent.
        whole: bool,
    },
    /// Went over its limit.
    Over,
}

impl BodyCopy {
    /// A copy of up to `limit` bytes (`Off` for 0); `whole` when the request has no body
    /// (its headers ended the stream).
    fn new(limit: usize, whole: bool) -> BodyCopy {
        if limit == 0 { BodyCopy::Off } else { BodyCopy::On { bytes: Vec::new(), limit, whole } }
    }

    fn wants(&self) -> bool {
        matches!(self, BodyCopy::On { whole: false, .. })
    }

    /// Appends a chunk (`end_of_stream`: the last one); false when the copy just went over
    /// its limit. The first chunk (the whole body of most requests) becomes the copy
    /// itself: no second allocation.
    fn push(&mut self, chunk: Vec<u8>, end_of_stream: bool) -> bool {
        if let BodyCopy::On { bytes, limit, whole } = self {
            if bytes.len() + chunk.len() > *limit {
                *self = BodyCopy::Over;
                return false;
            }
            if bytes.is_empty() {
                *bytes = chunk;
            } else {
                bytes.extend_from_slice(&chunk);
            }
            *whole = end_of_stream;
        }
        true
    }

    /// The whole body the client sent, or `None`: the copy is off, over its limit, still
    /// streaming, or shorter or longer than the request's `content-length` (a replay
    /// carries exactly the client's bytes or nothing).
    fn whole(&self, head: &HeaderPairs) -> Option<&[u8]> {
        let BodyCopy::On { bytes, whole: true, .. } = self else { return None };
        let declared = head.get(CONTENT_LENGTH).and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
        match declared {
            Some(n) if n != bytes.len() => {
                log::warn!("mcp-affinity: request body of {} bytes against content-length {n}: not replayable", bytes.len());
                None
            }
            _ => Some(bytes),
        }
    }
}

/// A request routed by its session's pin.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pinned {
    client_id: String,
    pin: Pin,
    kind: Kind,
    /// The body is classified to record `notifications/initialized` with control.
    watch_lifecycle: bool,
    /// The request headers, kept when a recovery may replay the request (rule 2).
    request: Option<HeaderPairs>,
    /// The request body, for a replay by control and for the lifecycle.
    body: BodyCopy,
    /// The response carries the backend's session id, to be replaced by the client's.
    rewrite_response_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Nothing to do.
    Passthrough,
    /// A POST without session id: its response may open a session.
    NewSession { body: BodyCopy, initialize: Option<Vec<u8>> },
    /// Held while control is asked about the session (by this stream, or by another
    /// one of this VM that this stream waits for).
    Resolving(Resolving),
    Pinned(Pinned),
    /// The filter answered itself.
    Answered,
}

/// The HTTP method, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Ends the session (MCP `basic/transports`); never recovered or moved.
    Delete,
    /// Opens a server-to-client SSE stream.
    Get,
    /// POST (or anything else).
    Other,
}

/// A request of a known session waiting for its pin: from control (lookup), from a
/// drain move, or from another stream of this VM doing either.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolving {
    client_id: String,
    kind: Kind,
    request: Option<HeaderPairs>,
    /// The request headers ended the stream (no body).
    no_body: bool,
    /// Set while this stream moves the session off this pin, whose upstream drains.
    moving: Option<Pin>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Lookup,
    /// A drain move: `POST {prefix}/sessions/{id}/recover` with reason `draining`.
    Move,
    WriteInitialize,
    RecordInitialized,
    Delete,
    Recover,
}

/// What control (or its absence) said about a session unknown to shared data.
enum Resolution {
    Found(Pin),
    Unknown,
    Unavailable,
}

/// The per-stream machine.
#[derive(Debug)]
pub struct Stream {
    context_id: u32,
    phase: Phase,
    pending: Pending,
}

fn header_str(v: Option<Vec<u8>>) -> Option<String> {
    v.and_then(|b| String::from_utf8(b).ok())
}

/// Ops that route a request by `pin`, sent by a client that knows the session as `client_id`.
fn pin_ops(cfg: &FilterConfig, client_id: &str, pin: &Pin, ops: &mut Vec<Op>) {
    ops.push(Op::SetRequestHeader(Header::Pin, cfg.pin_encoding.header_value(&pin.upstream)));
    if pin.backend_session_id != client_id {
        ops.push(Op::SetRequestHeader(Header::SessionId, pin.backend_session_id.clone()));
        if cfg.recovery.replay_by == ReplayBy::EnvoyRetry {
            // Control's replay listener finds the record by the client's id.
            ops.push(Op::SetRequestHeader(Header::ClientSession, client_id.to_string()));
        }
        // The answer may carry the backend's id, which the client must never see: its
        // response headers must reach the filter even where Envoy's response matcher
        // would skip it.
        ops.push(Op::WantResponse);
    }
}

/// The ops a resolution puts on a request of session `client_id`, whether the request
/// goes on (else the ops hold a local reply), and what it counts.
fn resolution_ops(cfg: &FilterConfig, client_id: &str, r: &Resolution, ops: &mut Vec<Op>) -> (bool, Counter) {
    match r {
        Resolution::Found(pin) => {
            pin_ops(cfg, client_id, pin, ops);
            (true, Counter::RequestsPinned)
        }
        Resolution::Unknown if cfg.unknown_session == UnknownSession::NotFound => {
            log::debug!("mcp-affinity: unknown session {client_id}: 404");
            ops.push(Op::Reply(Reply::error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found")));
            (false, Counter::UnknownSession)
        }
        Resolution::Unknown | Resolution::Unavailable => (true, Counter::RequestsUnpinned),
    }
}

impl Stream {
    /// A new stream with the host's context id.
    pub fn new(context_id: u32) -> Stream {
        Stream { context_id, phase: Phase::Passthrough, pending: Pending::None }
    }

    /// Whether the call this stream waits for writes a record (its answer still counts
    /// when the stream has ended before it came).
    pub fn waits_for_a_write(&self) -> bool {
        matches!(self.pending, Pending::WriteInitialize | Pending::RecordInitialized | Pending::Delete)
    }

    /// Whether the machine waits for a control answer (the proxy layer reads the answer
    /// body only then).
    pub fn waits_for_control(&self) -> bool {
        self.pending != Pending::None
    }

    /// `no_body`: the request headers ended the stream.
    fn pinned(cx: &Ctx, client_id: String, pin: Pin, kind: Kind, request: Option<HeaderPairs>, no_body: bool) -> Pinned {
        let is_delete = kind == Kind::Delete;
        let watch_lifecycle = cx.control && !pin.recorded && !is_delete;
        let limit = if is_delete {
            0
        } else if cx.replays_itself() {
            cx.cfg.recovery.max_replay_body_bytes.max(if watch_lifecycle { cx.cfg.max_body_bytes } else { 0 })
        } else if watch_lifecycle {
            cx.cfg.max_body_bytes
        } else {
            0
        };
        // Kept for a replay, or for the protocol version of `notifications/initialized`.
        let request = if limit > 0 { request } else { None };
        Pinned { client_id, pin, kind, watch_lifecycle, request, body: BodyCopy::new(limit, no_body), rewrite_response_id: false }
    }

    /// Enters the pinned phase; an open GET stream is remembered so that a drain of its
    /// upstream can end it (only with control: drains come from control).
    fn enter_pinned(&mut self, cx: &mut Ctx, p: Pinned) {
        if p.kind == Kind::Get && cx.control {
            cx.vm.open_gets.insert(self.context_id, p.pin.upstream.clone());
        }
        self.phase = Phase::Pinned(p);
    }

    // ---- request headers -------------------------------------------------------------

    /// `on_http_request_headers`. Removes any client-sent pin header (a client must never
    /// choose the upstream host), then routes by session id, or watches a POST without one.
    pub fn on_request_headers(&mut self, cx: &mut Ctx, head: HeaderPairs, end_of_stream: bool) -> Step {
        let mut ops = Vec::new();
        // One pass over the map for every header this event looks at.
        let [client_pin, method, session_id, mcp_method] = head.find([&cx.cfg.pin_header, METHOD, MCP_SESSION_ID, MCP_METHOD]);
        if client_pin.is_some() {
            ops.push(Op::RemoveRequestHeader(Header::Pin));
            cx.count(Counter::ClientPinHeaderRemoved);
        }
        let method = method.unwrap_or_default();
        let is_post = method == b"POST";
        let kind = match method {
            b"DELETE" => Kind::Delete,
            b"GET" => Kind::Get,
            _ => Kind::Other,
        };
        if let Some(raw_id) = session_id {
            return match session_id::validate(raw_id, cx.cfg.max_session_id_len) {
                Ok(id) => {
                    let id = id.to_string();
                    if kind == Kind::Delete {
                        // Its 2xx (or 404) ends the session here too, whichever way it is
                        // routed (now, or after a lookup this stream waits for).
                        ops.push(Op::WantResponse);
                    }
                    self.route_session(cx, head, id, kind, end_of_stream, ops)
                }
                Err(e) => {
                    cx.count(Counter::InvalidSessionId);
                    self.phase = Phase::Answered;
                    ops.push(Op::Reply(Reply::error(400, jsonrpc::code::INVALID_REQUEST, &format!("Bad Request: {e}"))));
                    Step::hold(ops)
                }
            };
        }
        if is_post {
            // The answer may carry a new session's `Mcp-Session-Id`.
            ops.push(Op::WantResponse);
            // May be `initialize`. Its body is copied only for control's record (the
            // `initialize` a recovery replays on another pod); without control nothing
            // reads it: the answer's `Mcp-Session-Id` alone pins the session. The hint
            // header lets us skip the body when it names another method; it is never a
            // reason to pin by itself. Rule 1: the headers go on; the body is copied as it
            // streams.
            let copy = !end_of_stream && cx.control && mcp_method.is_none_or(|m| m == jsonrpc::INITIALIZE.as_bytes());
            let body = if copy { BodyCopy::new(cx.cfg.max_body_bytes, false) } else { BodyCopy::Off };
            self.phase = Phase::NewSession { body, initialize: None };
        }
        Step::go(ops)
    }

    fn route_session(&mut self, cx: &mut Ctx, head: HeaderPairs, client_id: String, kind: Kind, no_body: bool, mut ops: Vec<Op>) -> Step {
        let Some(mut pin) = cx.get_pin(&client_id) else {
            let r = Resolving { client_id, kind, request: Some(head), no_body, moving: None };
            return self.resolve(cx, r, ops);
        };
        if kind != Kind::Delete && cx.recoverable() && cx.vm.draining.contains(&pin.upstream) {
            let r = Resolving { client_id, kind, request: Some(head), no_body, moving: None };
            return self.move_or_wait(cx, r, pin, ops);
        }
        pin_ops(cx.cfg, &client_id, &pin, &mut ops);
        cx.count(Counter::RequestsPinned);
        let now = cx.env.now_secs();
        if pin.needs_touch(now, cx.cfg.touch_interval_secs) {
            pin.last_seen = now;
            cx.touch_pin(&client_id, now);
            if cx.control {
                cx.vm.touches.insert(client_id.clone());
            }
        }
        // The id copied out of the headers once becomes the stream's own: no second copy.
        let p = Self::pinned(cx, client_id, pin, kind, Some(head), no_body);
        self.enter_pinned(cx, p);
        Step::go(ops)
    }

    /// The session is not in shared data: ask control (one lookup per session per VM;
    /// later requests wait for it), or apply the policy when there is no control.
    fn resolve(&mut self, cx: &mut Ctx, r: Resolving, mut ops: Vec<Op>) -> Step {
        if !cx.control {
            let go_on = self.settle(cx, r, &Resolution::Unknown, &mut ops);
            return if go_on { Step::go(ops) } else { Step::hold(ops) };
        }
        if self.join_or_lead(cx, &r) {
            self.phase = Phase::Resolving(r);
            return Step::hold(ops);
        }
        cx.count(Counter::ControlLookups);
        self.pending = Pending::Lookup;
        let wait_ms = cx.record_wait();
        ops.push(Op::Call(Call { method: "GET", session_id: r.client_id.clone(), suffix: "", body: None, timeout_ms: None, wait_ms }));
        self.phase = Phase::Resolving(r);
        Step::hold(ops)
    }

    /// Joins the lookup or move of this session another stream of this VM has in flight
    /// (true: this stream now waits for it), or registers this stream's own, which the
    /// streams after it will wait for (false: this stream makes the call).
    fn join_or_lead(&self, cx: &mut Ctx, r: &Resolving) -> bool {
        match cx.vm.lookups.entry_ref(r.client_id.as_str()) {
            hashbrown::hash_map::EntryRef::Occupied(mut waiters) => {
                waiters.get_mut().push(self.context_id);
                true
            }
            hashbrown::hash_map::EntryRef::Vacant(slot) => {
                slot.insert(Vec::new());
                false
            }
        }
    }

    /// The session's pin is on a draining upstream: move the session before this request
    /// is sent (control re-initializes it on a live pod; nothing is replayed, so any
    /// method is safe), or wait for the move another stream of this VM started.
    fn move_or_wait(&mut self, cx: &mut Ctx, r: Resolving, pin: Pin, ops: Vec<Op>) -> Step {
        if self.join_or_lead(cx, &r) {
            self.phase = Phase::Resolving(r);
            return Step::hold(ops);
        }
        self.start_move(cx, r, pin, ops)
    }

    /// Asks control to move the session off `pin` (its entry in the VM's lookups exists:
    /// other streams of the session wait for this one). The request headers stay held.
    fn start_move(&mut self, cx: &mut Ctx, mut r: Resolving, pin: Pin, mut ops: Vec<Op>) -> Step {
        let head = r.request.as_ref();
        let request = RecoverRequest {
            failed_generation: pin.generation,
            failed_upstream: &pin.upstream,
            reason: Reason::Draining,
            request: head.map(|h| original_request(h, "", false)).unwrap_or_default(),
            session_errors: None,
        };
        log::info!("mcp-affinity: moving session {} off draining {}", r.client_id, pin.upstream);
        let call = Call {
            method: "POST",
            session_id: r.client_id.clone(),
            suffix: "/recover",
            body: Some(to_body(&request)),
            timeout_ms: Some(cx.cfg.recovery.timeout_ms),
            wait_ms: cx.record_wait(),
        };
        ops.push(Op::Call(call));
        r.moving = Some(pin);
        self.phase = Phase::Resolving(r);
        self.pending = Pending::Move;
        Step::hold(ops)
    }

    /// Applies a resolution to this stream; returns whether the request goes on (else a
    /// local reply was queued).
    fn settle(&mut self, cx: &mut Ctx, r: Resolving, resolution: &Resolution, ops: &mut Vec<Op>) -> bool {
        let (go_on, counter) = resolution_ops(cx.cfg, &r.client_id, resolution, ops);
        cx.count(counter);
        match resolution {
            Resolution::Found(pin) => {
                let p = Self::pinned(cx, r.client_id, pin.clone(), r.kind, r.request, r.no_body);
                self.enter_pinned(cx, p);
            }
            _ if go_on => self.phase = Phase::Passthrough,
            _ => self.phase = Phase::Answered,
        }
        go_on
    }

    /// A stream that waited for another stream's lookup learns its pin from shared data
    /// at its next event.
    fn catch_up(&mut self, cx: &mut Ctx) {
        if matches!(self.phase, Phase::Resolving(_))
            && self.pending == Pending::None
            && let Phase::Resolving(r) = std::mem::replace(&mut self.phase, Phase::Passthrough)
            && let Some(pin) = cx.get_pin(&r.client_id)
        {
            let p = Self::pinned(cx, r.client_id, pin, r.kind, r.request, r.no_body);
            self.enter_pinned(cx, p);
        }
    }

    // ---- request body ----------------------------------------------------------------

    /// `on_http_request_body` with this event's chunk (`read` gives its bytes; it is
    /// called only when the machine copies). Never pauses except to record
    /// `notifications/initialized` with control at the end of the body.
    pub fn on_request_body(&mut self, cx: &mut Ctx, read: &dyn Fn() -> Vec<u8>, end_of_stream: bool) -> Step {
        self.catch_up(cx);
        match &mut self.phase {
            Phase::NewSession { body, initialize } => {
                if body.wants() && !body.push(read(), end_of_stream) {
                    cx.count(Counter::BodyTooLarge);
                    log::debug!("mcp-affinity: POST body over {} bytes, not inspected", cx.cfg.max_body_bytes);
                }
                if end_of_stream && let BodyCopy::On { bytes, .. } = std::mem::replace(body, BodyCopy::Off) {
                    match jsonrpc::classify(&bytes) {
                        BodyKind::Initialize => {
                            cx.count(Counter::InitializeSeen);
                            *initialize = Some(bytes);
                        }
                        BodyKind::Malformed => cx.count(Counter::MalformedBody),
                        BodyKind::Other => {}
                    }
                }
                Step::flow(Flow::Continue)
            }
            Phase::Pinned(p) => {
                if p.body.wants() && !p.body.push(read(), end_of_stream) {
                    p.watch_lifecycle = false;
                }
                if end_of_stream && p.watch_lifecycle {
                    p.watch_lifecycle = false;
                    return self.watch_lifecycle(cx);
                }
                Step::flow(Flow::Continue)
            }
            _ => Step::flow(Flow::Continue),
        }
    }

    /// The whole body of a session not yet past initialisation: record
    /// `notifications/initialized` (and the protocol version) with control, or note that
    /// the session is past it.
    fn watch_lifecycle(&mut self, cx: &mut Ctx) -> Step {
        let Phase::Pinned(p) = &self.phase else { return Step::flow(Flow::Continue) };
        let BodyCopy::On { bytes, .. } = &p.body else { return Step::flow(Flow::Continue) };
        if jsonrpc::method(bytes).as_deref() != Some(INITIALIZED) {
            // Anything else means the session is past initialisation (MCP lifecycle).
            let id = p.client_id.clone();
            cx.mark_recorded(&id);
            return Step::flow(Flow::Continue);
        }
        let text = String::from_utf8_lossy(bytes);
        let version = p.request.as_ref().and_then(|h| h.get(MCP_PROTOCOL_VERSION)).and_then(|v| std::str::from_utf8(v).ok());
        let patch = PatchSession { initialized: Some(&text), protocol_version: version };
        let wait_ms = cx.record_wait();
        let call = Call { method: "PATCH", session_id: p.client_id.clone(), suffix: "", body: Some(to_body(&patch)), timeout_ms: None, wait_ms };
        self.pending = Pending::RecordInitialized;
        Step::hold(vec![Op::Call(call)])
    }

    // ---- response headers ------------------------------------------------------------

    /// `on_http_response_headers`.
    pub fn on_response_headers(&mut self, cx: &mut Ctx, head: &dyn ResponseHead) -> Step {
        cx.count(Counter::ResponseHeadersSeen);
        self.catch_up(cx);
        match std::mem::replace(&mut self.phase, Phase::Passthrough) {
            Phase::NewSession { initialize, .. } => match head.header(MCP_SESSION_ID) {
                Some(raw_id) => self.record_new_session(cx, head, &raw_id, initialize),
                None => Step::flow(Flow::Continue),
            },
            Phase::Pinned(p) => self.on_pinned_response(cx, head, p),
            other => {
                self.phase = other;
                Step::flow(Flow::Continue)
            }
        }
    }

    /// The response to a POST without session id carries `Mcp-Session-Id`: the upstream
    /// host that answered owns the new session (MCP `basic/transports`: the id comes with
    /// the InitializeResult). The record is queued in the VM for the root context's next
    /// flush to control (`async`, the default; other proxies' lookups wait for it with
    /// `?wait_ms`), or the answer is held until control has it (`sync`).
    fn record_new_session(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, raw_id: &[u8], initialize: Option<Vec<u8>>) -> Step {
        let session_id = match session_id::validate(raw_id, cx.cfg.max_session_id_len) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("mcp-affinity: upstream issued an invalid session id, not pinned: {e}");
                return Step::flow(Flow::Continue);
            }
        };
        let upstream = header_str(head.upstream_address()).filter(|s| !s.is_empty() && !s.contains(' '));
        let Some(upstream) = upstream else {
            cx.count(Counter::NoUpstreamAddress);
            log::warn!("mcp-affinity: no upstream.address for session {session_id}: not pinned");
            return Step::flow(Flow::Continue);
        };
        let pin = Pin { upstream, generation: 1, last_seen: cx.env.now_secs(), backend_session_id: session_id.to_string(), recorded: !cx.control };
        cx.put_pin(session_id, &pin);
        cx.count(Counter::SessionsPinned);
        log::debug!("mcp-affinity: pinned new session {session_id} → {}", pin.upstream);
        if !cx.control {
            return Step::flow(Flow::Continue);
        }
        let initialize = initialize.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if cx.cfg.queues_records() {
            // Async: the record waits in the VM; the root context sends the queue to
            // control on its tick, in one call for many sessions. Nothing is held.
            if !cx.vm.records.push(NewRecord::new(session_id, session_id, &pin.upstream, 1, initialize)) {
                cx.count(Counter::ControlErrors);
                log::warn!("mcp-affinity: {} records wait for control already; session {session_id} is not recorded", record_queue::MAX_QUEUED);
            }
            return Step::flow(Flow::Continue);
        }
        let body = to_body(&PutSession { backend_session_id: session_id, upstream: &pin.upstream, generation: 1, initialize: &initialize });
        let call = Call { method: "PUT", session_id: session_id.to_string(), suffix: "", body: Some(body), timeout_ms: None, wait_ms: None };
        self.pending = Pending::WriteInitialize;
        Step::hold(vec![Op::Call(call)])
    }

    /// Decides on the response headers of a pinned request: forget a deleted session,
    /// recover, verify a suspect error with control, or pass on (with the client's id).
    /// Without control and with the client's own session id, nothing here is needed: the
    /// steady path reads nothing from the response.
    fn on_pinned_response(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, mut p: Pinned) -> Step {
        p.rewrite_response_id = p.pin.backend_session_id != p.client_id && head.header(MCP_SESSION_ID).is_some();
        // DELETE answered 2xx ends the session; 404 says it is gone already. Never recovered.
        if p.kind == Kind::Delete {
            let status = head.status();
            if (200..300).contains(&status) || status == 404 {
                return self.forget(cx, p);
            }
            return self.pass_on(p, Flow::Continue);
        }
        if cx.envoy_retries() {
            return self.learn_recovered_pin(cx, head, p);
        }
        if cx.recoverable()
            && let Some(reason) = Self::recovery_reason(cx, head, head.status())
        {
            return self.start_recovery(cx, p, reason);
        }
        self.pass_on(p, Flow::Continue)
    }

    /// `replay_by: envoy_retry`: a failed request was retried by Envoy to control's replay
    /// listener, whose answer names the session's pin ([`RECOVERED_PIN`]): re-pin, and keep
    /// the header from the client. Trusted only on a retried attempt
    /// (`upstream.request_attempt_count` ≥ 2; the route retries once, to control): a pod
    /// answers the first attempt and must not move sessions. Any other answer, a 404
    /// included (control found no live pod, or the retry was not possible), goes on as it
    /// is; the filter has nothing to add.
    fn learn_recovered_pin(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, p: Pinned) -> Step {
        let Some(value) = head.header(RECOVERED_PIN) else { return self.pass_on(p, Flow::Continue) };
        let attempt = head.attempt_count();
        match recovery::parse_recovered_pin(&value) {
            Ok(new) if attempt >= 2 => {
                log::info!("mcp-affinity: session {} recovered by control on {} (generation {})", p.client_id, new.upstream, new.generation);
                cx.repin(&p.client_id, &new);
                cx.count(Counter::RecoveredPins);
            }
            Ok(_) => {
                log::warn!("mcp-affinity: {RECOVERED_PIN} on attempt {attempt} of session {} ignored: only Envoy's retry reaches control", p.client_id);
                cx.count(Counter::RecoveredPinsRejected);
            }
            Err(e) => {
                log::warn!("mcp-affinity: session {}: {e}", p.client_id);
                cx.count(Counter::RecoveredPinsRejected);
            }
        }
        let mut step = self.pass_on(p, Flow::Continue);
        step.ops.push(Op::RemoveResponseHeader(Header::RecoveredPin));
        step
    }

    /// Why a response of a pinned request needs control, if it does. Router local replies
    /// (statuses ≥ 500 only, so a steady 2xx reads no property) name the upstream failure;
    /// an upstream's own answer is judged by its status and content type.
    fn recovery_reason(cx: &Ctx, head: &dyn ResponseHead, status: u16) -> Option<Reason> {
        if status >= 500 {
            let details = head.code_details().unwrap_or_default();
            let details = String::from_utf8_lossy(&details);
            return recovery::local_reply_reason(&details, head.flags());
        }
        match recovery::status_verdict(&cx.cfg.recovery, status) {
            StatusVerdict::SessionUnknown => Some(Reason::SessionUnknown),
            StatusVerdict::InspectBody => {
                let ct = head.header(CONTENT_TYPE).unwrap_or_default();
                ct.starts_with(b"application/json").then_some(Reason::SessionSuspect)
            }
            StatusVerdict::Fine => None,
        }
    }

    /// Lets the response through, mapping the backend's session id to the client's.
    fn pass_on(&mut self, p: Pinned, flow: Flow) -> Step {
        let ops = if p.rewrite_response_id { vec![Op::SetResponseHeader(Header::SessionId, p.client_id.clone())] } else { Vec::new() };
        self.phase = Phase::Pinned(p);
        Step { ops, flow }
    }

    /// Forgets an ended session here and in control.
    fn forget(&mut self, cx: &mut Ctx, p: Pinned) -> Step {
        cx.forget_pin(&p.client_id);
        cx.vm.touches.remove(&p.client_id);
        cx.count(Counter::SessionsForgotten);
        let id = p.client_id.clone();
        let step = self.pass_on(p, Flow::Continue);
        if !cx.control {
            return step;
        }
        self.pending = Pending::Delete;
        let mut ops = step.ops;
        ops.push(Op::Call(Call { method: "DELETE", session_id: id, suffix: "", body: None, timeout_ms: None, wait_ms: None }));
        Step::hold(ops)
    }

    /// Asks control to recover the session (or, for a suspect answer, to verify it first)
    /// and answer this request; the response headers stay held until control answers
    /// (bounded by `recovery.timeout_ms`).
    ///
    /// Only a body seen whole is sent for a replay (rule 5). One still streaming — a router
    /// local reply can come before the body reached the filter (clients that write headers
    /// and body apart, chunked bodies, HTTP/2 DATA frames), and Envoy never hands the
    /// filter the rest once the router is done — or over the replay limit, or not matching
    /// its `content-length`, is never sent: control recovers the session and answers that
    /// the request did not run and may be sent again (`body_complete: false`).
    fn start_recovery(&mut self, cx: &mut Ctx, p: Pinned, reason: Reason) -> Step {
        let Some(head) = &p.request else {
            // Not kept: a request the filter does not replay (DELETE never gets here).
            return self.pass_on(p, Flow::Continue);
        };
        // JSON text is UTF-8 (RFC 8259): a body that is not is never replayed, rather than
        // replayed with replacement characters.
        let whole = p.body.whole(head).and_then(|b| std::str::from_utf8(b).ok());
        if whole.is_none() {
            cx.count(if p.body == BodyCopy::Over { Counter::RecoveryBodyTooLarge } else { Counter::RecoveryBodyIncomplete });
            log::warn!("mcp-affinity: session {} needs recovery; its request body is not replayable (over the replay limit or incomplete)", p.client_id);
        }
        let request = RecoverRequest {
            failed_generation: p.pin.generation,
            failed_upstream: &p.pin.upstream,
            reason,
            request: original_request(head, whole.unwrap_or_default(), whole.is_some()),
            session_errors: (reason == Reason::SessionSuspect).then(|| recovery::SessionErrors::of(&cx.cfg.recovery)),
        };
        log::info!("mcp-affinity: recovering session {} ({reason:?}) from {}", p.client_id, p.pin.upstream);
        let call = Call { method: "POST", session_id: p.client_id.clone(), suffix: "/recover", body: Some(to_body(&request)), timeout_ms: Some(cx.cfg.recovery.timeout_ms), wait_ms: cx.record_wait() };
        self.phase = Phase::Pinned(p);
        self.pending = Pending::Recover;
        Step::hold(vec![Op::Call(call)])
    }

    // ---- control answers -------------------------------------------------------------

    /// Control answered the call this stream made (or the call failed: `status` None).
    pub fn on_control_answer(&mut self, cx: &mut Ctx, answer: Answer) -> Step {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        let ok = answer.status.is_some_and(|s| (200..300).contains(&s) || s == 404);
        if !matches!(pending, Pending::Lookup | Pending::Move | Pending::None) {
            if ok {
                cx.count(Counter::ControlWrites);
            } else {
                log::warn!("mcp-affinity: control call failed: status {:?}", answer.status);
                cx.count(Counter::ControlErrors);
            }
        }
        match pending {
            Pending::Lookup => self.on_lookup_answer(cx, answer),
            Pending::Move => self.on_move_answer(cx, answer),
            Pending::RecordInitialized => {
                if ok && let Phase::Pinned(p) = &self.phase {
                    cx.mark_recorded(&p.client_id);
                }
                Step::flow(Flow::ResumeRequest)
            }
            Pending::WriteInitialize | Pending::Delete => Step::flow(Flow::ResumeResponse),
            // Nothing was held; the stream went on (or is gone: then this is not called).
            Pending::Recover => self.on_recover_answer(cx, answer),
            Pending::None => Step::flow(Flow::Stay),
        }
    }

    fn on_lookup_answer(&mut self, cx: &mut Ctx, answer: Answer) -> Step {
        let Phase::Resolving(r) = std::mem::replace(&mut self.phase, Phase::Passthrough) else {
            return Step::flow(Flow::Stay);
        };
        let resolution = match answer.status {
            Some(200) => match parse_record(&answer.body) {
                Ok(record) => {
                    cx.count(Counter::ControlHits);
                    let pin = Pin {
                        upstream: record.upstream,
                        generation: record.generation,
                        last_seen: cx.env.now_secs(),
                        backend_session_id: record.backend_session_id,
                        recorded: record.initialized.is_some(),
                    };
                    cx.put_pin(&r.client_id, &pin);
                    Resolution::Found(pin)
                }
                Err(e) => {
                    log::warn!("mcp-affinity: {e}");
                    cx.count(Counter::ControlErrors);
                    Resolution::Unavailable
                }
            },
            Some(404) => Resolution::Unknown,
            other => {
                log::warn!("mcp-affinity: control lookup of {} failed: status {other:?}; forwarded unpinned", r.client_id);
                cx.count(Counter::ControlErrors);
                Resolution::Unavailable
            }
        };
        match resolution {
            // Found on a draining upstream: move it first (the waiters keep waiting).
            Resolution::Found(pin) if r.kind != Kind::Delete && cx.recoverable() && cx.vm.draining.contains(&pin.upstream) => {
                let step = self.start_move(cx, r, pin, Vec::new());
                Step { ops: step.ops, flow: Flow::Stay }
            }
            resolution => self.finish_resolving(cx, r, &resolution),
        }
    }

    /// Control answered a drain move: route by the new pin (`moved`), or by the old one
    /// when the move could not be made (the draining pod still serves during its grace
    /// period, so the request is not lost).
    fn on_move_answer(&mut self, cx: &mut Ctx, answer: Answer) -> Step {
        let Phase::Resolving(mut r) = std::mem::replace(&mut self.phase, Phase::Passthrough) else {
            return Step::flow(Flow::Stay);
        };
        let Some(old) = r.moving.take() else { return Step::flow(Flow::Stay) };
        let moved = match answer.status {
            Some(200) => match recovery::parse_answer(&answer.body) {
                Ok(a) if a.outcome == Outcome::Moved => a.pin,
                Ok(a) => {
                    log::warn!("mcp-affinity: session {} stays on draining {} ({:?})", r.client_id, old.upstream, a.outcome);
                    None
                }
                Err(e) => {
                    log::warn!("mcp-affinity: move of {} failed: {e}", r.client_id);
                    cx.count(Counter::ControlErrors);
                    None
                }
            },
            other => {
                log::warn!("mcp-affinity: move of {} failed: status {other:?}; it stays on {}", r.client_id, old.upstream);
                cx.count(Counter::ControlErrors);
                None
            }
        };
        let pin = match moved {
            Some(new) => {
                cx.count(Counter::SessionsMovedByDrain);
                cx.repin(&r.client_id, &new)
            }
            None => {
                cx.count(Counter::DrainMovesFailed);
                old
            }
        };
        self.finish_resolving(cx, r, &Resolution::Found(pin))
    }

    /// Routes this stream and the streams of this VM that waited for it by `resolution`,
    /// and resumes them (or queues their local replies).
    fn finish_resolving(&mut self, cx: &mut Ctx, r: Resolving, resolution: &Resolution) -> Step {
        let waiters = cx.vm.lookups.remove(&r.client_id).unwrap_or_default();
        let mut ops = Vec::new();
        if !waiters.is_empty() {
            // Waiters get the same routing; their machines catch up from shared data.
            let mut wake = Vec::new();
            let (resume, counter) = resolution_ops(cx.cfg, &r.client_id, resolution, &mut wake);
            for _ in &waiters {
                cx.count(counter);
            }
            ops.push(Op::Wake { waiters, ops: wake, resume });
        }
        let go_on = self.settle(cx, r, resolution, &mut ops);
        Step { ops, flow: if go_on { Flow::ResumeRequest } else { Flow::Stay } }
    }

    /// Control answered the recover call: answer the client with its response (carrying
    /// the client's own session id) and re-pin; or, when control verified the session
    /// alive or failed, let the upstream's answer through as it was.
    fn on_recover_answer(&mut self, cx: &mut Ctx, answer: Answer) -> Step {
        let Phase::Pinned(p) = std::mem::replace(&mut self.phase, Phase::Answered) else {
            return Step::flow(Flow::ResumeResponse);
        };
        let parsed = match answer.status {
            Some(200) => recovery::parse_answer(&answer.body),
            Some(404) => {
                // Control does not know the session either: the MCP signal to start anew.
                cx.forget_pin(&p.client_id);
                cx.count(Counter::UnknownSession);
                return Step { ops: vec![Op::Reply(Reply::error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found"))], flow: Flow::Stay };
            }
            other => Err(format!("status {other:?}")),
        };
        let a = match parsed {
            Ok(a) => a,
            Err(e) => {
                log::warn!("mcp-affinity: recovery of {} failed: {e}; the upstream's answer goes through", p.client_id);
                cx.count(Counter::ControlErrors);
                return self.pass_on(p, Flow::ResumeResponse);
            }
        };
        if a.outcome == Outcome::Alive {
            cx.count(Counter::SessionsVerified);
            return self.pass_on(p, Flow::ResumeResponse);
        }
        match (&a.outcome, &a.pin) {
            (Outcome::Failed, _) | (_, None) => cx.forget_pin(&p.client_id),
            (_, Some(new)) => {
                cx.repin(&p.client_id, new);
            }
        }
        cx.count(match a.outcome {
            Outcome::Replayed => Counter::RecoveriesReplayed,
            Outcome::NotReplayed => Counter::RecoveriesNotReplayed,
            Outcome::Failed | Outcome::Alive | Outcome::Moved | Outcome::Stayed => Counter::RecoveriesFailed,
        });
        let Some(r) = a.response else { return self.pass_on(p, Flow::ResumeResponse) };
        let reply = Reply {
            status: r.status.into(),
            content_type: r.content_type.unwrap_or_else(|| "application/json".to_string()),
            session_id: Some(p.client_id),
            body: r.body.into_bytes(),
        };
        Step { ops: vec![Op::Reply(reply)], flow: Flow::Stay }
    }

    // ---- end of stream ---------------------------------------------------------------

    /// `on_done`: a stream that ends while its lookup or drain move is in flight (Envoy
    /// cancels its calls) must not strand the streams waiting for it: they go on unpinned
    /// (lookup) or to the old pin (move). An open GET stream is forgotten.
    pub fn on_done(&mut self, cx: &mut Ctx) -> Step {
        if !cx.vm.open_gets.is_empty() {
            cx.vm.open_gets.remove(&self.context_id);
        }
        if matches!(self.pending, Pending::Lookup | Pending::Move)
            && let Phase::Resolving(r) = &self.phase
            && let Some(waiters) = cx.vm.lookups.remove(r.client_id.as_str())
            && !waiters.is_empty()
        {
            // A move in flight: the waiters go to the old pin (its pod still serves).
            let mut ops = Vec::new();
            let counter = match &r.moving {
                Some(old) => {
                    pin_ops(cx.cfg, &r.client_id, old, &mut ops);
                    Counter::RequestsPinned
                }
                None => Counter::RequestsUnpinned,
            };
            for _ in &waiters {
                cx.count(counter);
            }
            return Step { ops: vec![Op::Wake { waiters, ops, resume: true }], flow: Flow::Stay };
        }
        Step::flow(Flow::Stay)
    }
}

/// The request fields control needs to re-initialize (and, for a recovery, replay), read
/// from the request headers kept by the machine (rule 2). `body_complete`: `body` is the
/// whole body the client sent (else it is empty and control never replays the request).
fn original_request<'a>(head: &'a HeaderPairs, body: &'a str, body_complete: bool) -> OriginalRequest<'a> {
    let text = |name| head.get(name).and_then(|v| std::str::from_utf8(v).ok());
    OriginalRequest {
        method: text(METHOD).unwrap_or_default(),
        path: text(PATH).unwrap_or_default(),
        authority: text(AUTHORITY).unwrap_or_default(),
        content_type: text(CONTENT_TYPE),
        accept: text("accept"),
        protocol_version: text(MCP_PROTOCOL_VERSION),
        authorization: text("authorization"),
        body,
        body_complete,
    }
}

#[cfg(test)]
mod tests;
