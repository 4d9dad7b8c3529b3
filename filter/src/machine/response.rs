//! The response-headers event: pin a new session, forget a deleted one, learn a pin Envoy's
//! retry brought back, or start a recovery (rules 3 and 4).


use mcp_affinity_proto::sessions::PutSession;

use crate::headers::{CONTENT_TYPE, MCP_SESSION_ID, RECOVERED_PIN};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::record_queue::{self, NewRecord};
use crate::recovery::{self, Reason, RecoverRequest, StatusVerdict};
use crate::session_id;
use super::body::BodyCopy;
use super::ops::{Call, Flow, Header, Op, Resource, ResponseHead, Step, json};
use super::state::{Kind, Pinned, State, Stream, header_str, original_request};
use super::vm::Ctx;

impl Stream {
    // ---- response headers ------------------------------------------------------------

    /// `on_http_response_headers`.
    pub fn on_response_headers(&mut self, cx: &mut Ctx, head: &dyn ResponseHead) -> Step {
        cx.count(Counter::ResponseHeadersSeen);
        self.catch_up(cx);
        match std::mem::replace(&mut self.state, State::Passthrough) {
            State::NewSession { initialize, .. } => match head.header(MCP_SESSION_ID) {
                Some(raw_id) => self.record_new_session(cx, head, &raw_id, initialize),
                None => Step::flow(Flow::Continue),
            },
            State::Pinned(p) => self.on_pinned_response(cx, head, p),
            State::TaskCall => self.on_task_call_response(cx, head),
            State::TaskRequest { key, upstream, watch } => self.on_task_request_response(cx, head, key, upstream, watch),
            State::Listen => {
                if let Some(upstream) = header_str(head.upstream_address()).filter(|s| !s.is_empty()) {
                    // Sent before this VM adopted its upstream's drain, answered after.
                    cx.vm.late_streams |= cx.vm.draining.contains(&upstream);
                    cx.vm.open_streams.insert(self.context_id, upstream);
                }
                Step::flow(Flow::Continue)
            }
            other => {
                self.state = other;
                Step::flow(Flow::Continue)
            }
        }
    }

    /// The response to a POST without session id carries `Mcp-Session-Id`: the upstream
    /// host that answered owns the new session (MCP `basic/transports`: the id comes with
    /// the InitializeResult). The record is queued in the VM for the root context's next
    /// flush to control (`async`, the default; other proxies' lookups wait for it with
    /// `?wait_ms`), or the answer is held until control has it (`sync`).
    pub(super) fn record_new_session(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, raw_id: &[u8], initialize: Option<Vec<u8>>) -> Step {
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
        let body = json(&PutSession { backend_session_id: Some(session_id.to_string()), upstream: pin.upstream.clone(), generation: Some(1), initialize, initialized: None, protocol_version: None });
        let call = Call { method: "PUT", resource: Resource::Session, id: session_id.to_string(), suffix: "", body: Some(body), timeout_ms: None, wait_ms: None };
        self.state = State::Writing;
        Step::hold(vec![Op::Call(call)])
    }

    /// Decides on the response headers of a pinned request: forget a deleted session,
    /// recover, verify a suspect error with control, or pass on (with the client's id).
    /// Without control and with the client's own session id, nothing here is needed: the
    /// steady path reads nothing from the response.
    pub(super) fn on_pinned_response(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, mut p: Pinned) -> Step {
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
    pub(super) fn learn_recovered_pin(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, p: Pinned) -> Step {
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
    pub(super) fn recovery_reason(cx: &Ctx, head: &dyn ResponseHead, status: u16) -> Option<Reason> {
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
    pub(super) fn pass_on(&mut self, p: Pinned, flow: Flow) -> Step {
        let ops = if p.rewrite_response_id { vec![Op::SetResponseHeader(Header::SessionId, p.client_id.clone())] } else { Vec::new() };
        self.state = State::Pinned(p);
        Step { ops, flow }
    }

    /// Forgets an ended session here and in control.
    pub(super) fn forget(&mut self, cx: &mut Ctx, p: Pinned) -> Step {
        cx.forget_pin(&p.client_id);
        cx.vm.touches.remove(&p.client_id);
        cx.count(Counter::SessionsForgotten);
        let id = p.client_id.clone();
        let step = self.pass_on(p, Flow::Continue);
        if !cx.control {
            return step;
        }
        self.state = State::Writing;
        let mut ops = step.ops;
        ops.push(Op::Call(Call { method: "DELETE", resource: Resource::Session, id, suffix: "", body: None, timeout_ms: None, wait_ms: None }));
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
    pub(super) fn start_recovery(&mut self, cx: &mut Ctx, p: Pinned, reason: Reason) -> Step {
        let Some(head) = &p.request else {
            // Not kept: a request the filter does not replay (DELETE never gets here).
            return self.pass_on(p, Flow::Continue);
        };
        // JSON text is UTF-8 (RFC 8259): a body that is not is never replayed, rather than
        // replayed with replacement characters.
        // The copy may be longer than the replay limit (it also serves the lifecycle, up to
        // `max_body_bytes`); the limit decides here.
        let limit = cx.cfg.recovery.max_replay_body_bytes;
        let seen = p.body.whole(head);
        let too_large = p.body == BodyCopy::Over || seen.is_some_and(|b| b.len() > limit);
        let whole = seen.filter(|_| !too_large).and_then(|b| std::str::from_utf8(b).ok());
        if whole.is_none() {
            cx.count(if too_large { Counter::RecoveryBodyTooLarge } else { Counter::RecoveryBodyIncomplete });
            log::warn!("mcp-affinity: session {} needs recovery; its request body is not replayable (over the replay limit or incomplete)", p.client_id);
        }
        let request = RecoverRequest {
            failed_generation: p.pin.generation,
            failed_upstream: p.pin.upstream.clone(),
            reason,
            request: original_request(head, whole.unwrap_or_default(), whole.is_some()),
            session_errors: recovery::session_errors(&cx.cfg.recovery),
        };
        log::info!("mcp-affinity: recovering session {} ({reason:?}) from {}", p.client_id, p.pin.upstream);
        let call = Call { method: "POST", resource: Resource::Session, id: p.client_id.clone(), suffix: "/recover", body: Some(json(&request)), timeout_ms: Some(cx.cfg.recovery.timeout_ms), wait_ms: cx.record_wait() };
        self.state = State::Recovering(p);
        Step::hold(vec![Op::Call(call)])
    }

}
