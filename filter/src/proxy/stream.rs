//! One HTTP stream: the pinning rules of the filter, applied in Envoy's callback order
//! (request headers → request body → response headers).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::metrics::{self, Metrics};
use super::store::{self, SweepIndex};
use crate::config::{FilterConfig, UnknownSession};
use crate::headers::{MCP_METHOD, MCP_SESSION_ID, METHOD, STATUS};
use crate::jsonrpc::{self, BodyKind};
use crate::pin::Pin;
use crate::session_id;

/// What the filter learned about the request, deciding what happens to the response.
enum Request {
    /// Nothing to do on the response.
    Untracked,
    /// A POST without session id: its response may open a session. `inspecting` while
    /// the body is being buffered to look for `initialize`.
    MaybeInitialize { inspecting: bool },
    /// Routed to its pinned upstream host.
    Pinned { client_id: String, backend_id: String, is_delete: bool },
    /// The filter answered itself (local reply); response callbacks see that reply.
    LocalReply,
}

/// Per-stream HTTP context.
pub struct Stream {
    config: Rc<FilterConfig>,
    metrics: Metrics,
    index: SweepIndex,
    request: Request,
}

impl Stream {
    pub fn new(config: Rc<FilterConfig>, metrics: Metrics, index: SweepIndex) -> Self {
        Stream { config, metrics, index, request: Request::Untracked }
    }

    /// Local reply with a JSON-RPC error body (`proxy_send_local_response`). Envoy applies
    /// it after the callback returns; the callback must return Pause.
    fn reply_error(&mut self, status: u32, code: i32, message: &str) -> Action {
        let body = jsonrpc::error_body(code, message);
        self.send_http_response(status, vec![("content-type", "application/json")], Some(&body));
        self.request = Request::LocalReply;
        Action::Pause
    }

    /// A request carrying a valid session id: route it to its pin, or apply the
    /// unknown-session policy.
    fn route_session(&mut self, client_id: &str, is_delete: bool) -> Action {
        let Some(stored) = store::get(client_id) else {
            return match self.config.unknown_session {
                UnknownSession::NotFound => {
                    metrics::inc(self.metrics.unknown_session);
                    log::debug!("mcp-affinity: unknown session {client_id}: 404");
                    self.reply_error(404, jsonrpc::code::SESSION_NOT_FOUND, "Session not found")
                }
                UnknownSession::PassThrough => {
                    metrics::inc(self.metrics.requests_unpinned);
                    log::debug!("mcp-affinity: unknown session {client_id}: forwarded unpinned");
                    Action::Continue
                }
            };
        };
        let mut pin = stored.pin;
        let value = self.config.pin_encoding.header_value(&pin.upstream);
        self.set_http_request_header(&self.config.pin_header, Some(&value));
        if pin.backend_session_id != client_id {
            self.set_http_request_header(MCP_SESSION_ID, Some(&pin.backend_session_id));
        }
        let now = super::now_secs();
        if pin.needs_touch(now, self.config.touch_interval_secs) {
            pin.last_seen = now;
            // A CAS mismatch means another worker just wrote a fresher value: fine.
            store::put(&self.index, client_id, &pin, stored.cas);
        }
        metrics::inc(self.metrics.requests_pinned);
        log::debug!("mcp-affinity: session {client_id} → {}", pin.upstream);
        self.request = Request::Pinned {
            client_id: client_id.to_string(),
            backend_id: pin.backend_session_id,
            is_delete,
        };
        Action::Continue
    }

    /// The response to a POST without session id carries `Mcp-Session-Id`: the upstream
    /// host that answered owns the new session (MCP: the id is issued with the
    /// InitializeResult).
    fn record_new_session(&mut self, raw_id: &[u8]) {
        let session_id = match session_id::validate(raw_id, self.config.max_session_id_len) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("mcp-affinity: upstream issued an invalid session id, not pinned: {e}");
                return;
            }
        };
        // Envoy attribute `upstream.address`: the selected upstream host, `ip:port`.
        let upstream = self
            .get_property(vec!["upstream", "address"])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty() && !s.contains(' '));
        let Some(upstream) = upstream else {
            metrics::inc(self.metrics.no_upstream_address);
            log::warn!("mcp-affinity: no upstream.address for session {session_id}: not pinned");
            return;
        };
        let pin = Pin {
            upstream,
            generation: 1,
            last_seen: super::now_secs(),
            backend_session_id: session_id.to_string(),
        };
        store::put(&self.index, session_id, &pin, None);
        metrics::inc(self.metrics.sessions_pinned);
        log::debug!("mcp-affinity: pinned new session {session_id} → {}", pin.upstream);
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Never let a client choose the upstream host: ORIGINAL_DST and the
        // stateful-session extension would both obey a client-sent value.
        if self.get_http_request_header_bytes(&self.config.pin_header).is_some() {
            self.set_http_request_header(&self.config.pin_header, None);
            metrics::inc(self.metrics.client_pin_header_removed);
        }
        let method = self.get_http_request_header_bytes(METHOD).unwrap_or_default();
        if let Some(raw_id) = self.get_http_request_header_bytes(MCP_SESSION_ID) {
            return match session_id::validate(&raw_id, self.config.max_session_id_len) {
                Ok(id) => {
                    let id = id.to_string();
                    self.route_session(&id, method == b"DELETE")
                }
                Err(e) => {
                    metrics::inc(self.metrics.invalid_session_id);
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
        self.request = Request::MaybeInitialize { inspecting: inspect };
        // Pause so the body is buffered before anything goes upstream (Envoy: a decoder
        // filter returning StopIteration from decodeHeaders buffers the body).
        if inspect { Action::Pause } else { Action::Continue }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Request::MaybeInitialize { inspecting: true } = self.request else {
            return Action::Continue;
        };
        if body_size > self.config.max_body_bytes {
            metrics::inc(self.metrics.body_too_large);
            log::debug!("mcp-affinity: body over {} bytes, not inspected", self.config.max_body_bytes);
            self.request = Request::MaybeInitialize { inspecting: false };
            return Action::Continue;
        }
        if !end_of_stream {
            // Envoy buffers and calls again with the cumulative size.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match jsonrpc::classify(&body) {
            BodyKind::Initialize => metrics::inc(self.metrics.initialize_seen),
            BodyKind::Malformed => {
                metrics::inc(self.metrics.malformed_body);
                log::debug!("mcp-affinity: POST body is not JSON; passed through");
            }
            BodyKind::Other => {}
        }
        self.request = Request::MaybeInitialize { inspecting: false };
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match &self.request {
            Request::MaybeInitialize { .. } => {
                if let Some(raw_id) = self.get_http_response_header_bytes(MCP_SESSION_ID) {
                    self.record_new_session(&raw_id);
                }
            }
            Request::Pinned { client_id, backend_id, is_delete } => {
                let status = self.get_http_response_header_bytes(STATUS).unwrap_or_default();
                // DELETE answered 2xx ends the session; 404 says it is gone already.
                if *is_delete && (status.first() == Some(&b'2') || status == b"404") {
                    store::forget(&self.index, client_id);
                    metrics::inc(self.metrics.sessions_forgotten);
                }
                // The client only ever sees its own session id.
                if backend_id != client_id && self.get_http_response_header_bytes(MCP_SESSION_ID).is_some() {
                    self.set_http_response_header(MCP_SESSION_ID, Some(client_id));
                }
            }
            Request::Untracked | Request::LocalReply => {}
        }
        Action::Continue
    }
}
