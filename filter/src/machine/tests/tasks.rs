//! Task affinity (MCP 2026-07-28 era, tasks extension): what the machine does with
//! requests without session id that name their method.

use super::*;
use crate::machine::tasks::TASK_ANSWER_LIMIT;

/// A 2026-era POST: no session id; `Mcp-Method`, `Mcp-Name` and the protocol version.
fn stateless(method: &'static str, name: Option<&'static str>) -> HeaderPairs {
    let mut h = vec![(":method", "POST"), (":path", "/mcp"), (":authority", "example"), ("content-type", "application/json"), ("mcp-protocol-version", "2026-07-28"), ("mcp-method", method)];
    if let Some(name) = name {
        h.push(("mcp-name", name));
    }
    HeaderPairs::from_pairs(&h)
}

const CREATED: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"t-1","status":"working","createdAt":"2026-12-06T10:00:00Z","lastUpdatedAt":"2026-12-06T10:00:00Z","ttlMs":60000,"pollIntervalMs":100}}"#;

/// A `tools/call` through stream 1 whose answer (`content_type`, in `chunks`, the last
/// one ending it) came from 10.0.0.1:80.
fn tools_call(w: &mut World, content_type: &'static str, chunks: &[&str]) -> Stream {
    tools_call_ending(w, content_type, chunks, true)
}

/// As [`tools_call`]; `ends`: the last chunk ends the answer.
fn tools_call_ending(w: &mut World, content_type: &'static str, chunks: &[&str], ends: bool) -> Stream {
    let mut s = Stream::new(1);
    let step = s.on_request_headers(&mut w.cx(), stateless("tools/call", Some("slow_task")), false);
    assert_eq!(step, Step { ops: vec![Op::WantResponse], flow: Flow::Continue }, "its answer is asked for, nothing held");
    let read = || -> Vec<u8> { panic!("a task's request body is never read") };
    assert_eq!(s.on_request_body(&mut w.cx(), &read, true).flow, Flow::Continue);
    assert_eq!(s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", content_type)])).flow, Flow::Continue);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(s.on_response_body(&mut w.cx(), &body(chunk), ends && i + 1 == chunks.len()).flow, Flow::Continue);
    }
    s
}

fn task_pin(w: &World, id: &str) -> Option<Pin> {
    w.stored(&crate::tasks::pin_key(id))
}

#[test]
fn a_request_that_cannot_concern_a_task_passes_untouched() {
    let mut w = World::new(true);
    for head in [stateless("tools/list", None), stateless("resources/read", Some("file:///a")), stateless("notifications/progress", None)] {
        let mut s = Stream::new(1);
        assert_eq!(s.on_request_headers(&mut w.cx(), head, false), Step { ops: vec![], flow: Flow::Continue });
        let read = || -> Vec<u8> { panic!("not read") };
        assert_eq!(s.on_request_body(&mut w.cx(), &read, true).flow, Flow::Continue);
        assert_eq!(s.on_response_body(&mut w.cx(), &read, true).flow, Flow::Continue);
    }
    // A 2025-era tools/call without session id: no session to open, no task to learn.
    let mut s = Stream::new(2);
    let head = HeaderPairs::from_pairs(&[(":method", "POST"), ("mcp-protocol-version", "2025-11-25"), ("mcp-method", "tools/call")]);
    assert_eq!(s.on_request_headers(&mut w.cx(), head, false), Step { ops: vec![], flow: Flow::Continue });
    assert!(w.env.counts.is_empty(), "nothing counted: {:?}", w.env.counts);
}

#[test]
fn a_task_a_json_answer_created_is_pinned_to_the_host_that_answered() {
    let mut w = World::new(true);
    let (a, b) = CREATED.split_at(40);
    tools_call(&mut w, "application/json", &[a, b]);
    assert_eq!(task_pin(&w, "t-1").map(|p| p.upstream).as_deref(), Some("10.0.0.1:80"));
    assert_eq!(w.count("tasks_pinned"), 1);
}

