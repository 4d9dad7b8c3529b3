//! Control's answers (lookups, drain moves, writes, recoveries) and the end of a stream.


use mcp_affinity_proto::sessions::SessionRecord;

use crate::jsonrpc::{self};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::recovery::{self, Outcome};
use super::ops::{ControlAnswer, Flow, Op, Reply, Step};
use super::state::{Ask, Kind, Pinned, Resolution, Resolving, State, Stream, pin_ops, resolution_ops};
use super::vm::Ctx;

/// Counts the answer to a write (a record, a forget, a recovery): `control_writes`, or
/// `control_errors` when it failed.
fn count_write(cx: &mut Ctx, ok: bool, status: Option<u16>) {
    if ok {
        cx.count(Counter::ControlWrites);
    } else {
        log::warn!("mcp-affinity: control call failed: status {status:?}");
        cx.count(Counter::ControlErrors);
    }
}

impl Stream {
    // ---- control answers -------------------------------------------------------------

    /// Control answered the call this stream made (or the call failed: `status` None).
    pub fn on_control_answer(&mut self, cx: &mut Ctx, answer: ControlAnswer) -> Step {
        let ok = answer.status.is_some_and(|s| (200..300).contains(&s) || s == 404);
        match std::mem::replace(&mut self.state, State::Passthrough) {
            State::Resolving(r) => match r.ask {
                Ask::Lookup => self.on_lookup_answer(cx, r, answer),
                Ask::Move(_) => self.on_move_answer(cx, r, answer),
                Ask::Waits => {
                    self.state = State::Resolving(r);
                    Step::flow(Flow::Stay)
                }
            },
            State::RecordingInitialized(p) => {
                count_write(cx, ok, answer.status);
                if ok {
                    cx.mark_recorded(&p.client_id);
                }
                self.state = State::Pinned(p);
                Step::flow(Flow::ResumeRequest)
            }
            State::Writing => {
                count_write(cx, ok, answer.status);
                Step::flow(Flow::ResumeResponse)
            }
            State::Recovering(p) => {
                count_write(cx, ok, answer.status);
                self.on_recover_answer(cx, p, answer)
            }
            State::TaskLookup { task_id } => self.on_task_lookup_answer(cx, &task_id, answer),
            // Nothing was asked: nothing is held.
            other => {
                self.state = other;
                Step::flow(Flow::Stay)
            }
        }
    }

    pub(super) fn on_lookup_answer(&mut self, cx: &mut Ctx, r: Resolving, answer: ControlAnswer) -> Step {
        let resolution = match answer.status {
            Some(200) => match SessionRecord::parse(&answer.body) {
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
                    log::warn!("mcp-affinity: control lookup of {}: {e}", r.client_id);
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
    pub(super) fn on_move_answer(&mut self, cx: &mut Ctx, mut r: Resolving, answer: ControlAnswer) -> Step {
        let Ask::Move(old) = std::mem::replace(&mut r.ask, Ask::Waits) else { return Step::flow(Flow::Stay) };
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
    pub(super) fn finish_resolving(&mut self, cx: &mut Ctx, r: Resolving, resolution: &Resolution) -> Step {
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
    pub(super) fn on_recover_answer(&mut self, cx: &mut Ctx, p: Pinned, answer: ControlAnswer) -> Step {
        self.state = State::Answered;
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
        if !cx.vm.open_streams.is_empty() {
            cx.vm.open_streams.remove(&self.context_id);
        }
        if let State::Resolving(r) = &self.state
            && r.ask != Ask::Waits
            && let Some(waiters) = cx.vm.lookups.remove(r.client_id.as_str())
            && !waiters.is_empty()
        {
            // A move in flight: the waiters go to the old pin (its pod still serves).
            let mut ops = Vec::new();
            let counter = match &r.ask {
                Ask::Move(old) => {
                    pin_ops(cx.cfg, &r.client_id, old, &mut ops);
                    Counter::RequestsPinned
                }
                Ask::Lookup | Ask::Waits => Counter::RequestsUnpinned,
            };
            for _ in &waiters {
                cx.count(counter);
            }
            return Step { ops: vec![Op::Wake { waiters, ops, resume: true }], flow: Flow::Stay };
        }
        Step::flow(Flow::Stay)
    }
}
