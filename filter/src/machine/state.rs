//! A stream's state (what it is, which control call it waits for, what it keeps of the
//! request) and the ops shared by
//! several events: routing by a pin, applying a lookup's resolution, and the request fields
//! control needs.


use crate::config::{FilterConfig, ReplayBy, UnknownSession};
use crate::header_map::HeaderPairs;
use crate::headers::{AUTHORITY, CONTENT_TYPE, MCP_PROTOCOL_VERSION, METHOD, PATH};
use crate::jsonrpc::{self};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::recovery::OriginalRequest;
use super::body::BodyCopy;
use super::ops::{Header, Op, Reply};

/// A request routed by its session's pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pinned {
    pub(super) client_id: String,
    pub(super) pin: Pin,
    pub(super) kind: Kind,
    /// The body is classified to record `notifications/initialized` with control.
    pub(super) watch_lifecycle: bool,
    /// The request headers, kept when a recovery may replay the request (rule 2).
    pub(super) request: Option<HeaderPairs>,
    /// The request body, for a replay by control and for the lifecycle.
    pub(super) body: BodyCopy,
    /// The response carries the backend's session id, to be replaced by the client's.
    pub(super) rewrite_response_id: bool,
}

/// A stream's state: one value says what the stream is and which control call, if any,
/// it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// Nothing to do.
    Passthrough,
    /// A POST without session id: its response may open a session.
    NewSession { body: BodyCopy, initialize: Option<Vec<u8>> },
    /// Held while control is asked about the session (by this stream, or by another
    /// one of this VM that this stream waits for: [`Resolving::ask`]).
    Resolving(Resolving),
    /// Routed by the session's pin.
    Pinned(Pinned),
    /// A pinned request's end held while control records its
    /// `notifications/initialized` (`PATCH`).
    RecordingInitialized(Pinned),
    /// A pinned request's answer held while control recovers the session (or verifies
    /// it, for a suspect answer): `POST .../recover`.
    Recovering(Pinned),
    /// An answer held until control took a write: a new session's record
    /// (`initialize_write: sync`, `PUT`) or the end of a deleted one (`DELETE`).
    Writing,
    /// A 2026-era `tools/call`: its answer may create a task (tasks extension).
    TaskCall,
    /// The answer of a 2026-era `tools/call`, copied (bounded) until it shows whether it
    /// created a task, which is then pinned to `upstream`.
    TaskAnswer { body: BodyCopy, upstream: String, sse: bool },
    /// A `tasks/get|update|cancel` routed by its task's pin (shared-data key `key`) to
    /// `upstream`; `watch`: its answer is read for a terminal status (with control, until
    /// one was seen: the pin's generation is 1 before, 2 after).
    TaskRequest { key: String, upstream: String, watch: bool },
    /// The answer of a watched task request, copied (bounded) until it shows whether the
    /// task is over ([`crate::tasks::answer_is_terminal`]).
    TaskStatus { body: BodyCopy, sse: bool, key: String, upstream: String },
    /// A 2026-era `subscriptions/listen` (with control): its upstream is remembered when it
    /// answers, so that a drain of that upstream ends the stream.
    Listen,
    /// A `tasks/get|update|cancel` of a task this Envoy holds no pin for, held while
    /// control is asked where it lives (`GET {prefix}/tasks/{id}`).
    TaskLookup { task_id: String },
    /// The filter answered itself.
    Answered,
}

/// The HTTP method, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
pub(super) struct Resolving {
    pub(super) client_id: String,
    pub(super) kind: Kind,
    pub(super) request: Option<HeaderPairs>,
    /// The request headers ended the stream (no body).
    pub(super) no_body: bool,
    /// Who asks control.
    pub(super) ask: Ask,
}

/// Which stream of a VM asks control about a session; the others wait for it
/// (`Vm::lookups`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ask {
    /// Another stream of this VM asks; this one catches up from shared data.
    Waits,
    /// This stream looks the session up (`GET {prefix}/sessions/{id}`).
    Lookup,
    /// This stream moves the session off this pin, whose upstream drains
    /// (`POST {prefix}/sessions/{id}/recover` with reason `draining`).
    Move(Pin),
}

/// What control (or its absence) said about a session unknown to shared data.
pub(super) enum Resolution {
    Found(Pin),
    Unknown,
    Unavailable,
}

/// The per-stream machine.
#[derive(Debug)]
pub struct Stream {
    pub(super) context_id: u32,
    pub(super) state: State,
}

pub(super) fn header_str(v: Option<Vec<u8>>) -> Option<String> {
    v.and_then(|b| String::from_utf8(b).ok())
}

/// Ops that route a request by `pin`, sent by a client that knows the session as `client_id`.
pub(super) fn pin_ops(cfg: &FilterConfig, client_id: &str, pin: &Pin, ops: &mut Vec<Op>) {
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
pub(super) fn resolution_ops(cfg: &FilterConfig, client_id: &str, r: &Resolution, ops: &mut Vec<Op>) -> (bool, Counter) {
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



/// The request fields control needs to re-initialize (and, for a recovery, replay), read
/// from the request headers kept by the machine (rule 2). `body_complete`: `body` is the
/// whole body the client sent (else it is empty and control never replays the request).
/// Built only when a session is recovered or moved, never on the steady path.
pub(super) fn original_request(head: &HeaderPairs, body: &str, body_complete: bool) -> OriginalRequest {
    let text = |name| head.get(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string);
    OriginalRequest {
        method: text(METHOD).unwrap_or_default(),
        path: text(PATH).unwrap_or_default(),
        authority: text(AUTHORITY),
        content_type: text(CONTENT_TYPE),
        accept: text("accept"),
        protocol_version: text(MCP_PROTOCOL_VERSION),
        authorization: text("authorization"),
        body: body.to_string(),
        body_complete,
    }
}