#[test]
fn a_task_an_sse_answer_created_is_pinned_at_its_response_event() {
    let mut w = World::new(false);
    let event = format!("id: 0\nretry: 3000\ndata:\n\nevent: message\ndata: {CREATED}\n\n");
    let mut s = tools_call_ending(&mut w, "text/event-stream", &[&event], false);
    assert!(task_pin(&w, "t-1").is_some(), "pinned before the stream ends");
    let read = || -> Vec<u8> { panic!("the rest of the answer is not read") };
    assert_eq!(s.on_response_body(&mut w.cx(), &read, true).flow, Flow::Continue);
}

#[test]
fn a_standard_result_pins_nothing_and_a_long_answer_stops_being_read() {
    let mut w = World::new(true);
    tools_call(&mut w, "application/json", &[r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#]);
    let long = "x".repeat(TASK_ANSWER_LIMIT);
    let mut s = tools_call(&mut w, "application/json", &[&long, "more"]);
    let read = || -> Vec<u8> { panic!("past the limit nothing is read") };
    s.on_response_body(&mut w.cx(), &read, true);
    let mut s = Stream::new(3);
    s.on_request_headers(&mut w.cx(), stateless("tools/call", Some("x")), false);
    s.on_response_headers(&mut w.cx(), &Resp::new(500, &[("content-type", "application/json")]));
    s.on_response_body(&mut w.cx(), &read, true);
    assert_eq!(w.count("tasks_pinned"), 0);
}

#[test]
fn task_requests_are_routed_by_mcp_name_without_reading_their_body() {
    let mut w = World::new(true);
    tools_call(&mut w, "application/json", &[CREATED]);
    for method in ["tasks/get", "tasks/update", "tasks/cancel"] {
        let mut s = Stream::new(5);
        let step = s.on_request_headers(&mut w.cx(), stateless(method, Some("t-1")), false);
        assert_eq!(step.ops, vec![Op::SetRequestHeader(Header::Pin, "10.0.0.1:80".into()), Op::WantResponse], "{method}");
        let read = || -> Vec<u8> { panic!("not read") };
        assert_eq!(s.on_request_body(&mut w.cx(), &read, true).flow, Flow::Continue);
        assert_eq!(s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "application/json")])).flow, Flow::Continue);
    }
    // The id may come base64-encoded (`=?base64?…?=`), as clients send non-token values.
    let mut s = Stream::new(6);
    let step = s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("=?base64?dC0x?=")), true);
    assert_eq!(routed_to(&step), Some("10.0.0.1:80"));
    assert_eq!(w.count("tasks_routed"), 4);
    // Without control, a task this Envoy never saw goes on load-balanced (counted).
    let mut w = World::new(false);
    let mut s = Stream::new(7);
    assert_eq!(s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-9")), true), Step::go(vec![]));
    assert_eq!(w.count("tasks_unpinned"), 1);
}

#[test]
fn a_task_pin_is_written_through_to_control_and_read_back_by_another_envoy() {
    let mut w = World::new(true);
    tools_call(&mut w, "application/json", &[CREATED]);
    let (id, put) = w.vm.task_writes.first().cloned().expect("queued for the root context's tick");
    assert_eq!((id.as_str(), put.upstream.as_str(), put.ttl_ms), ("t-1", "10.0.0.1:80", Some(60000)));
    // Another Envoy: no pin in its shared data; the request is held while control is asked.
    let mut other = World::new(true);
    let mut s = Stream::new(9);
    let step = s.on_request_headers(&mut other.cx(), stateless("tasks/get", Some("t-1")), true);
    assert_eq!(step.flow, Flow::Pause);
    let call = calls(&step)[0].clone();
    assert_eq!((call.method, call.resource, call.id.as_str()), ("GET", Resource::Task, "t-1"));
    let record = r#"{"task_id":"t-1","upstream":"10.0.0.1:80","created_at_ms":1,"expires_at_ms":2}"#;
    let step = s.on_control_answer(&mut other.cx(), ControlAnswer { status: Some(200), body: record.into() });
    assert_eq!(step, Step { ops: vec![Op::SetRequestHeader(Header::Pin, "10.0.0.1:80".into()), Op::WantResponse], flow: Flow::ResumeRequest });
    assert!(task_pin(&other, "t-1").is_some(), "pinned here too: the next poll asks nobody");
    // Unknown to control too, or control down: load-balanced.
    for status in [Some(404), Some(503), None] {
        let mut s = Stream::new(10);
        s.on_request_headers(&mut other.cx(), stateless("tasks/get", Some("t-2")), true);
        assert_eq!(s.on_control_answer(&mut other.cx(), ControlAnswer { status, body: Vec::new() }), Step::flow(Flow::ResumeRequest));
    }
    assert_eq!((other.count("tasks_unpinned"), other.count("control_errors")), (3, 2));
}

