//! One HTTP stream: the pinning rules of the filter, applied in Envoy's callback order
//! (request headers → request body → response headers), with the control service consulted
//! when shared data does not know a session.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use super::metrics;
use super::root::Plugin;
use super::store;
use crate::config::UnknownSession;
use crate::control::{PatchSession, PutSession, parse_record, to_body};
use crate::headers::{AUTHORITY, CONTENT_TYPE, MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, METHOD, PATH, STATUS};
use crate::jsonrpc::{self, BodyKind};
use crate::pin::Pin;
use crate::recovery::{self, OriginalRequest, Outcome, Reason, RecoverRequest, StatusVerdict};
use crate::session_id;

/// JSON-RPC method of the notification that completes MCP initialisation.
const INITIALIZED: &str = "notifications/initialized";

/// What the filter learned about the request, deciding what happens next.
enum Request {
    /// Nothing to do on the response.
    Untracked,
    /// A POST without session id: its response may open a session. `inspecting` while
    /// the body is being buffered; `initialize` keeps the body for the control record.
    MaybeInitialize { inspecting: bool, initialize: Option<Vec<u8>> },
    /// Routed to its pinned upstream host.
    Pinned(Pinned),
    /// Held while the control service is asked about the session (this stream's own
    /// lookup, or one in flight on this VM that it waits for).
    Resolving { client_id: String, is_delete: bool },
    /// The filter answered itself (local reply); response callbacks see that reply.
    LocalReply,
}

/// A request routed by its session's pin.
struct Pinned {
    client_id: String,
    pin: Pin,
    is_delete: bool,
    /// The body is read to record `notifications/initialized` with control.
    watch_lifecycle: bool,
    /// Copy of the request body for a replay by control (taken while it streams upstream).
    replay: Replay,
    /// The response headers are held while a small error body is read.
    holding_error: bool,
}

enum Replay {
    /// Recovery is off for this request (no control, disabled, or DELETE).
    Off,
    Copy(Vec<u8>),
    /// Over `max_replay_body_bytes`: not recoverable.
    TooLarge,
}

impl Pinned {
    fn new(client_id: &str, pin: Pin, is_delete: bool, recoverable: bool) -> Pinned {
        Pinned {
            client_id: client_id.to_string(),
            watch_lifecycle: !pin.recorded,
            pin,
            is_delete,
            replay: if recoverable && !is_delete { Replay::Copy(Vec::new()) } else { Replay::Off },
            holding_error: false,
        }
    }
}

/// The call to control this stream is waiting for.
#[derive(Clone, Copy, PartialEq)]
enum Pending {
    None,
    Lookup,
    WriteInitialize,
    RecordInitialized,
    Delete,
    Recover,
}

/// What control said about an unknown session.
enum Resolution {
    Found(Pin),
    Unknown,
    Unavailable,
}

/// Per-stream HTTP context.
pub struct Stream {
    p: Rc<Plugin>,
    context_id: u32,
    request: Request,
    pending: Pending,
    /// The request body buffered while the session was being resolved: it becomes the
    /// replay copy once the request is pinned.
    held_body: Option<Vec<u8>>,
}

/// Local reply with a JSON-RPC error body on the effective context
/// (`proxy_send_local_response`; Envoy applies it after the callback returns).
fn send_error(status: u32, code: i32, message: &str) {
    let body = jsonrpc::error_body(code, message);
    let _ = hostcalls::send_http_response(status, vec![("content-type", "application/json")], Some(&body));
}

fn is_success(status: Option<&[u8]>) -> bool {
    status.is_some_and(|s| s.first() == Some(&b'2'))
}

impl Stream {
    pub fn new(p: Rc<Plugin>, context_id: u32) -> Self {
        Stream { p, context_id, request: Request::Untracked, pending: Pending::None, held_body: None }
    }

    /// Whether requests of pinned sessions are recoverable through control.
    fn recoverable(&self) -> bool {
        self.p.control.is_some() && self.p.config.recovery.enabled
    }

