//! The proxy-wasm HTTP context of one stream: translates Envoy's callbacks into events of the host-independent
//! machine ([`crate::machine`]) and its actions into host calls. No decision is made here.

use std::rc::Rc;

use super::abi::{self, Action, Buffer, Map, StreamType};
use super::calls;
use super::dispatch::answer_status;
use super::plugin::{HostEnv, HostSharedData, Plugin};
use crate::headers::{CLIENT_SESSION, MCP_SESSION_ID, RECOVERED_PIN, STATUS};
use crate::header_map::HeaderPairs;
use crate::machine::{self as machine, ControlAnswer, Ctx, Flow, Header, Op, ResponseHead, Step};

/// Per-stream HTTP context.
pub struct HttpContext {
    p: Rc<Plugin>,
    context_id: u32,
    m: machine::Stream,
}

/// The response headers during `on_http_response_headers`, with Envoy attributes.
struct ResponseHeaders;

impl ResponseHead for ResponseHeaders {
    fn status(&self) -> u16 {
        abi::header(Map::ResponseHeaders, STATUS).and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok()).unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        abi::header(Map::ResponseHeaders, name)
    }

    fn code_details(&self) -> Option<Vec<u8>> {
        abi::property(&["response", "code_details"])
    }

    /// `response.flags` arrives as 8 little-endian bytes (int64).
    fn flags(&self) -> u64 {
        abi::property(&["response", "flags"]).and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))).unwrap_or(0)
    }

    fn upstream_address(&self) -> Option<Vec<u8>> {
        abi::property(&["upstream", "address"])
    }

    /// `upstream.request_attempt_count` arrives as 8 little-endian bytes (uint64).
    fn attempt_count(&self) -> u64 {
        abi::property(&["upstream", "request_attempt_count"]).and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))).unwrap_or(0)
    }
}

impl HttpContext {
    pub fn new(p: Rc<Plugin>, context_id: u32) -> Self {
        HttpContext { p, context_id, m: machine::Stream::new(context_id) }
    }

    /// Runs one machine event with the plugin's VM state and host services.
    fn event(&mut self, f: impl FnOnce(&mut machine::Stream, &mut Ctx) -> Step) -> Step {
        let mut vm = self.p.vm.borrow_mut();
        let mut env = HostEnv { counters: &self.p.counters, now_secs: vm.clock_secs, shared: HostSharedData };
        let mut cx = Ctx { cfg: &self.p.config, control: self.p.control.is_some(), vm: &mut vm, env: &mut env };
        f(&mut self.m, &mut cx)
    }

    fn header_name(&self, h: Header) -> &str {
        match h {
            Header::Pin => &self.p.config.pin_header,
            Header::SessionId => MCP_SESSION_ID,
            Header::ClientSession => CLIENT_SESSION,
            Header::RecoveredPin => RECOVERED_PIN,
        }
    }

    /// Applies a step's ops to the effective context; returns the flow, replaced by the
    /// machine's answer when the host refused a call to control.
    fn apply_ops(&mut self, step: Step) -> Flow {
        let mut flow = step.flow;
        for op in step.ops {
            match op {
                Op::RemoveRequestHeader(h) => {
                    abi::remove_header(Map::RequestHeaders, self.header_name(h));
                }
                Op::SetRequestHeader(h, v) => {
                    abi::set_header(Map::RequestHeaders, self.header_name(h), &v);
                }
                Op::WantResponse => {
                    abi::set_property(machine::WANT_RESPONSE, b"1");
                }
                Op::SetResponseHeader(h, v) => {
                    abi::set_header(Map::ResponseHeaders, self.header_name(h), &v);
                }
                Op::RemoveResponseHeader(h) => {
                    abi::remove_header(Map::ResponseHeaders, self.header_name(h));
                }
                Op::Reply(r) => {
                    let mut headers = vec![("content-type", r.content_type.as_str())];
                    if let Some(id) = &r.session_id {
                        headers.push((MCP_SESSION_ID, id.as_str()));
                    }
                    abi::local_reply(r.status, &headers, &r.body);
                }
                Op::Call(c) => {
                    let token = self.p.control.as_ref().and_then(|control| control.call(&c).ok());
                    if let Some(token) = token {
                        calls::expect_answer(token, self.context_id);
                    } else {
                        // Same as an unreachable control service, decided now.
                        let answer = self.event(|m, cx| m.on_control_answer(cx, ControlAnswer::default()));
                        flow = self.apply_ops(answer);
                    }
                }
                Op::Wake { waiters, ops, resume } => {
                    for w in waiters {
                        if !abi::set_effective_context(w) {
                            continue; // the waiting stream is gone
                        }
                        self.apply_ops(Step { ops: ops.clone(), flow: Flow::Stay });
                        if resume {
                            abi::resume(StreamType::Request);
                        }
                    }
                    abi::set_effective_context(self.context_id);
                }
            }
        }
        flow
    }