#[test]
fn a_task_whose_host_is_gone_gets_the_unknown_task_answer_at_once() {
    let mut w = World::new(true);
    tools_call(&mut w, "application/json", &[CREATED]);
    for gone in [Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20), Resp { attempt: 2, ..Resp::new(404, &[]) }] {
        let mut s = Stream::new(5);
        s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true);
        let step = s.on_response_headers(&mut w.cx(), &gone);
        let r = reply(&step).expect("answered by the filter");
        assert_eq!((r.status, json(&r.body)["error"]["code"].as_i64()), (200, Some(-32602)));
        assert!(task_pin(&w, "t-1").is_none(), "forgotten");
        tools_call(&mut w, "application/json", &[CREATED]);
    }
    assert_eq!(w.count("tasks_lost"), 2);
    // The pod's own answers, errors included, go through.
    let mut s = Stream::new(5);
    s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true);
    assert_eq!(s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "application/json")])), Step::flow(Flow::Continue));
}

#[test]
fn task_affinity_off_leaves_every_stateless_request_alone() {
    let mut w = World::new(true);
    w.cfg.task_affinity = false;
    let mut s = Stream::new(1);
    assert_eq!(s.on_request_headers(&mut w.cx(), stateless("tools/call", Some("slow_task")), false).ops, vec![]);
}

// ---- draining: new work goes elsewhere, tasks finish where they run -------------------

/// A `tasks/get` of `t-1` through stream `id`, answered 200 `content_type` with `answer`.
fn task_get_answered(w: &mut World, id: u32, content_type: &'static str, answer: &str) -> Step {
    let mut s = Stream::new(id);
    s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true);
    s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", content_type)]));
    s.on_response_body(&mut w.cx(), &body(answer), true)
}

const WORKING: &str = r#"{"jsonrpc":"2.0","id":3,"result":{"resultType":"complete","taskId":"t-1","status":"working"}}"#;
const COMPLETED: &str = r#"{"jsonrpc":"2.0","id":3,"result":{"resultType":"complete","taskId":"t-1","status":"completed","result":{"content":[]}}}"#;

