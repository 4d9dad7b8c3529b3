//! The request events: request headers (route by pin, look a session up, move it off a
//! draining pod, answer invalid or unknown ids) and request body chunks (copy, classify,
//! record `notifications/initialized`).


use mcp_affinity_proto::sessions::PatchSession;

use crate::header_map::HeaderPairs;
use crate::headers::{MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, METHOD};
use crate::jsonrpc::{self, BodyKind};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::recovery::{Reason, RecoverRequest};
use crate::session_id;
use super::body::BodyCopy;
use super::ops::{Call, Flow, Header, Op, Reply, Resource, Step, json};
use super::state::{Ask, Kind, Pinned, Resolution, Resolving, State, Stream, original_request, pin_ops, resolution_ops};
use super::vm::Ctx;

/// While something drains, sends new work (a request that starts a session, a task or a
/// listen stream) to a serving upstream named by control ([`crate::drain::Draining::steer`]),
/// with the pin header: the draining pod gets none. Nothing while nothing drains.
pub(super) fn steer_new_work(cx: &mut Ctx, ops: &mut Vec<Op>) {
    let Some(upstream) = cx.vm.draining.steer() else { return };
    ops.push(Op::SetRequestHeader(Header::Pin, cx.cfg.pin_encoding.header_value(upstream)));
    cx.count(Counter::RequestsSteeredByDrain);
}

/// JSON-RPC method of the notification that completes MCP initialisation.
const INITIALIZED: &str = "notifications/initialized";

impl Stream {
    /// A new stream with the host's context id.
    pub fn new(context_id: u32) -> Stream {
        Stream { context_id, state: State::Passthrough }
    }

    /// Whether the call this stream waits for writes a record (its answer still counts
    /// when the stream has ended before it came).
    pub fn waits_for_a_write(&self) -> bool {
        matches!(self.state, State::Writing | State::RecordingInitialized(_))
    }

    /// Whether the machine waits for a control answer (the proxy layer reads the answer
    /// body only then).
    pub fn waits_for_control(&self) -> bool {
        match &self.state {
            State::Resolving(r) => r.ask != Ask::Waits,
            State::RecordingInitialized(_) | State::Recovering(_) | State::Writing => true,
            State::Passthrough | State::NewSession { .. } | State::Pinned(_) | State::Answered => false,
            State::TaskLookup { .. } => true,
            State::TaskCall | State::TaskAnswer { .. } | State::TaskRequest { .. } | State::TaskStatus { .. } | State::Listen => false,
        }
    }

