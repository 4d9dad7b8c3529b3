//! Task affinity for the MCP 2026-07-28 era ([`crate::tasks`]): a request without session
//! id that names its method (`Mcp-Method`) cannot open a session, so the machine looks at
//! it only when it concerns a task — a 2026-era `tools/call`, whose answer may create one,
//! or `tasks/get|update|cancel`, routed by `Mcp-Name` to the upstream host that holds the
//! task. Anything else (`tools/list`, `resources/read`, a 2025-era request) goes on
//! untouched: no header written, no answer asked for.
//!
//! The answer of a `tools/call` is read chunk by chunk as it streams (rule 1 on the
//! response side: nothing is held), up to [`TASK_ANSWER_LIMIT`] bytes: a
//! `CreateTaskResult` is small, so a longer answer is a standard result and the copy stops.

use crate::header_map::HeaderPairs;
use crate::headers::{CONTENT_TYPE, MCP_NAME, MCP_PROTOCOL_VERSION};
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::recovery;
use crate::tasks::{self, SUBSCRIPTIONS_LISTEN, TOOLS_CALL, UNKNOWN_TASK_CODE};
use super::body::BodyCopy;
use mcp_affinity_proto::tasks::{PutTask, TaskRecord};

use super::ops::{Call, ControlAnswer, Flow, Header, Op, Reply, Resource, ResponseHead, Step};
use super::request::steer_new_work;
use super::state::{State, Stream, header_str};
use super::vm::{Ctx, MAX_TASK_WRITES};

/// Most bytes of a 2026-era `tools/call` answer read to find a `CreateTaskResult`.
pub const TASK_ANSWER_LIMIT: usize = 16 * 1024;

impl Stream {
    /// A POST without session id whose `Mcp-Method` is `method` (not `initialize`).
    pub(super) fn on_stateless_request(&mut self, cx: &mut Ctx, head: &HeaderPairs, method: &[u8], mut ops: Vec<Op>) -> Step {
        if tasks::is_task_method(method) {
            let [name] = head.find([MCP_NAME]);
            let Some(task_id) = name.and_then(tasks::task_id) else { return Step::go(ops) };
            let key = tasks::pin_key(&task_id);
            if let Some(pin) = cx.get_pin(&key) {
                self.route_task(cx, key, &pin, &mut ops);
                return Step::go(ops);
            }
            if !cx.control {
                cx.count(Counter::TasksUnpinned);
                return Step::go(ops);
            }
            // Another Envoy (or this one before a restart) saw the task created: ask control.
            // `?wait_ms`: the pin of a task created through another Envoy a moment ago may
            // still be on its way to control.
            let wait_ms = cx.record_wait();
            ops.push(Op::Call(Call { method: "GET", resource: Resource::Task, id: task_id.clone(), suffix: "", body: None, timeout_ms: None, wait_ms }));
            self.state = State::TaskLookup { task_id };
            return Step::hold(ops);
        }
        if method == TOOLS_CALL.as_bytes() && head.find([MCP_PROTOCOL_VERSION])[0].is_some_and(tasks::is_stateless) {
            // A new task never starts on a draining pod.
            steer_new_work(cx, &mut ops);
            ops.push(Op::WantResponse);
            self.state = State::TaskCall;
        } else if method == SUBSCRIPTIONS_LISTEN.as_bytes() && cx.control {
            // Drains come from control: without it no listen stream is ever ended.
            steer_new_work(cx, &mut ops);
            ops.push(Op::WantResponse);
            self.state = State::Listen;
        }
        Step::go(ops)
    }

    /// Routes a task request by its task's `pin`; its answer tells whether that host is
    /// gone, and (with control, until seen once) whether the task is over.
    fn route_task(&mut self, cx: &mut Ctx, key: String, pin: &Pin, ops: &mut Vec<Op>) {
        ops.push(Op::SetRequestHeader(Header::Pin, cx.cfg.pin_encoding.header_value(&pin.upstream)));
        ops.push(Op::WantResponse);
        cx.count(Counter::TasksRouted);
        self.state = State::TaskRequest { key, upstream: pin.upstream.clone(), watch: cx.control && pin.generation == LIVE };
    }

