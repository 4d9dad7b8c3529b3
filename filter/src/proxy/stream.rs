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
use crate::headers::{MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, METHOD, STATUS};
use crate::jsonrpc::{self, BodyKind};
use crate::pin::Pin;
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
    /// Routed to its pinned upstream host. `watch_lifecycle`: the body is read to record
    /// `notifications/initialized` with control.
    Pinned { client_id: String, backend_id: String, is_delete: bool, watch_lifecycle: bool },
    /// Held while the control service is asked about the session (this stream's own
    /// lookup, or one in flight on this VM that it waits for).
    Resolving { client_id: String, is_delete: bool },
    /// The filter answered itself (local reply); response callbacks see that reply.
    LocalReply,
}

/// The call to control this stream is waiting for.
#[derive(Clone, Copy, PartialEq)]
enum Pending {
    None,
    Lookup,
    WriteInitialize,
    RecordInitialized,
    Delete,
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
        Stream { p, context_id, request: Request::Untracked, pending: Pending::None }
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
        self.request = Request::Pinned {
            client_id: client_id.to_string(),
            backend_id: pin.backend_session_id,
            is_delete,
            watch_lifecycle: self.p.control.is_some() && !pin.recorded,
        };
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
                self.request = Request::Pinned {
                    client_id: client_id.to_string(),
                    backend_id: pin.backend_session_id.clone(),
                    is_delete,
                    watch_lifecycle: !pin.recorded,
                };
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
                    && let Request::Pinned { client_id, .. } = &self.request
                {
                    store::mark_recorded(&self.p.index, client_id);
                }
                self.resume_http_request();
            }
            Pending::WriteInitialize | Pending::Delete => self.resume_http_response(),
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
                Ok(id) => {
                    let id = id.to_string();
                    self.route_session(&id, method == b"DELETE")
                }
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
        let watching = match &self.request {
            // Held for control's answer: keep buffering (Envoy: Continue from the body
            // callback would release the held headers without the pin).
            Request::Resolving { .. } => return Action::Pause,
            Request::MaybeInitialize { inspecting: true, .. } => None,
            Request::Pinned { client_id, watch_lifecycle: true, .. } => Some(client_id.clone()),
            _ => return Action::Continue,
        };
        if body_size > self.p.config.max_body_bytes {
            metrics::inc(self.p.metrics.body_too_large);
            log::debug!("mcp-affinity: body over {} bytes, not inspected", self.p.config.max_body_bytes);
            self.request = match std::mem::replace(&mut self.request, Request::Untracked) {
                Request::MaybeInitialize { .. } => Request::MaybeInitialize { inspecting: false, initialize: None },
                Request::Pinned { client_id, backend_id, is_delete, .. } => {
                    Request::Pinned { client_id, backend_id, is_delete, watch_lifecycle: false }
                }
                other => other,
            };
            return Action::Continue;
        }
        if !end_of_stream {
            // Envoy buffers and calls again with the cumulative size.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if let Some(client_id) = watching {
            if let Request::Pinned { watch_lifecycle, .. } = &mut self.request {
                *watch_lifecycle = false;
            }
            return self.watch_lifecycle(&client_id, &body);
        }
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

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // A stream that waited for another's lookup finds its pin in shared data now.
        if let Request::Resolving { client_id, is_delete } = &self.request {
            self.request = match store::get(client_id) {
                Some(s) => Request::Pinned {
                    client_id: client_id.clone(),
                    backend_id: s.pin.backend_session_id,
                    is_delete: *is_delete,
                    watch_lifecycle: false,
                },
                None => Request::Untracked,
            };
        }
        match std::mem::replace(&mut self.request, Request::Untracked) {
            Request::MaybeInitialize { initialize, .. } => {
                if let Some(raw_id) = self.get_http_response_header_bytes(MCP_SESSION_ID) {
                    return self.record_new_session(&raw_id, initialize);
                }
            }
            Request::Pinned { client_id, backend_id, is_delete, watch_lifecycle } => {
                let status = self.get_http_response_header_bytes(STATUS);
                // The client only ever sees its own session id.
                if backend_id != client_id && self.get_http_response_header_bytes(MCP_SESSION_ID).is_some() {
                    self.set_http_response_header(MCP_SESSION_ID, Some(&client_id));
                }
                // DELETE answered 2xx ends the session; 404 says it is gone already.
                if is_delete && (is_success(status.as_deref()) || status.as_deref() == Some(b"404")) {
                    store::forget(&self.p.index, &client_id);
                    self.p.touches.borrow_mut().remove(&client_id);
                    metrics::inc(self.p.metrics.sessions_forgotten);
                    if let Some(control) = &self.p.control {
                        if control.call("DELETE", &client_id, None).is_ok() {
                            self.pending = Pending::Delete;
                            return Action::Pause;
                        }
                        metrics::inc(self.p.metrics.control_errors);
                    }
                    return Action::Continue;
                }
                self.request = Request::Pinned { client_id, backend_id, is_delete, watch_lifecycle };
            }
            other => self.request = other,
        }
        Action::Continue
    }
}