    /// A pinned request that was held while its session was resolved; the body buffered
    /// meanwhile (if any) is its replay copy.
    fn resolved(&mut self, client_id: &str, pin: Pin, is_delete: bool) -> Pinned {
        let mut p = Pinned::new(client_id, pin, is_delete, self.recoverable());
        if let (Replay::Copy(copy), Some(body)) = (&mut p.replay, self.held_body.take()) {
            if body.len() <= self.p.config.recovery.max_replay_body_bytes {
                *copy = body;
            } else {
                p.replay = Replay::TooLarge;
            }
        }
        p
    }

    fn reply_error(&mut self, status: u32, code: i32, message: &str) -> Action {
        send_error(status, code, message);
        self.request = Request::LocalReply;
        Action::Pause
    }

    /// Sets the routing header (and the backend's session id) on the effective context's
    /// request headers.
    fn apply_pin(&self, client_id: &str, pin: &Pin) {
        let value = self.p.config.pin_encoding.header_value(&pin.upstream);
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &self.p.config.pin_header, Some(&value));
        if pin.backend_session_id != client_id {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, MCP_SESSION_ID, Some(&pin.backend_session_id));
        }
        metrics::inc(self.p.metrics.requests_pinned);
    }

    /// A request carrying a valid session id: route it by its pin, ask control, or apply
    /// the unknown-session policy.
    fn route_session(&mut self, client_id: &str, is_delete: bool) -> Action {
        let Some(stored) = store::get(client_id) else {
            return self.resolve(client_id, is_delete);
        };
        let mut pin = stored.pin;
        self.apply_pin(client_id, &pin);
        let now = super::now_secs();
        if pin.needs_touch(now, self.p.config.touch_interval_secs) {
            pin.last_seen = now;
            // A CAS mismatch means another worker just wrote a fresher value: fine.
            store::put(&self.p.index, client_id, &pin, stored.cas);
            if self.p.control.is_some() {
                self.p.touches.borrow_mut().insert(client_id.to_string());
            }
        }
        log::debug!("mcp-affinity: session {client_id} → {}", pin.upstream);
        if self.p.control.is_none() {
            pin.recorded = true; // nothing to record
        }
        self.request = Request::Pinned(Pinned::new(client_id, pin, is_delete, self.recoverable()));
        Action::Continue
    }

    /// The session is not in shared data: ask control (one lookup per session per VM;
    /// later requests wait for it), or apply the policy when there is no control.
    fn resolve(&mut self, client_id: &str, is_delete: bool) -> Action {
        let Some(control) = &self.p.control else {
            return self.finish_resolution(client_id, is_delete, &Resolution::Unknown);
        };
        self.request = Request::Resolving { client_id: client_id.to_string(), is_delete };
        if let Some(waiters) = self.p.lookups.borrow_mut().get_mut(client_id) {
            waiters.push(self.context_id);
            return Action::Pause;
        }
        metrics::inc(self.p.metrics.control_lookups);
        if control.call("GET", client_id, None).is_err() {
            metrics::inc(self.p.metrics.control_errors);
            return self.finish_resolution(client_id, is_delete, &Resolution::Unavailable);
        }
        self.p.lookups.borrow_mut().insert(client_id.to_string(), Vec::new());
        self.pending = Pending::Lookup;
        Action::Pause
    }

    /// Applies a resolution to this stream (in its own callback: returns the action).
    fn finish_resolution(&mut self, client_id: &str, is_delete: bool, r: &Resolution) -> Action {
        match r {
            Resolution::Found(pin) => {
                self.apply_pin(client_id, pin);
                self.request = Request::Pinned(self.resolved(client_id, pin.clone(), is_delete));
                Action::Continue
            }
            Resolution::Unknown => match self.p.config.unknown_session {
                UnknownSession::NotFound => {
                    metrics::inc(self.p.metrics.unknown_session);
                    log::debug!("mcp-affinity: unknown session {client_id}: 404");
                    self.reply_error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found")
                }
                UnknownSession::PassThrough => {
                    metrics::inc(self.p.metrics.requests_unpinned);
                    self.request = Request::Untracked;
                    Action::Continue
                }
            },
            Resolution::Unavailable => {
                metrics::inc(self.p.metrics.requests_unpinned);
                log::warn!("mcp-affinity: control unavailable for session {client_id}: forwarded unpinned");
                self.request = Request::Untracked;
                Action::Continue
            }
        }
    }

    /// Resumes a stream that waited for this stream's lookup. Runs with the waiter as
    /// effective context (`proxy_set_effective_context`, as the SDK does for callbacks);
    /// the waiter finds its pin again in shared data when its response arrives.
    fn release_waiter(&self, waiter: u32, client_id: &str, r: &Resolution) {
        if hostcalls::set_effective_context(waiter).is_err() {
            return; // the waiting stream is gone
        }
        match r {
            Resolution::Found(pin) => {
                self.apply_pin(client_id, pin);
                let _ = hostcalls::resume_http_request();
            }
            Resolution::Unknown if self.p.config.unknown_session == UnknownSession::NotFound => {
                metrics::inc(self.p.metrics.unknown_session);
                send_error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found");
            }
            Resolution::Unknown | Resolution::Unavailable => {
                metrics::inc(self.p.metrics.requests_unpinned);
                let _ = hostcalls::resume_http_request();
            }
        }
    }

    /// Control answered (or failed) the lookup this stream made.
    fn on_lookup_answer(&mut self, status: Option<Vec<u8>>, body: Option<Vec<u8>>) {
        let Request::Resolving { client_id, is_delete } = &self.request else { return };
        let (client_id, is_delete) = (client_id.clone(), *is_delete);
        let resolution = match status.as_deref() {
            Some(b"200") => match parse_record(&body.unwrap_or_default()) {
                Ok(record) => {
                    metrics::inc(self.p.metrics.control_hits);
                    let pin = Pin {
                        upstream: record.upstream,
                        generation: record.generation,
                        last_seen: super::now_secs(),
                        backend_session_id: record.backend_session_id,
                        recorded: record.initialized.is_some(),
                    };
                    store::put(&self.p.index, &client_id, &pin, None);
                    Resolution::Found(pin)
                }
                Err(e) => {
                    log::warn!("mcp-affinity: {e}");
                    metrics::inc(self.p.metrics.control_errors);
                    Resolution::Unavailable
                }
            },
            Some(b"404") => Resolution::Unknown,
            other => {
                log::warn!("mcp-affinity: control lookup of {client_id} failed: status {:?}", other.map(String::from_utf8_lossy));
                metrics::inc(self.p.metrics.control_errors);
                Resolution::Unavailable
            }
        };
        let waiters = self.p.lookups.borrow_mut().remove(&client_id).unwrap_or_default();
        let action = self.finish_resolution(&client_id, is_delete, &resolution);
        for w in waiters {
            self.release_waiter(w, &client_id, &resolution);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
        if action == Action::Continue {
            self.resume_http_request();
        }
    }

    /// The response to a POST without session id carries `Mcp-Session-Id`: the upstream
    /// host that answered owns the new session (MCP: the id is issued with the
    /// InitializeResult). Returns Pause while the record is written to control.
    fn record_new_session(&mut self, raw_id: &[u8], initialize: Option<Vec<u8>>) -> Action {
        let session_id = match session_id::validate(raw_id, self.p.config.max_session_id_len) {
            Ok(id) => id.to_string(),
            Err(e) => {
                log::warn!("mcp-affinity: upstream issued an invalid session id, not pinned: {e}");
                return Action::Continue;
            }
        };
        // Envoy attribute `upstream.address`: the selected upstream host, `ip:port`.
        let upstream = self
            .get_property(vec!["upstream", "address"])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty() && !s.contains(' '));
        let Some(upstream) = upstream else {
            metrics::inc(self.p.metrics.no_upstream_address);
            log::warn!("mcp-affinity: no upstream.address for session {session_id}: not pinned");
            return Action::Continue;
        };
        let pin = Pin {
            upstream,
            generation: 1,
            last_seen: super::now_secs(),
            backend_session_id: session_id.clone(),
            recorded: self.p.control.is_none(),
        };
        store::put(&self.p.index, &session_id, &pin, None);
        metrics::inc(self.p.metrics.sessions_pinned);
        log::debug!("mcp-affinity: pinned new session {session_id} → {}", pin.upstream);
        let Some(control) = &self.p.control else { return Action::Continue };
        // Write through before the client can use the id, so other proxies find it.
        let initialize = initialize.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let body = to_body(&PutSession { backend_session_id: &session_id, upstream: &pin.upstream, generation: 1, initialize: &initialize });
        if control.call("PUT", &session_id, Some(&body)).is_err() {
            metrics::inc(self.p.metrics.control_errors);
            return Action::Continue;
        }
        self.pending = Pending::WriteInitialize;
        Action::Pause
    }

    /// A body of a pinned session not yet past initialisation: record
    /// `notifications/initialized` (and the protocol version) with control.
    fn watch_lifecycle(&mut self, client_id: &str, body: &[u8]) -> Action {
        if jsonrpc::method(body).as_deref() != Some(INITIALIZED) {
            // Anything else means the session is past initialisation (MCP lifecycle).
            store::mark_recorded(&self.p.index, client_id);
            return Action::Continue;
        }
        let Some(control) = &self.p.control else { return Action::Continue };
        let version = self.get_http_request_header(MCP_PROTOCOL_VERSION);
        let text = String::from_utf8_lossy(body);
        let patch = PatchSession { initialized: Some(&text), protocol_version: version.as_deref() };
        if control.call("PATCH", client_id, Some(&to_body(&patch))).is_err() {
            metrics::inc(self.p.metrics.control_errors);
            return Action::Continue;
        }
        self.pending = Pending::RecordInitialized;
        Action::Pause
    }
}