    /// `no_body`: the request headers ended the stream.
    pub(super) fn pinned(cx: &Ctx, client_id: String, pin: Pin, kind: Kind, request: Option<HeaderPairs>, no_body: bool) -> Pinned {
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

    /// Enters the pinned state; an open GET stream is remembered so that a drain of its
    /// upstream can end it (only with control: drains come from control).
    pub(super) fn enter_pinned(&mut self, cx: &mut Ctx, p: Pinned) {
        if p.kind == Kind::Get && cx.control {
            cx.vm.open_streams.insert(self.context_id, p.pin.upstream.clone());
        }
        self.state = State::Pinned(p);
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
                    self.state = State::Answered;
                    ops.push(Op::Reply(Reply::error(400, jsonrpc::code::INVALID_REQUEST, &format!("Bad Request: {e}"))));
                    Step::hold(ops)
                }
            };
        }
        if is_post
            && let Some(m) = mcp_method
            && m != jsonrpc::INITIALIZE.as_bytes()
        {
            // Only an `initialize` answer opens a session: nothing to do here, unless the
            // request concerns a task (MCP 2026-07-28, tasks extension).
            return if cx.cfg.task_affinity { self.on_stateless_request(cx, &head, m, ops) } else { Step::go(ops) };
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
            let may_initialize = mcp_method.is_none_or(|m| m == jsonrpc::INITIALIZE.as_bytes());
            if may_initialize {
                // A new session never starts on a draining pod.
                steer_new_work(cx, &mut ops);
            }
            let copy = !end_of_stream && cx.control && may_initialize;
            let body = if copy { BodyCopy::new(cx.cfg.max_body_bytes, false) } else { BodyCopy::Off };
            self.state = State::NewSession { body, initialize: None };
        }
        Step::go(ops)
    }

    pub(super) fn route_session(&mut self, cx: &mut Ctx, head: HeaderPairs, client_id: String, kind: Kind, no_body: bool, mut ops: Vec<Op>) -> Step {
        let Some(mut pin) = cx.get_pin(&client_id) else {
            let r = Resolving { client_id, kind, request: Some(head), no_body, ask: Ask::Waits };
            return self.resolve(cx, r, ops);
        };
        if kind != Kind::Delete && cx.recoverable() && cx.vm.draining.contains(&pin.upstream) {
            let r = Resolving { client_id, kind, request: Some(head), no_body, ask: Ask::Waits };
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
    pub(super) fn resolve(&mut self, cx: &mut Ctx, r: Resolving, mut ops: Vec<Op>) -> Step {
        if !cx.control {
            let go_on = self.settle(cx, r, &Resolution::Unknown, &mut ops);
            return if go_on { Step::go(ops) } else { Step::hold(ops) };
        }
        if self.join_or_lead(cx, &r) {
            self.state = State::Resolving(r);
            return Step::hold(ops);
        }
        cx.count(Counter::ControlLookups);
        let wait_ms = cx.record_wait();
        ops.push(Op::Call(Call { method: "GET", resource: Resource::Session, id: r.client_id.clone(), suffix: "", body: None, timeout_ms: None, wait_ms }));
        self.state = State::Resolving(Resolving { ask: Ask::Lookup, ..r });
        Step::hold(ops)
    }

    /// Joins the lookup or move of this session another stream of this VM has in flight
    /// (true: this stream now waits for it), or registers this stream's own, which the
    /// streams after it will wait for (false: this stream makes the call).
    pub(super) fn join_or_lead(&self, cx: &mut Ctx, r: &Resolving) -> bool {
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
    pub(super) fn move_or_wait(&mut self, cx: &mut Ctx, r: Resolving, pin: Pin, ops: Vec<Op>) -> Step {
        if self.join_or_lead(cx, &r) {
            self.state = State::Resolving(r);
            return Step::hold(ops);
        }
        self.start_move(cx, r, pin, ops)
    }

    /// Asks control to move the session off `pin` (its entry in the VM's lookups exists:
    /// other streams of the session wait for this one). The request headers stay held.
    pub(super) fn start_move(&mut self, cx: &mut Ctx, mut r: Resolving, pin: Pin, mut ops: Vec<Op>) -> Step {
        let head = r.request.as_ref();
        let request = RecoverRequest {
            failed_generation: pin.generation,
            failed_upstream: pin.upstream.clone(),
            reason: Reason::Draining,
            request: head.map(|h| original_request(h, "", false)).unwrap_or_default(),
            session_errors: Default::default(),
        };
        log::info!("mcp-affinity: moving session {} off draining {}", r.client_id, pin.upstream);
        let call = Call {
            method: "POST",
            resource: Resource::Session,
            id: r.client_id.clone(),
            suffix: "/recover",
            body: Some(json(&request)),
            timeout_ms: Some(cx.cfg.recovery.timeout_ms),
            wait_ms: cx.record_wait(),
        };
        ops.push(Op::Call(call));
        r.ask = Ask::Move(pin);
        self.state = State::Resolving(r);
        Step::hold(ops)
    }

    /// Applies a resolution to this stream; returns whether the request goes on (else a
    /// local reply was queued).
    pub(super) fn settle(&mut self, cx: &mut Ctx, r: Resolving, resolution: &Resolution, ops: &mut Vec<Op>) -> bool {
        let (go_on, counter) = resolution_ops(cx.cfg, &r.client_id, resolution, ops);
        cx.count(counter);
        match resolution {
            Resolution::Found(pin) => {
                let p = Self::pinned(cx, r.client_id, pin.clone(), r.kind, r.request, r.no_body);
                self.enter_pinned(cx, p);
            }
            _ if go_on => self.state = State::Passthrough,
            _ => self.state = State::Answered,
        }
        go_on
    }

    /// A stream that waited for another stream's lookup learns its pin from shared data
    /// at its next event.
    pub(super) fn catch_up(&mut self, cx: &mut Ctx) {
        let State::Resolving(r) = &self.state else { return };
        if r.ask != Ask::Waits {
            return;
        }
        let Some(pin) = cx.get_pin(&r.client_id) else { return };
        let State::Resolving(r) = std::mem::replace(&mut self.state, State::Passthrough) else { return };
        let p = Self::pinned(cx, r.client_id, pin, r.kind, r.request, r.no_body);
        self.enter_pinned(cx, p);
    }

    // ---- request body ----------------------------------------------------------------

    /// `on_http_request_body` with this event's chunk (`read` gives its bytes; it is
    /// called only when the machine copies). Never pauses except to record
    /// `notifications/initialized` with control at the end of the body.
    pub fn on_request_body(&mut self, cx: &mut Ctx, read: &dyn Fn() -> Vec<u8>, end_of_stream: bool) -> Step {
        self.catch_up(cx);
        match &mut self.state {
            State::NewSession { body, initialize } => {
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
            State::Pinned(p) => {
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
    pub(super) fn watch_lifecycle(&mut self, cx: &mut Ctx) -> Step {
        let State::Pinned(p) = &self.state else { return Step::flow(Flow::Continue) };
        let BodyCopy::On { bytes, .. } = &p.body else { return Step::flow(Flow::Continue) };
        if jsonrpc::method(bytes).as_deref() != Some(INITIALIZED) {
            // Anything else means the session is past initialisation (MCP lifecycle).
            let id = p.client_id.clone();
            cx.mark_recorded(&id);
            return Step::flow(Flow::Continue);
        }
        let text = String::from_utf8_lossy(bytes);
        let version = p.request.as_ref().and_then(|h| h.get(MCP_PROTOCOL_VERSION)).and_then(|v| std::str::from_utf8(v).ok());
        let patch = PatchSession { initialized: Some(text.into_owned()), protocol_version: version.map(str::to_string) };
        let wait_ms = cx.record_wait();
        let call = Call { method: "PATCH", resource: Resource::Session, id: p.client_id.clone(), suffix: "", body: Some(json(&patch)), timeout_ms: None, wait_ms };
        if let State::Pinned(p) = std::mem::replace(&mut self.state, State::Passthrough) {
            self.state = State::RecordingInitialized(p);
        }
        Step::hold(vec![Op::Call(call)])
    }

}