    /// Applies a step inside a stream callback: the action Envoy gets.
    fn in_callback(&mut self, step: Step) -> Action {
        match self.apply_ops(step) {
            Flow::Continue | Flow::ResumeRequest | Flow::ResumeResponse => Action::Continue,
            Flow::Pause | Flow::Stay => Action::Pause,
        }
    }
}

/// The callbacks [`super::exports`] hands to a stream.
impl HttpContext {
    /// `proxy_on_http_call_response` of a call this stream made (Envoy delivers it to the
    /// root context; the effective context is this stream's again).
    pub fn on_http_call_response(&mut self, num_headers: usize, body_size: usize) {
        let status = answer_status(num_headers);
        let body = if status.is_some() { abi::buffer(Buffer::HttpCallResponseBody, 0, body_size) } else { Vec::new() };
        let step = self.event(|m, cx| m.on_control_answer(cx, ControlAnswer { status, body }));
        match self.apply_ops(step) {
            Flow::ResumeRequest => abi::resume(StreamType::Request),
            Flow::ResumeResponse => abi::resume(StreamType::Response),
            Flow::Continue | Flow::Pause | Flow::Stay => {}
        }
    }

    /// The end of the stream (`proxy_on_delete`, which Envoy calls right after
    /// `proxy_on_done`, `Context::onDestroy`). Writes still in flight are answered to the
    /// root context, which counts them; an ended stream's lookup or move answer is dropped.
    pub fn on_done(&mut self) {
        let waits_for_a_write = self.m.waits_for_a_write();
        let step = self.event(|m, cx| m.on_done(cx));
        self.apply_ops(step);
        if waits_for_a_write {
            calls::answer_at_root(self.context_id);
        }
    }

    /// `proxy_on_request_headers`.
    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        // Rule 2 of the machine: the request headers are readable now only; one host call
        // reads them all into one buffer.
        let head = abi::pairs(Map::RequestHeaders).map(HeaderPairs::parse).unwrap_or(Ok(HeaderPairs::default())).unwrap_or_else(|_| {
            log::warn!("mcp-affinity: malformed request header map from the host; treated as empty");
            HeaderPairs::default()
        });
        let step = self.event(|m, cx| m.on_request_headers(cx, head, end_of_stream));
        self.in_callback(step)
    }

    /// `proxy_on_request_body`, once per chunk.
    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let read = || abi::buffer(Buffer::HttpRequestBody, 0, body_size);
        let step = self.event(|m, cx| m.on_request_body(cx, &read, end_of_stream));
        self.in_callback(step)
    }

    /// `proxy_on_response_body`, once per chunk (read only while the machine copies).
    pub fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let read = || abi::buffer(Buffer::HttpResponseBody, 0, body_size);
        let step = self.event(|m, cx| m.on_response_body(cx, &read, end_of_stream));
        let action = self.in_callback(step);
        // A task's pin may wait to be written to control now.
        self.tick_soon_if_writes_wait();
        action
    }

    /// `proxy_on_response_headers`.
    pub fn on_response_headers(&mut self) -> Action {
        let step = self.event(|m, cx| m.on_response_headers(cx, &ResponseHeaders));
        let action = self.in_callback(step);
        // A new session's record may wait now (`initialize_write: async`).
        self.tick_soon_if_writes_wait();
        action
    }

    /// The root context ticks every `control.record_flush_ms` while records or task pins
    /// wait to be written to control ([`machine::tick_change`]).
    fn tick_soon_if_writes_wait(&self) {
        if let Some(ms) = machine::tick_change(&self.p.config, &mut self.p.vm.borrow_mut()) {
            abi::set_tick_period(std::time::Duration::from_millis(ms));
        }
    }
}