impl Stream {
    /// Body of a POST without session id: buffer up to `max_body_bytes`, then classify.
    fn inspect_new_session_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if body_size > self.p.config.max_body_bytes {
            metrics::inc(self.p.metrics.body_too_large);
            log::debug!("mcp-affinity: body over {} bytes, not inspected", self.p.config.max_body_bytes);
            self.request = Request::MaybeInitialize { inspecting: false, initialize: None };
            return Action::Continue;
        }
        if !end_of_stream {
            // Envoy buffers and calls again with the cumulative size.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let initialize = match jsonrpc::classify(&body) {
            BodyKind::Initialize => {
                metrics::inc(self.p.metrics.initialize_seen);
                self.p.control.is_some().then_some(body)
            }
            BodyKind::Malformed => {
                metrics::inc(self.p.metrics.malformed_body);
                log::debug!("mcp-affinity: POST body is not JSON; passed through");
                None
            }
            BodyKind::Other => None,
        };
        self.request = Request::MaybeInitialize { inspecting: false, initialize };
        Action::Continue
    }

    /// Decides on the response headers of a pinned request: recovery, holding a small
    /// error body, forgetting a deleted session, or passing on (with the client's id).
    fn on_pinned_response(&mut self, mut p: Pinned) -> Action {
        let status = self.get_http_response_header_bytes(STATUS);
        let code: u16 = status.as_deref().and_then(|s| std::str::from_utf8(s).ok()?.parse().ok()).unwrap_or(0);
        // DELETE answered 2xx ends the session; 404 says it is gone already. Never recovered.
        if p.is_delete {
            if (200..300).contains(&code) || code == 404 {
                return self.forget(&p.client_id);
            }
            return self.pass_on(p);
        }
        if !matches!(p.replay, Replay::Off) {
            let details = self.get_property(vec!["response", "code_details"]).unwrap_or_default();
            let details = String::from_utf8_lossy(&details);
            let flags = self
                .get_property(vec!["response", "flags"])
                .and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
                .unwrap_or(0);
            let reason = match recovery::local_reply_reason(&details, flags) {
                Some(r) => Some(r),
                None if details == "via_upstream" || details.is_empty() => match recovery::status_verdict(&self.p.config.recovery, code) {
                    StatusVerdict::SessionUnknown => Some(Reason::SessionUnknown),
                    StatusVerdict::InspectBody => {
                        let ct = self.get_http_response_header(CONTENT_TYPE).unwrap_or_default();
                        if ct.starts_with("application/json") {
                            // Hold the headers; the body callback decides (never for 2xx/SSE).
                            p.holding_error = true;
                            self.request = Request::Pinned(p);
                            return Action::Pause;
                        }
                        None
                    }
                    StatusVerdict::Fine => None,
                },
                None => None,
            };
            if let Some(reason) = reason {
                return self.start_recovery(p, reason);
            }
        }
        self.pass_on(p)
    }

    /// Lets the response through, mapping the backend's session id to the client's.
    fn pass_on(&mut self, p: Pinned) -> Action {
        if p.pin.backend_session_id != p.client_id && self.get_http_response_header_bytes(MCP_SESSION_ID).is_some() {
            self.set_http_response_header(MCP_SESSION_ID, Some(&p.client_id));
        }
        self.request = Request::Pinned(p);
        Action::Continue
    }

    /// Forgets an ended session here and in control.
    fn forget(&mut self, client_id: &str) -> Action {
        store::forget(&self.p.index, client_id);
        self.p.touches.borrow_mut().remove(client_id);
        metrics::inc(self.p.metrics.sessions_forgotten);
        if let Some(control) = &self.p.control {
            if control.call("DELETE", client_id, None).is_ok() {
                self.pending = Pending::Delete;
                return Action::Pause;
            }
            metrics::inc(self.p.metrics.control_errors);
        }
        Action::Continue
    }

    /// Asks control to recover the session and answer this request. The response stays
    /// held until control answers (bounded by `recovery.timeout_ms`).
    fn start_recovery(&mut self, p: Pinned, reason: Reason) -> Action {
        let Replay::Copy(body) = &p.replay else {
            metrics::inc(self.p.metrics.recovery_body_too_large);
            log::warn!("mcp-affinity: session {} needs recovery but its request body is over the replay limit", p.client_id);
            return self.pass_on(p);
        };
        let Some(control) = &self.p.control else { return self.pass_on(p) };
        let header = |name: &str| self.get_http_request_header(name);
        let (method, path, authority) = (header(METHOD).unwrap_or_default(), header(PATH).unwrap_or_default(), header(AUTHORITY).unwrap_or_default());
        let (content_type, accept, version, authorization) =
            (header(CONTENT_TYPE), header("accept"), header(MCP_PROTOCOL_VERSION), header("authorization"));
        let body = String::from_utf8_lossy(body);
        let request = RecoverRequest {
            failed_generation: p.pin.generation,
            failed_upstream: &p.pin.upstream,
            reason,
            request: OriginalRequest {
                method: &method,
                path: &path,
                authority: &authority,
                content_type: content_type.as_deref(),
                accept: accept.as_deref(),
                protocol_version: version.as_deref(),
                authorization: authorization.as_deref(),
                body: &body,
            },
        };
        log::info!("mcp-affinity: recovering session {} ({reason:?}) from {}", p.client_id, p.pin.upstream);
        let timeout = std::time::Duration::from_millis(self.p.config.recovery.timeout_ms);
        if control.call_with("POST", &p.client_id, "/recover", Some(&to_body(&request)), timeout).is_err() {
            metrics::inc(self.p.metrics.control_errors);
            return self.pass_on(p);
        }
        self.request = Request::Pinned(p);
        self.pending = Pending::Recover;
        Action::Pause
    }

    /// Control answered the recover call: answer the client with its response (carrying
    /// the client's own session id) and re-pin, or let the original answer through.
    fn on_recover_answer(&mut self, status: Option<Vec<u8>>, body: Option<Vec<u8>>) {
        let Request::Pinned(p) = std::mem::replace(&mut self.request, Request::LocalReply) else {
            self.resume_http_response();
            return;
        };
        let answer = match status.as_deref() {
            Some(b"200") => recovery::parse_answer(&body.unwrap_or_default()),
            Some(b"404") => {
                // Control does not know the session either: the MCP signal to start anew.
                store::forget(&self.p.index, &p.client_id);
                metrics::inc(self.p.metrics.unknown_session);
                send_error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found");
                return;
            }
            other => Err(format!("status {:?}", other.map(String::from_utf8_lossy))),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                log::warn!("mcp-affinity: recovery of {} failed: {e}; the upstream's answer goes through", p.client_id);
                metrics::inc(self.p.metrics.control_errors);
                let action = self.pass_on(p);
                if action == Action::Continue {
                    self.resume_http_response();
                }
                return;
            }
        };
        match (&answer.outcome, &answer.pin) {
            (Outcome::Failed, _) | (_, None) => store::forget(&self.p.index, &p.client_id),
            (_, Some(new)) => {
                let pin = Pin {
                    upstream: new.upstream.clone(),
                    generation: new.generation,
                    last_seen: super::now_secs(),
                    backend_session_id: new.backend_session_id.clone(),
                    recorded: true,
                };
                store::put(&self.p.index, &p.client_id, &pin, None);
            }
        }
        metrics::inc(match answer.outcome {
            Outcome::Replayed => self.p.metrics.recoveries_replayed,
            Outcome::NotReplayed => self.p.metrics.recoveries_not_replayed,
            Outcome::Failed => self.p.metrics.recoveries_failed,
        });
        let r = answer.response;
        let content_type = r.content_type.unwrap_or_else(|| "application/json".to_string());
        let headers = vec![("content-type", content_type.as_str()), (MCP_SESSION_ID, p.client_id.as_str())];
        let _ = hostcalls::send_http_response(r.status.into(), headers, Some(r.body.as_bytes()));
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        let status = self.get_http_call_response_header_bytes(STATUS);
        if pending != Pending::Lookup && !is_success(status.as_deref()) && status.as_deref() != Some(b"404") {
            // Control down, slow or refusing: log, count, and go on without it.
            log::warn!("mcp-affinity: control call failed: status {:?}", status.as_deref().map(String::from_utf8_lossy));
            metrics::inc(self.p.metrics.control_errors);
        } else if pending != Pending::Lookup {
            metrics::inc(self.p.metrics.control_writes);
        }
        match pending {
            Pending::Lookup => {
                let body = self.get_http_call_response_body(0, body_size);
                self.on_lookup_answer(status, body);
            }
            Pending::RecordInitialized => {
                if is_success(status.as_deref())
                    && let Request::Pinned(p) = &self.request
                {
                    store::mark_recorded(&self.p.index, &p.client_id);
                }
                self.resume_http_request();
            }
            Pending::WriteInitialize | Pending::Delete => self.resume_http_response(),
            Pending::Recover => {
                let body = self.get_http_call_response_body(0, body_size);
                self.on_recover_answer(status, body);
            }
            Pending::None => {}
        }
    }

    /// A stream that ends while its lookup is in flight (Envoy cancels its calls) must not
    /// strand the streams waiting for it: they go on unpinned.
    fn on_done(&mut self) -> bool {
        if self.pending == Pending::Lookup
            && let Request::Resolving { client_id, .. } = &self.request
        {
            let waiters = self.p.lookups.borrow_mut().remove(client_id).unwrap_or_default();
            for w in waiters {
                self.release_waiter(w, client_id, &Resolution::Unavailable);
            }
            let _ = hostcalls::set_effective_context(self.context_id);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Never let a client choose the upstream host: ORIGINAL_DST and the
        // stateful-session extension would both obey a client-sent value.
        if self.get_http_request_header_bytes(&self.p.config.pin_header).is_some() {
            self.set_http_request_header(&self.p.config.pin_header, None);
            metrics::inc(self.p.metrics.client_pin_header_removed);
        }
        let method = self.get_http_request_header_bytes(METHOD).unwrap_or_default();
        if let Some(raw_id) = self.get_http_request_header_bytes(MCP_SESSION_ID) {
            return match session_id::validate(&raw_id, self.p.config.max_session_id_len) {
                Ok(id) => self.route_session(id, method == b"DELETE"),
                Err(e) => {
                    metrics::inc(self.p.metrics.invalid_session_id);
                    self.reply_error(400, jsonrpc::code::INVALID_REQUEST, &format!("Bad Request: {e}"))
                }
            };
        }
        if method != b"POST" {
            return Action::Continue;
        }
        // A POST without session id may be `initialize`. The hint header lets us skip the
        // body when it names another method; it is never a reason to pin by itself.
        let hint = self.get_http_request_header_bytes(MCP_METHOD);
        let inspect = !end_of_stream && hint.as_deref().is_none_or(|m| m == jsonrpc::INITIALIZE.as_bytes());
        self.request = Request::MaybeInitialize { inspecting: inspect, initialize: None };
        // Pause so the body is buffered before anything goes upstream (Envoy: a decoder
        // filter returning StopIteration from decodeHeaders buffers the body).
        if inspect { Action::Pause } else { Action::Continue }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let max_replay = self.p.config.recovery.max_replay_body_bytes;
        let max_body = self.p.config.max_body_bytes;
        match &mut self.request {
            // Held for control's answer: keep buffering (Envoy: Continue from the body
            // callback would release the held headers without the pin). Keep the whole
            // body for a replay.
            Request::Resolving { .. } => {
                if end_of_stream {
                    self.held_body = self.get_http_request_body(0, body_size);
                }
                Action::Pause
            }
            Request::MaybeInitialize { inspecting: true, .. } => self.inspect_new_session_body(body_size, end_of_stream),
            Request::Pinned(p) if p.watch_lifecycle => {
                if body_size > max_body {
                    p.watch_lifecycle = false;
                    p.replay = Replay::TooLarge;
                    return Action::Continue;
                }
                if !end_of_stream {
                    return Action::Pause; // buffered: called again with the cumulative size
                }
                p.watch_lifecycle = false;
                let client_id = p.client_id.clone();
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                if let Request::Pinned(p) = &mut self.request
                    && let Replay::Copy(copy) = &mut p.replay
                {
                    copy.extend_from_slice(&body);
                }
                self.watch_lifecycle(&client_id, &body)
            }
            Request::Pinned(p) => {
                // Copy the chunk for a replay while it streams upstream: no extra pause.
                if let Replay::Copy(copy) = &p.replay {
                    if copy.len() + body_size > max_replay {
                        p.replay = Replay::TooLarge;
                    } else if body_size > 0 {
                        let chunk = self.get_http_request_body(0, body_size).unwrap_or_default();
                        if let Request::Pinned(Pinned { replay: Replay::Copy(copy), .. }) = &mut self.request {
                            copy.extend_from_slice(&chunk);
                        }
                    }
                }
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A stream that waited for another's lookup finds its pin in shared data now.
        if let Request::Resolving { client_id, is_delete } = &self.request {
            let (client_id, is_delete) = (client_id.clone(), *is_delete);
            self.request = match store::get(&client_id) {
                Some(s) => Request::Pinned(self.resolved(&client_id, s.pin, is_delete)),
                None => Request::Untracked,
            };
        }
        match std::mem::replace(&mut self.request, Request::Untracked) {
            Request::MaybeInitialize { initialize, .. } => {
                if let Some(raw_id) = self.get_http_response_header_bytes(MCP_SESSION_ID) {
                    return self.record_new_session(&raw_id, initialize);
                }
                Action::Continue
            }
            Request::Pinned(p) => self.on_pinned_response(p),
            other => {
                self.request = other;
                Action::Continue
            }
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Request::Pinned(p) = &mut self.request else { return Action::Continue };
        if !p.holding_error {
            return Action::Continue;
        }
        if body_size > self.p.config.recovery.max_error_body_bytes {
            p.holding_error = false;
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        p.holding_error = false;
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        if !recovery::body_says_session_unknown(&self.p.config.recovery, &body) {
            return Action::Continue;
        }
        let Request::Pinned(p) = std::mem::replace(&mut self.request, Request::Untracked) else { unreachable!() };
        self.start_recovery(p, Reason::SessionUnknown)
    }
}