#[test]
fn a_task_seen_terminal_is_written_to_control_once_and_its_pod_keeps_its_requests() {
    let mut w = World::new(true);
    tools_call(&mut w, "application/json", &[CREATED]);
    w.vm.task_writes.clear();
    super::drain_serving(&mut w, &["10.0.0.1:80"], &["10.0.0.2:80"]);
    task_get_answered(&mut w, 5, "application/json", WORKING);
    assert!(w.vm.task_writes.is_empty(), "still working: nothing to write");
    // Its pod drains, but the task's requests still reach it (it holds the task).
    let mut s = Stream::new(6);
    assert_eq!(routed_to(&s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true)), Some("10.0.0.1:80"));
    task_get_answered(&mut w, 7, "text/event-stream", &format!("data: {COMPLETED}\n\n"));
    let (id, put) = w.vm.task_writes.first().cloned().expect("the terminal status is written through");
    assert_eq!((id.as_str(), put.upstream.as_str(), put.terminal, put.ttl_ms), ("t-1", "10.0.0.1:80", true, None));
    assert_eq!((w.count("tasks_terminal"), task_pin(&w, "t-1").map(|p| p.upstream).as_deref()), (1, Some("10.0.0.1:80")), "the pin stays");
    // Once seen, later answers are not read again.
    let mut s = Stream::new(8);
    s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true);
    s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "application/json")]));
    let read = || -> Vec<u8> { panic!("a task seen terminal is not read again") };
    s.on_response_body(&mut w.cx(), &read, true);
    assert_eq!(w.vm.task_writes.len(), 1);
    // The pod no longer knows a task (-32602): over too. An answer over the limit: unknown.
    w.vm.task_writes.clear();
    super::drain_serving(&mut w, &[], &[]);
    tools_call(&mut w, "application/json", &[CREATED]);
    w.vm.task_writes.clear();
    task_get_answered(&mut w, 9, "application/json", &"x".repeat(TASK_ANSWER_LIMIT + 1));
    assert!(w.vm.task_writes.is_empty(), "an unreadable answer proves nothing");
    task_get_answered(&mut w, 10, "application/json", r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"unknown task: t-1"}}"#);
    assert!(w.vm.task_writes[0].1.terminal);
    // Without control nothing is read: no drain ever waits for a task.
    let mut w = World::new(false);
    tools_call(&mut w, "application/json", &[CREATED]);
    let mut s = Stream::new(5);
    s.on_request_headers(&mut w.cx(), stateless("tasks/get", Some("t-1")), true);
    s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "application/json")]));
    s.on_response_body(&mut w.cx(), &read, true);
}

#[test]
fn while_a_pod_drains_new_tasks_sessions_and_listen_streams_go_to_serving_pods() {
    let mut w = World::new(true);
    let mut s = Stream::new(1);
    assert_eq!(s.on_request_headers(&mut w.cx(), stateless("tools/call", Some("slow_task")), false).ops, vec![Op::WantResponse], "nothing drains: Envoy balances");
    super::drain_serving(&mut w, &["10.0.0.1:80"], &["10.0.0.2:80", "10.0.0.3:80"]);
    let mut routes = Vec::new();
    for (id, head) in [(2, stateless("tools/call", Some("slow_task"))), (3, stateless("subscriptions/listen", None)), (4, post(None))] {
        let mut s = Stream::new(id);
        let step = s.on_request_headers(&mut w.cx(), head, false);
        routes.push(routed_to(&step).map(str::to_string));
    }
    assert_eq!(routes, [Some("10.0.0.3:80".into()), Some("10.0.0.2:80".into()), Some("10.0.0.3:80".into())], "a tools/call, a listen stream, an initialize");
    assert_eq!(w.count("requests_steered_by_drain"), 3);
    // Requests that start nothing are not steered.
    let mut s = Stream::new(5);
    assert_eq!(s.on_request_headers(&mut w.cx(), stateless("tools/list", None), true).ops, vec![]);
}

#[test]
fn a_listen_stream_is_ended_when_its_upstream_starts_draining() {
    let mut w = World::new(true);
    let mut s = Stream::new(4);
    s.on_request_headers(&mut w.cx(), stateless("subscriptions/listen", None), false);
    s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "text/event-stream")]));
    assert!(w.vm.streams_to_end().is_empty(), "nothing drains");
    super::drain_serving(&mut w, &["10.0.0.1:80"], &[]);
    assert_eq!(w.vm.streams_to_end(), [4], "its upstream drains: the root context ends it");
    assert!(!w.vm.late_streams, "answered before the drain");
    let mut late = Stream::new(6);
    late.on_request_headers(&mut w.cx(), stateless("subscriptions/listen", None), false);
    late.on_response_headers(&mut w.cx(), &Resp::new(200, &[("content-type", "text/event-stream")]));
    assert!(w.vm.late_streams, "answered by an upstream already draining: ended on the next tick");
    s.on_done(&mut w.cx());
    late.on_done(&mut w.cx());
    assert!(w.vm.streams_to_end().is_empty(), "an ended stream is forgotten");
    // Without control there are no drains: the listen stream is not even looked at.
    let mut w = World::new(false);
    let mut s = Stream::new(4);
    assert_eq!(s.on_request_headers(&mut w.cx(), stateless("subscriptions/listen", None), false).ops, vec![]);
}