    /// Control answered where task `task_id` lives (`GET {prefix}/tasks/{id}`): pinned here
    /// too and routed there; not found or control down: load-balanced.
    pub(super) fn on_task_lookup_answer(&mut self, cx: &mut Ctx, task_id: &str, answer: ControlAnswer) -> Step {
        let record = match answer.status {
            Some(200) => TaskRecord::parse(&answer.body).map_err(|e| log::warn!("mcp-affinity: control's pin of task {task_id}: {e}")).ok(),
            Some(404) => None,
            other => {
                log::warn!("mcp-affinity: control lookup of task {task_id} failed: status {other:?}; load-balanced");
                cx.count(Counter::ControlErrors);
                None
            }
        };
        let Some(record) = record else {
            cx.count(Counter::TasksUnpinned);
            self.state = State::Passthrough;
            return Step::flow(Flow::ResumeRequest);
        };
        let key = tasks::pin_key(task_id);
        let generation = if record.terminal { TERMINAL } else { LIVE };
        let pin = Pin { upstream: record.upstream, generation, last_seen: cx.env.now_secs(), backend_session_id: task_id.to_string(), recorded: true };
        cx.put_pin(&key, &pin);
        let mut ops = Vec::new();
        self.route_task(cx, key, &pin, &mut ops);
        Step { ops, flow: Flow::ResumeRequest }
    }

    /// The answer of a 2026-era `tools/call`: a 200 JSON or SSE answer is read as it
    /// streams; nothing is held.
    pub(super) fn on_task_call_response(&mut self, cx: &mut Ctx, head: &dyn ResponseHead) -> Step {
        if let Some((sse, upstream)) = readable_answer(cx, head) {
            self.state = State::TaskAnswer { body: BodyCopy::new(TASK_ANSWER_LIMIT, false), upstream, sse };
        }
        Step::flow(Flow::Continue)
    }

    /// `on_http_response_body` with this event's chunk (`read` gives its bytes; called only
    /// while an answer is copied). Pins the task the answer created, or notes the task the
    /// answer shows terminal, once the answer shows it.
    pub fn on_response_body(&mut self, cx: &mut Ctx, read: &dyn Fn() -> Vec<u8>, end_of_stream: bool) -> Step {
        let creates = matches!(self.state, State::TaskAnswer { .. });
        let (body, sse) = match &mut self.state {
            State::TaskAnswer { body, sse, .. } | State::TaskStatus { body, sse, .. } => (body, *sse),
            _ => return Step::flow(Flow::Continue),
        };
        if !body.push(read(), end_of_stream) {
            // Over the limit: a standard result, not a `CreateTaskResult`; for a task
            // request, status unknown (the task still counts as unfinished until seen
            // terminal later, or its pin expires).
            self.state = State::Passthrough;
            return Step::flow(Flow::Continue);
        }
        let BodyCopy::On { bytes, .. } = body else { return Step::flow(Flow::Continue) };
        // An SSE answer's response event may come before its stream ends.
        let complete = sse || end_of_stream;
        let created = if complete && creates { tasks::created_task(bytes, sse) } else { None };
        let terminal = complete && !creates && tasks::answer_is_terminal(bytes, sse);
        if created.is_none() && !terminal && !end_of_stream {
            return Step::flow(Flow::Continue);
        }
        match std::mem::replace(&mut self.state, State::Passthrough) {
            State::TaskAnswer { upstream, .. } if let Some(task) = created => self.pin_created_task(cx, task, upstream),
            State::TaskStatus { key, upstream, .. } if terminal => self.note_terminal(cx, &key, upstream),
            _ => {}
        }
        Step::flow(Flow::Continue)
    }

    /// Pins the task an answer of `upstream` created (shared data; written through to
    /// control on the root context's next tick, for the other Envoys).
    fn pin_created_task(&mut self, cx: &mut Ctx, task: tasks::CreatedTask, upstream: String) {
        let generation = if task.terminal { TERMINAL } else { LIVE };
        let pin = Pin { upstream, generation, last_seen: cx.env.now_secs(), backend_session_id: task.task_id.clone(), recorded: true };
        log::debug!("mcp-affinity: pinned task {} → {}", task.task_id, pin.upstream);
        cx.put_pin(&tasks::pin_key(&task.task_id), &pin);
        cx.count(Counter::TasksPinned);
        if cx.control {
            queue_task_write(cx, task.task_id, PutTask { upstream: pin.upstream, ttl_ms: task.ttl_ms, terminal: task.terminal });
        }
    }

    /// The task of pin `key` is over for its pod: marked in its pin (generation
    /// [`TERMINAL`]: its later answers are not read) and written to control, whose drains
    /// then stop counting it.
    fn note_terminal(&mut self, cx: &mut Ctx, key: &str, upstream: String) {
        if let Some(mut pin) = cx.get_pin(key) {
            pin.generation = TERMINAL;
            cx.put_pin(key, &pin);
        }
        cx.count(Counter::TasksTerminal);
        let task_id = key.strip_prefix(tasks::PIN_KEY_PREFIX).unwrap_or(key).to_string();
        log::debug!("mcp-affinity: task {task_id} is over");
        queue_task_write(cx, task_id, PutTask { upstream, ttl_ms: None, terminal: true });
    }

    /// The answer of a request routed by its task's pin: a router local reply (the host is
    /// gone: connect failure, reset) or an answer from Envoy's retry (control holds no
    /// tasks) means the task is lost with its host: the client gets the spec's unknown-task
    /// error at once and the pin is forgotten.
    pub(super) fn on_task_request_response(&mut self, cx: &mut Ctx, head: &dyn ResponseHead, key: String, upstream: String, watch: bool) -> Step {
        let status = head.status();
        let lost = (status >= 500 && {
            let details = head.code_details().unwrap_or_default();
            recovery::local_reply_reason(&String::from_utf8_lossy(&details), head.flags()).is_some()
        }) || head.attempt_count() >= 2;
        if !lost {
            if watch && let Some((sse, _)) = readable_answer(cx, head) {
                self.state = State::TaskStatus { body: BodyCopy::new(TASK_ANSWER_LIMIT, false), sse, key, upstream };
            }
            return Step::flow(Flow::Continue);
        }
        log::info!("mcp-affinity: {key}: its upstream host is gone; answered unknown task");
        cx.forget_pin(&key);
        cx.count(Counter::TasksLost);
        self.state = State::Answered;
        let reply = Reply::error(200, UNKNOWN_TASK_CODE, "Unknown task: the server that held it is gone");
        Step { ops: vec![Op::Reply(reply)], flow: Flow::Stay }
    }
}

/// Generation of a task's pin while its task may still run.
const LIVE: u64 = 1;
/// Generation of a task's pin once its task was seen over ([`Stream::note_terminal`]).
const TERMINAL: u64 = 2;

/// Whether `head` is an answer worth reading for a task: 200 with a JSON or SSE body, from
/// a known upstream host. `Some((sse, upstream))`.
fn readable_answer(cx: &mut Ctx, head: &dyn ResponseHead) -> Option<(bool, String)> {
    if head.status() != 200 {
        return None;
    }
    let content_type = head.header(CONTENT_TYPE).unwrap_or_default();
    let sse = content_type.starts_with(b"text/event-stream");
    if !sse && !content_type.starts_with(b"application/json") {
        return None;
    }
    let Some(upstream) = header_str(head.upstream_address()).filter(|s| !s.is_empty() && !s.contains(' ')) else {
        cx.count(Counter::NoUpstreamAddress);
        return None;
    };
    Some((sse, upstream))
}

/// Queues a task pin write for the root context's next tick (`PUT {prefix}/tasks/{id}`);
/// a full queue drops it, counted as a control error.
fn queue_task_write(cx: &mut Ctx, task_id: String, put: PutTask) {
    if cx.vm.task_writes.len() < MAX_TASK_WRITES {
        cx.vm.task_writes.push((task_id, put));
    } else {
        cx.count(Counter::ControlErrors);
    }
}
