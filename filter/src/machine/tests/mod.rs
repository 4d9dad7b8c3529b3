//! The stream machine against the rules real Envoy imposes (see the module docs), with an
//! in-memory shared data and recorded header reads. Nothing here imitates Envoy's
//! scheduling: each test feeds the events Envoy 1.40 was seen to deliver (`-l trace`) and
//! checks the actions.

use std::cell::RefCell;

use hashbrown::HashMap;

use super::body::BodyCopy;
use super::*;
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::store::{self, SharedData};
use crate::config::{ControlConfig, FilterConfig, ReplayBy, UnknownSession};
use crate::header_map::HeaderPairs;
use crate::store::memory::MemorySharedData;

struct TestEnv {
    shared: MemorySharedData,
    counts: HashMap<&'static str, u64>,
    /// The wall clock, Unix seconds (settable: `World::advance`).
    now: u64,
}

impl Default for TestEnv {
    fn default() -> TestEnv {
        TestEnv { shared: MemorySharedData::default(), counts: HashMap::new(), now: 1_000 }
    }
}

impl Env for TestEnv {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }
    fn now_secs(&self) -> u64 {
        self.now
    }
    fn count(&mut self, c: Counter) {
        *self.counts.entry(c.name().trim_start_matches("mcp_affinity.")).or_default() += 1;
    }
    fn pins_changed(&self) -> u64 {
        self.counts.get("pins_changed").copied().unwrap_or(0)
    }
}

/// A plugin (configuration + VM + host services) driving streams.
struct World {
    cfg: FilterConfig,
    vm: Vm,
    env: TestEnv,
}

impl World {
    fn new(control: bool) -> World {
        let mut cfg = FilterConfig::default();
        if control {
            cfg.control = Some(ControlConfig::default());
        }
        World { cfg, vm: Vm::default(), env: TestEnv::default() }
    }

    fn cx(&mut self) -> Ctx<'_> {
        Ctx { control: self.cfg.control.is_some(), cfg: &self.cfg, vm: &mut self.vm, env: &mut self.env }
    }

    fn count(&self, name: &str) -> u64 {
        self.env.counts.get(name).copied().unwrap_or(0)
    }

    /// Moves the clock on by `secs`.
    fn advance(&mut self, secs: u64) {
        self.env.now += secs;
    }

    fn pin(&mut self, id: &str, upstream: &str, recorded: bool) {
        let pin = Pin { upstream: upstream.into(), generation: 1, last_seen: 1_000, backend_session_id: id.into(), recorded };
        store::put(&mut self.env.shared, self.cfg.layout(), id, &pin);
    }

    fn stored(&self, id: &str) -> Option<Pin> {
        store::get(&self.env.shared, self.cfg.layout(), id)
    }
}

/// Response headers and attributes; records every property read.
struct Resp {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    details: &'static str,
    flags: u64,
    upstream: &'static str,
    attempt: u64,
    properties_read: RefCell<u32>,
    status_read: RefCell<u32>,
}

impl Resp {
    fn new(status: u16, headers: &[(&'static str, &'static str)]) -> Resp {
        Resp { status, headers: headers.to_vec(), details: "via_upstream", flags: 0, upstream: "10.0.0.1:80", attempt: 1, properties_read: RefCell::new(0), status_read: RefCell::new(0) }
    }
    fn local_reply(details: &'static str, flags: u64) -> Resp {
        Resp { details, flags, ..Resp::new(503, &[("content-type", "text/plain")]) }
    }
}

impl ResponseHead for Resp {
    fn status(&self) -> u16 {
        *self.status_read.borrow_mut() += 1;
        self.status
    }
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_bytes().to_vec())
    }
    fn code_details(&self) -> Option<Vec<u8>> {
        *self.properties_read.borrow_mut() += 1;
        Some(self.details.as_bytes().to_vec())
    }
    fn flags(&self) -> u64 {
        *self.properties_read.borrow_mut() += 1;
        self.flags
    }
    fn upstream_address(&self) -> Option<Vec<u8>> {
        *self.properties_read.borrow_mut() += 1;
        Some(self.upstream.as_bytes().to_vec())
    }
    fn attempt_count(&self) -> u64 {
        *self.properties_read.borrow_mut() += 1;
        self.attempt
    }
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
const CALL: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami"}}"#;

fn post(id: Option<&'static str>) -> HeaderPairs {
    let mut h = vec![(":method", "POST"), (":path", "/mcp"), (":authority", "example"), ("content-type", "application/json"), ("authorization", "Bearer t")];
    if let Some(id) = id {
        h.push(("mcp-session-id", id));
    }
    HeaderPairs::from_pairs(&h)
}

fn body(s: &str) -> impl Fn() -> Vec<u8> + '_ {
    move || s.as_bytes().to_vec()
}

fn calls(step: &Step) -> Vec<&Call> {
    step.ops.iter().filter_map(|o| if let Op::Call(c) = o { Some(c) } else { None }).collect()
}

fn reply(step: &Step) -> Option<&Reply> {
    step.ops.iter().find_map(|o| if let Op::Reply(r) = o { Some(r) } else { None })
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

// ---- rule 1: a headers Pause stops the body ----------------------------------------------

#[test]
fn a_post_without_session_id_goes_on_at_its_headers_and_initialize_is_read_from_body_chunks() {
    let mut w = World::new(true);
    let mut s = Stream::new(1);
    // Envoy delivers no body event while request headers are paused: they must go on.
    assert_eq!(s.on_request_headers(&mut w.cx(), post(None), false).flow, Flow::Continue);
    // Chunks stream upstream as they come (Continue), copied for classification.
    let (a, b) = INIT.split_at(20);
    assert_eq!(s.on_request_body(&mut w.cx(), &body(a), false).flow, Flow::Continue);
    assert_eq!(s.on_request_body(&mut w.cx(), &body(b), true).flow, Flow::Continue);
    assert_eq!(w.count("initialize_seen"), 1);
    answer_pins_s1(&mut w, &mut s, "async records hold nothing");
}

#[test]
fn without_control_a_post_without_session_id_is_pinned_from_its_answer_alone() {
    let mut w = World::new(false);
    let mut s = Stream::new(1);
    assert_eq!(s.on_request_headers(&mut w.cx(), post(None), false).flow, Flow::Continue);
    // Nothing needs the body without control (no record keeps it): no copy, no host call.
    let read = || -> Vec<u8> { panic!("the body is not read without control") };
    assert_eq!(s.on_request_body(&mut w.cx(), &read, true).flow, Flow::Continue);
    assert_eq!(w.count("initialize_seen"), 0);
    answer_pins_s1(&mut w, &mut s, "without control nothing holds the response");
}

/// The answer to `s` carries `Mcp-Session-Id: s1`: it goes on at once (`why`), and s1 is
/// pinned to the upstream host that answered.
fn answer_pins_s1(w: &mut World, s: &mut Stream, why: &str) {
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "s1"), ("content-type", "text/event-stream")]));
    assert_eq!(step.flow, Flow::Continue, "{why}");
    assert_eq!(w.stored("s1").unwrap().upstream, "10.0.0.1:80", "pinned to upstream.address");
    assert_eq!(w.count("sessions_pinned"), 1);
}

#[test]
fn the_initialize_response_goes_on_while_its_record_waits_in_the_vm_for_the_tick() {
    let mut w = World::new(true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(None), false);
    s.on_request_body(&mut w.cx(), &body(INIT), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "s1")]));
    assert_eq!(step, Step { ops: vec![], flow: Flow::Continue }, "async (the default): nothing is held, no call per session");
    assert!(!s.waits_for_control());
    assert!(calls(&s.on_done(&mut w.cx())).is_empty(), "nothing is sent when the stream ends either");
    // The record waits in the VM; the root context sends the queue on its tick.
    let batch = w.vm.records.take_batch().expect("queued");
    assert_eq!(batch.records.len(), 1);
    let record = &json(&batch.body)["records"]["s1"];
    assert_eq!((record["upstream"].as_str(), record["initialize"].as_str()), (Some("10.0.0.1:80"), Some(INIT)));
    assert!(w.vm.records.is_empty());
    // Lookups and the initialized update ask control to wait for a write in flight.
    let step = Stream::new(3).on_request_headers(&mut w.cx(), post(Some("s9")), false);
    assert_eq!(calls(&step)[0].wait_ms, Some(250));
    let mut s4 = Stream::new(4);
    s4.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = s4.on_request_body(&mut w.cx(), &body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), true);
    assert_eq!((calls(&step)[0].method, calls(&step)[0].wait_ms), ("PATCH", Some(250)));
}

#[test]
fn with_sync_writes_the_initialize_response_is_held_until_control_has_the_record() {
    let mut w = World::new(true);
    w.cfg.control.as_mut().unwrap().initialize_write = crate::config::InitializeWrite::Sync;
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(None), false);
    s.on_request_body(&mut w.cx(), &body(INIT), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "s1")]));
    assert_eq!(step.flow, Flow::Pause);
    let put = calls(&step)[0];
    assert_eq!((put.method, put.id.as_str()), ("PUT", "s1"));
    let record = json(put.body.as_ref().unwrap());
    assert_eq!(record["initialize"], INIT);
    assert_eq!(record["upstream"], "10.0.0.1:80");
    // Control answers (or fails): the held response goes on either way.
    assert_eq!(s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(201), body: vec![] }).flow, Flow::ResumeResponse);
    let mut s2 = Stream::new(2);
    s2.on_request_headers(&mut w.cx(), post(None), false);
    s2.on_request_body(&mut w.cx(), &body(INIT), true);
    s2.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "s2")]));
    assert_eq!(s2.on_control_answer(&mut w.cx(), ControlAnswer::default()).flow, Flow::ResumeResponse);
    assert_eq!(w.count("control_errors"), 1);
    assert!(w.stored("s2").is_some(), "shared data has the pin even when control is down");
}

#[test]
fn an_mcp_method_hint_for_another_method_skips_the_body_copy() {
    let mut w = World::new(true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&[(":method", "POST"), ("mcp-method", "tools/list")]), false);
    let read = || -> Vec<u8> { panic!("the body is not read") };
    assert_eq!(s.on_request_body(&mut w.cx(), &read, true).flow, Flow::Continue);
}

#[test]
fn oversized_and_malformed_bodies_pass_through_counted() {
    let mut w = World::new(true);
    w.cfg.max_body_bytes = 8;
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(None), false);
    assert_eq!(s.on_request_body(&mut w.cx(), &body(INIT), true).flow, Flow::Continue);
    assert_eq!(w.count("body_too_large"), 1);
    w.cfg.max_body_bytes = 1024;
    let mut s = Stream::new(2);
    s.on_request_headers(&mut w.cx(), post(None), false);
    s.on_request_body(&mut w.cx(), &body("{not json"), true);
    assert_eq!(w.count("malformed_body"), 1);
}

// ---- rule 2: request headers are readable in their own event only ------------------------

#[test]
fn a_pinned_request_writes_the_pin_and_reads_no_property_on_success() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    let step = s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step, Step { ops: vec![Op::SetRequestHeader(Header::Pin, "10.0.0.2:80".into())], flow: Flow::Continue });
    assert_eq!(w.count("requests_pinned"), 1);
    // A 200 answer reads no Envoy property (local replies are ≥ 500).
    let resp = Resp::new(200, &[("content-type", "application/json")]);
    assert_eq!(s.on_response_headers(&mut w.cx(), &resp).flow, Flow::Continue);
    assert_eq!(*resp.properties_read.borrow(), 0);
}

#[test]
fn without_control_a_pinned_response_is_not_even_looked_at() {
    let mut w = World::new(false);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let resp = Resp::new(404, &[]);
    assert_eq!(s.on_response_headers(&mut w.cx(), &resp), Step { ops: vec![], flow: Flow::Continue });
    assert_eq!(*resp.status_read.borrow(), 0, "no :status read");
}

#[test]
fn what_recovery_needs_from_the_request_is_kept_from_the_request_headers_event() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    s.on_request_body(&mut w.cx(), &body(CALL), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    assert_eq!(step.flow, Flow::Pause);
    let recover = calls(&step)[0];
    assert_eq!((recover.method, recover.suffix), ("POST", "/recover"));
    let r = json(recover.body.as_ref().unwrap());
    assert_eq!(r["reason"], "session_unknown");
    assert_eq!(r["failed_upstream"], "10.0.0.2:80");
    assert_eq!((r["request"]["method"].as_str(), r["request"]["path"].as_str(), r["request"]["authority"].as_str()), (Some("POST"), Some("/mcp"), Some("example")));
    assert_eq!(r["request"]["authorization"], "Bearer t");
    assert_eq!(r["request"]["body"], CALL);
}

#[test]
fn the_protocol_version_is_captured_with_the_headers_for_notifications_initialized() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", false);
    let mut s = Stream::new(1);
    let req = HeaderPairs::from_pairs(&[(":method", "POST"), ("mcp-session-id", "s1"), ("mcp-protocol-version", "2025-06-18")]);
    s.on_request_headers(&mut w.cx(), req, false);
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let step = s.on_request_body(&mut w.cx(), &body(note), true);
    assert_eq!(step.flow, Flow::Pause, "held at its body end while control records it");
    let patch = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((patch["initialized"].as_str(), patch["protocol_version"].as_str()), (Some(note), Some("2025-06-18")));
    assert_eq!(s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: vec![] }).flow, Flow::ResumeRequest);
    assert!(w.stored("s1").unwrap().recorded);
}

#[test]
fn another_first_request_marks_the_session_recorded_without_control() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", false);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(s.on_request_body(&mut w.cx(), &body(CALL), true), Step { ops: vec![], flow: Flow::Continue });
    assert!(w.stored("s1").unwrap().recorded);
}

// ---- pins, ids and client headers --------------------------------------------------------

#[test]
fn a_client_pin_header_is_removed_and_never_routes() {
    let mut w = World::new(false);
    let mut s = Stream::new(1);
    let req = HeaderPairs::from_pairs(&[(":method", "GET"), ("x-session-pod", "169.254.169.254:80")]);
    let step = s.on_request_headers(&mut w.cx(), req, true);
    assert_eq!(step.ops, vec![Op::RemoveRequestHeader(Header::Pin)]);
    assert_eq!(w.count("client_pin_header_removed"), 1);
}

#[test]
fn invalid_and_unknown_session_ids_get_local_replies() {
    let mut w = World::new(false);
    let mut s = Stream::new(1);
    let step = s.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&[(":method", "POST"), ("mcp-session-id", "bad id")]), false);
    assert_eq!((step.flow, reply(&step).unwrap().status), (Flow::Pause, 400));
    let step = Stream::new(2).on_request_headers(&mut w.cx(), post(Some("nobody")), false);
    assert_eq!((step.flow, reply(&step).unwrap().status), (Flow::Pause, 404));
    assert_eq!(json(&reply(&step).unwrap().body)["error"]["code"], -32001);
    w.cfg.unknown_session = UnknownSession::PassThrough;
    let step = Stream::new(3).on_request_headers(&mut w.cx(), post(Some("nobody")), false);
    assert_eq!(step, Step { ops: vec![], flow: Flow::Continue });
    assert_eq!((w.count("unknown_session"), w.count("requests_unpinned")), (1, 1));
}

#[test]
fn a_re_pinned_session_keeps_the_client_id_both_ways() {
    let mut w = World::new(false);
    let pin = Pin { upstream: "10.0.0.3:80".into(), generation: 2, last_seen: 1_000, backend_session_id: "backend".into(), recorded: true };
    store::put(&mut w.env.shared, w.cfg.layout(), "client", &pin);
    let mut s = Stream::new(1);
    let step = s.on_request_headers(&mut w.cx(), post(Some("client")), false);
    assert!(step.ops.contains(&Op::SetRequestHeader(Header::SessionId, "backend".into())));
    // Envoy's response matcher would skip the filter on this 2xx answer; the filter state
    // set here makes the answer (carrying the backend's id) reach it.
    assert!(step.ops.contains(&Op::WantResponse), "{step:?}");
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "backend")]));
    assert_eq!(step.ops, vec![Op::SetResponseHeader(Header::SessionId, "client".into())]);
}

#[test]
fn delete_forgets_the_session_here_and_in_control() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&[(":method", "DELETE"), ("mcp-session-id", "s1")]), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(200, &[]));
    assert_eq!((step.flow, calls(&step)[0].method), (Flow::Pause, "DELETE"));
    assert!(w.stored("s1").is_none());
    assert_eq!(s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(204), body: vec![] }).flow, Flow::ResumeResponse);
}

// ---- a VM's own copies of pins ------------------------------------------------------------

/// Where a step routes its request (the pin header's value).
fn routed_to(step: &Step) -> Option<&str> {
    step.ops.iter().find_map(|o| if let Op::SetRequestHeader(Header::Pin, v) = o { Some(v.as_str()) } else { None })
}

/// A request of `id` handled by another worker VM of the same Envoy (same shared data and
/// counters, its own VM state).
fn on_other_vm(w: &mut World, vm: &mut Vm, context_id: u32, head: HeaderPairs) -> Step {
    let mut cx = Ctx { control: w.cfg.control.is_some(), cfg: &w.cfg, vm, env: &mut w.env };
    Stream::new(context_id).on_request_headers(&mut cx, head, false)
}

#[test]
fn a_pinned_request_uses_the_vms_copy_of_the_pin_until_a_pin_changes_anywhere() {
    let mut w = World::new(false);
    w.pin("s1", "10.0.0.2:80", true);
    assert_eq!(routed_to(&Stream::new(1).on_request_headers(&mut w.cx(), post(Some("s1")), false)), Some("10.0.0.2:80"));
    // Shared data changed with no change counted: the copy is used, no shared data read.
    w.pin("s1", "10.0.0.3:80", true);
    assert_eq!(routed_to(&Stream::new(2).on_request_headers(&mut w.cx(), post(Some("s1")), false)), Some("10.0.0.2:80"));
    // A change counted anywhere makes the copy stale: shared data is read again.
    w.env.count(Counter::PinsChanged);
    assert_eq!(routed_to(&Stream::new(3).on_request_headers(&mut w.cx(), post(Some("s1")), false)), Some("10.0.0.3:80"));
    // `local_pins: 0`: every request reads shared data.
    w.cfg.local_pins = 0;
    w.pin("s1", "10.0.0.4:80", true);
    assert_eq!(routed_to(&Stream::new(4).on_request_headers(&mut w.cx(), post(Some("s1")), false)), Some("10.0.0.4:80"));
}

#[test]
fn a_recovery_or_a_delete_on_one_vm_reaches_the_next_request_on_another() {
    let mut w = World::new(true);
    let mut other = Vm::default();
    let mut s = pinned_call(&mut w);
    assert_eq!(routed_to(&on_other_vm(&mut w, &mut other, 10, post(Some("s1")))), Some("10.0.0.2:80"));
    // This VM recovers the session onto another pod: a change.
    s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: REPLAYED.into() });
    assert_eq!(w.count("pins_changed"), 1);
    let step = on_other_vm(&mut w, &mut other, 11, post(Some("s1")));
    assert_eq!(routed_to(&step), Some("10.0.0.5:80"));
    assert!(step.ops.contains(&Op::SetRequestHeader(Header::SessionId, "b2".into())), "{step:?}");
    // A DELETE here: the other VM no longer routes the session (it asks control).
    let mut d = Stream::new(12);
    d.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&[(":method", "DELETE"), ("mcp-session-id", "s1")]), true);
    d.on_response_headers(&mut w.cx(), &Resp::new(200, &[]));
    assert_eq!(w.count("pins_changed"), 2);
    let step = on_other_vm(&mut w, &mut other, 13, post(Some("s1")));
    assert_eq!((routed_to(&step), calls(&step)[0].method), (None, "GET"));
}

// ---- lookups: one per session per VM ------------------------------------------------------

/// A record as control answers a lookup (`GET /v1/sessions/s1`).
const RECORD: &str = r#"{"version":1,"session_id":"s1","backend_session_id":"s1","upstream":"10.0.0.4:80","generation":1,"initialize":"{}","initialized":"{}","protocol_version":null,"created_at_ms":1,"last_seen_ms":1}"#;

#[test]
fn one_lookup_per_session_and_waiters_are_woken_with_the_same_route() {
    let mut w = World::new(true);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    let step = a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!((step.flow, calls(&step)[0].method), (Flow::Pause, "GET"));
    let step = b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step, Step { ops: vec![], flow: Flow::Pause }, "waits without a second lookup");
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: RECORD.into() });
    assert_eq!(step.flow, Flow::ResumeRequest);
    let set = Op::SetRequestHeader(Header::Pin, "10.0.0.4:80".into());
    assert_eq!(step.ops, vec![Op::Wake { waiters: vec![2], ops: vec![set.clone()], resume: true }, set]);
    assert_eq!((w.count("control_lookups"), w.count("control_hits"), w.count("requests_pinned")), (1, 1, 2));
    // Rule 1: the body events come only after the resume; the waiter catches up from shared
    // data and copies its body for a replay.
    b.on_request_body(&mut w.cx(), &body(CALL), true);
    let step = b.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    assert_eq!(json(calls(&step)[0].body.as_ref().unwrap())["request"]["body"], CALL);
}

#[test]
fn a_failed_or_refused_lookup_lets_requests_go_on_unpinned() {
    let mut w = World::new(true);
    let mut a = Stream::new(1);
    a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer::default());
    assert_eq!(step, Step { ops: vec![], flow: Flow::ResumeRequest });
    assert_eq!((w.count("control_errors"), w.count("requests_unpinned")), (1, 1));
    assert!(w.vm.lookups.is_empty());
}

#[test]
fn a_lookup_owner_that_ends_early_releases_its_waiters() {
    let mut w = World::new(true);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = a.on_done(&mut w.cx());
    assert_eq!(step.ops, vec![Op::Wake { waiters: vec![2], ops: vec![], resume: true }]);
}

#[test]
fn control_says_unknown_so_every_waiter_gets_404() {
    let mut w = World::new(true);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(404), body: vec![] });
    assert_eq!(step.flow, Flow::Stay);
    assert!(matches!(&step.ops[0], Op::Wake { ops, resume: false, .. } if matches!(ops[0], Op::Reply(Reply { status: 404, .. }))));
    assert_eq!(reply(&step).unwrap().status, 404);
    assert_eq!(w.count("unknown_session"), 2);
}

// ---- rule 3: response bodies are not read; recovery decisions on headers -----------------

fn pinned_call(w: &mut World) -> Stream {
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    s.on_request_body(&mut w.cx(), &body(CALL), true);
    s
}

const REPLAYED: &str = r#"{"outcome":"replayed","pin":{"upstream":"10.0.0.5:80","backend_session_id":"b2","generation":2},"response":{"status":200,"content_type":"application/json","body":"{\"ok\":1}"}}"#;

#[test]
fn a_session_error_is_answered_with_control_s_replay_and_the_client_s_id() {
    let mut w = World::new(true);
    let mut s = pinned_call(&mut w);
    s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    let step = s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: REPLAYED.into() });
    assert_eq!(step.flow, Flow::Stay, "the local reply replaces the held response");
    let r = reply(&step).unwrap();
    assert_eq!((r.status, r.session_id.as_deref(), r.body.as_slice()), (200, Some("s1"), &b"{\"ok\":1}"[..]));
    let pin = w.stored("s1").unwrap();
    assert_eq!((pin.upstream.as_str(), pin.backend_session_id.as_str(), pin.generation), ("10.0.0.5:80", "b2", 2));
    assert_eq!(w.count("recoveries_replayed"), 1);
}

#[test]
fn a_400_json_is_verified_by_control_and_passed_through_when_the_session_is_alive() {
    let mut w = World::new(true);
    let mut s = pinned_call(&mut w);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(400, &[("content-type", "application/json")]));
    assert_eq!(step.flow, Flow::Pause, "headers held; the body is not read (Envoy would not deliver it)");
    let suspect = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!(suspect["reason"], "session_suspect");
    assert_eq!(suspect["session_errors"]["codes"], serde_json::json!([-32001]), "control probes with the configured rules");
    let alive = r#"{"outcome":"alive","pin":{"upstream":"10.0.0.2:80","backend_session_id":"s1","generation":1}}"#;
    let step = s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: alive.into() });
    assert_eq!(step, Step { ops: vec![], flow: Flow::ResumeResponse }, "the genuine 400 goes through untouched");
    assert_eq!(w.stored("s1").unwrap().upstream, "10.0.0.2:80");
    assert_eq!(w.count("sessions_verified"), 1);
}

#[test]
fn other_errors_and_non_json_400s_are_not_held() {
    let mut w = World::new(true);
    for resp in [Resp::new(400, &[("content-type", "text/plain")]), Resp::new(500, &[]), Resp::new(503, &[])] {
        let mut s = pinned_call(&mut w);
        assert_eq!(s.on_response_headers(&mut w.cx(), &resp), Step { ops: vec![], flow: Flow::Continue });
    }
}

#[test]
fn router_local_replies_name_the_failure() {
    let mut w = World::new(true);
    let mut s = pinned_call(&mut w);
    let step = s.on_response_headers(&mut w.cx(), &Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20));
    assert_eq!(json(calls(&step)[0].body.as_ref().unwrap())["reason"], "connect_failure");
    let mut s = pinned_call(&mut w);
    let step = s.on_response_headers(&mut w.cx(), &Resp::local_reply("upstream_reset_before_response_started{connection_termination}", 0x40));
    assert_eq!(json(calls(&step)[0].body.as_ref().unwrap())["reason"], "reset_after_send");
}

#[test]
fn control_failing_a_recovery_lets_the_upstream_answer_through() {
    let mut w = World::new(true);
    let mut s = pinned_call(&mut w);
    s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    assert_eq!(s.on_control_answer(&mut w.cx(), ControlAnswer::default()), Step { ops: vec![], flow: Flow::ResumeResponse });
    let mut s = pinned_call(&mut w);
    s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    let step = s.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(404), body: vec![] });
    assert_eq!(reply(&step).unwrap().status, 404, "control does not know the session either");
    assert!(w.stored("s1").is_none());
}

#[test]
fn a_body_over_the_replay_limit_recovers_the_session_but_is_never_sent() {
    let mut w = World::new(true);
    w.cfg.recovery.max_replay_body_bytes = 8;
    w.cfg.max_body_bytes = 8;
    let mut s = pinned_call(&mut w);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    assert_eq!(step.flow, Flow::Pause, "held for control's answer");
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((r["request"]["body"].as_str(), r["request"]["body_complete"].as_bool()), (Some(""), Some(false)), "no part of the body is sent");
    assert_eq!(w.count("recovery_body_too_large"), 1);
}

/// Rule 5 (Envoy 1.40, `-l trace`): a client writes the headers, then the body; the pinned
/// pod is gone and the router's local reply (`UF`) reaches the filter before the body did.
/// Envoy will not hand the filter the rest: nothing of the body is sent, control recovers
/// the session and tells the client the request did not run.
#[test]
fn a_local_reply_before_the_whole_body_recovers_the_session_without_a_replay() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    s.on_request_body(&mut w.cx(), &body(&CALL[..20]), false);
    let step = s.on_response_headers(&mut w.cx(), &Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20));
    assert_eq!(step.flow, Flow::Pause, "held for control's answer");
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!(r["reason"], "connect_failure");
    assert_eq!((r["request"]["body"].as_str(), r["request"]["body_complete"].as_bool()), (Some(""), Some(false)), "no part of the body is sent");
    assert_eq!(w.count("recovery_body_incomplete"), 1);
}

#[test]
fn a_body_seen_whole_is_sent_byte_for_byte() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let (head, tail) = CALL.split_at(20);
    s.on_request_body(&mut w.cx(), &body(head), false);
    s.on_request_body(&mut w.cx(), &body(tail), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20));
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((r["request"]["body"].as_str(), r["request"]["body_complete"].as_bool()), (Some(CALL), Some(true)));
}

/// A session not yet past `notifications/initialized` (in this VM's copy of its pin) has
/// its bodies copied up to `max_body_bytes` for the lifecycle; a replay still takes only
/// bodies within `max_replay_body_bytes`.
#[test]
fn a_body_over_the_replay_limit_is_never_replayed_however_long_the_copy() {
    let mut w = World::new(true);
    w.cfg.recovery.max_replay_body_bytes = 16;
    w.pin("s1", "10.0.0.2:80", false);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    s.on_request_body(&mut w.cx(), &body(CALL), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20));
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((r["request"]["body"].as_str(), r["request"]["body_complete"].as_bool()), (Some(""), Some(false)));
    assert_eq!(w.count("recovery_body_too_large"), 1);
}

#[test]
fn a_body_shorter_than_its_content_length_is_never_replayed() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    let head = HeaderPairs::from_pairs(&[(":method", "POST"), (":path", "/mcp"), ("mcp-session-id", "s1"), ("content-length", "500")]);
    s.on_request_headers(&mut w.cx(), head, false);
    s.on_request_body(&mut w.cx(), &body(CALL), true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((r["request"]["body"].as_str(), r["request"]["body_complete"].as_bool()), (Some(""), Some(false)));
    assert_eq!(w.count("recovery_body_incomplete"), 1);
}

#[test]
fn a_get_has_no_body_to_wait_for() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    let get = HeaderPairs::from_pairs(&[(":method", "GET"), (":path", "/mcp"), ("mcp-session-id", "s1")]);
    s.on_request_headers(&mut w.cx(), get, true);
    let step = s.on_response_headers(&mut w.cx(), &Resp::new(404, &[]));
    let r = json(calls(&step)[0].body.as_ref().unwrap());
    assert_eq!((r["request"]["method"].as_str(), r["request"]["body_complete"].as_bool()), (Some("GET"), Some(true)));
}

// ---- replay by Envoy's retry (`recovery.replay_by: envoy_retry`) --------------------------

fn envoy_retry_world() -> World {
    let mut w = World::new(true);
    w.cfg.recovery.replay_by = ReplayBy::EnvoyRetry;
    w
}

/// A pinned `tools/call` of s1 (past initialisation) whose body the filter must not read.
fn pinned_call_without_copy(w: &mut World) -> Stream {
    w.pin("s1", "10.0.0.2:80", true);
    let mut s = Stream::new(1);
    let step = s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step, Step::go(vec![Op::SetRequestHeader(Header::Pin, "10.0.0.2:80".into())]));
    let step = s.on_request_body(&mut w.cx(), &|| panic!("the body of a pinned request is not read"), true);
    assert_eq!(step, Step::flow(Flow::Continue));
    s
}

#[test]
fn with_envoy_retry_a_pinned_request_copies_nothing_and_leaves_failures_to_envoy() {
    let mut w = envoy_retry_world();
    let failures = [
        Resp::new(404, &[]),
        Resp::new(400, &[("content-type", "application/json")]),
        Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20),
        Resp::local_reply("upstream_reset_before_response_started{connection_termination}", 0x40),
    ];
    for resp in failures {
        let mut s = pinned_call_without_copy(&mut w);
        assert_eq!(s.on_response_headers(&mut w.cx(), &resp), Step::flow(Flow::Continue), "status {}", resp.status);
        assert_eq!((*resp.properties_read.borrow(), *resp.status_read.borrow()), (0, 0), "nothing but the pin header is read");
    }
    assert_eq!(w.stored("s1").unwrap().upstream, "10.0.0.2:80", "a 404 that reaches the client changes nothing here");
}

#[test]
fn with_envoy_retry_control_s_answer_re_pins_the_session_and_the_pin_header_never_reaches_the_client() {
    let mut w = envoy_retry_world();
    let mut s = pinned_call_without_copy(&mut w);
    let answer = Resp { attempt: 2, ..Resp::new(200, &[("mcp-session-id", "s1"), ("x-mcp-affinity-pin", "10.0.0.5:80 b2 2")]) };
    let step = s.on_response_headers(&mut w.cx(), &answer);
    assert_eq!(step, Step::go(vec![Op::RemoveResponseHeader(Header::RecoveredPin)]));
    let pin = w.stored("s1").unwrap();
    assert_eq!((pin.upstream.as_str(), pin.backend_session_id.as_str(), pin.generation), ("10.0.0.5:80", "b2", 2));
    assert_eq!((w.count("recovered_pins"), w.count("pins_changed")), (1, 1));
    // The next request goes to the new pod under its id; control can still find the record.
    let mut s = Stream::new(2);
    let step = s.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(
        step.ops,
        vec![
            Op::SetRequestHeader(Header::Pin, "10.0.0.5:80".into()),
            Op::SetRequestHeader(Header::SessionId, "b2".into()),
            Op::SetRequestHeader(Header::ClientSession, "s1".into()),
            Op::WantResponse,
        ]
    );
}

#[test]
fn with_envoy_retry_a_pin_header_a_pod_sends_is_removed_and_ignored() {
    let mut w = envoy_retry_world();
    for (attempt, value) in [(1, "10.6.6.6:80 evil 9"), (0, "10.6.6.6:80 evil 9"), (2, "10.6.6.6:80 evil"), (2, "10.6.6.6:80 evil 0")] {
        let mut s = pinned_call_without_copy(&mut w);
        let answer = Resp { attempt, ..Resp::new(200, &[("x-mcp-affinity-pin", value)]) };
        let step = s.on_response_headers(&mut w.cx(), &answer);
        assert_eq!(step, Step::go(vec![Op::RemoveResponseHeader(Header::RecoveredPin)]), "attempt {attempt}, {value:?}");
        assert_eq!(w.stored("s1").unwrap().upstream, "10.0.0.2:80", "attempt {attempt}, {value:?}");
    }
    assert_eq!((w.count("recovered_pins_rejected"), w.count("recovered_pins")), (4, 0));
}

// ---- any event sequence ------------------------------------------------------------------

// ---- drain: sessions leave a draining upstream before their next request ----------------

/// Makes `upstreams` the draining list in shared data and lets the VM adopt it (the tick).
fn drain(w: &mut World, upstreams: &[&str]) {
    drain_serving(w, upstreams, &[]);
}

/// [`drain`], with control naming `serving` as the upstreams for new work.
fn drain_serving(w: &mut World, upstreams: &[&str], serving: &[&str]) {
    let own = |l: &[&str]| l.iter().map(|u| (*u).to_string()).collect();
    crate::drain::store_answer(&mut w.env.shared, 1, &crate::drain::Upstreams { draining: own(upstreams), serving: own(serving) });
    w.vm.draining.refresh(&w.env.shared);
}

const MOVED: &str = r#"{"outcome":"moved","pin":{"upstream":"10.0.0.5:80","backend_session_id":"b2","generation":2},"response":null}"#;
const STAYED: &str = r#"{"outcome":"stayed","pin":{"upstream":"10.0.0.2:80","backend_session_id":"s1","generation":1},"response":null}"#;

#[test]
fn a_session_on_a_draining_upstream_is_moved_before_its_request_is_sent() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    drain(&mut w, &["10.0.0.2:80"]);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    let step = a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step.flow, Flow::Pause, "held at its headers until control moved the session");
    let call = calls(&step)[0];
    assert_eq!((call.method, call.suffix), ("POST", "/recover"));
    let req = json(call.body.as_ref().unwrap());
    assert_eq!((req["reason"].as_str(), req["failed_upstream"].as_str(), req["failed_generation"].as_u64()), (Some("draining"), Some("10.0.0.2:80"), Some(1)));
    assert_eq!((req["request"]["body"].as_str(), req["request"]["authorization"].as_str()), (Some(""), Some("Bearer t")), "no body yet; the pod may need the client's credentials");
    let step = b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step, Step { ops: vec![], flow: Flow::Pause }, "one move per session per VM; the other stream waits");
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: MOVED.into() });
    assert_eq!(step.flow, Flow::ResumeRequest);
    let route = vec![Op::SetRequestHeader(Header::Pin, "10.0.0.5:80".into()), Op::SetRequestHeader(Header::SessionId, "b2".into()), Op::WantResponse];
    let mut expected = vec![Op::Wake { waiters: vec![2], ops: route.clone(), resume: true }];
    expected.extend(route);
    assert_eq!(step.ops, expected);
    assert_eq!(w.stored("s1").unwrap().upstream, "10.0.0.5:80");
    assert_eq!((w.count("sessions_moved_by_drain"), w.count("requests_pinned"), w.count("control_writes")), (1, 2, 0));
    // Rule 1: the body streams after the resume, unheld; the answer carries the client's id.
    assert_eq!(a.on_request_body(&mut w.cx(), &body(CALL), true).flow, Flow::Continue);
    let step = a.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", "b2")]));
    assert_eq!(step, Step { ops: vec![Op::SetResponseHeader(Header::SessionId, "s1".into())], flow: Flow::Continue });
    // The next request goes straight to the new pin.
    let step = Stream::new(3).on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step.flow, Flow::Continue);
}

#[test]
fn a_move_that_cannot_be_made_sends_the_request_to_the_draining_upstream() {
    for answer in [ControlAnswer { status: Some(200), body: STAYED.into() }, ControlAnswer { status: Some(503), body: vec![] }, ControlAnswer::default(), ControlAnswer { status: Some(404), body: vec![] }, ControlAnswer { status: Some(200), body: b"{}".to_vec() }] {
        let mut w = World::new(true);
        w.pin("s1", "10.0.0.2:80", true);
        drain(&mut w, &["10.0.0.2:80"]);
        let mut a = Stream::new(1);
        a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
        let step = a.on_control_answer(&mut w.cx(), answer.clone());
        assert_eq!(step, Step { ops: vec![Op::SetRequestHeader(Header::Pin, "10.0.0.2:80".into())], flow: Flow::ResumeRequest }, "{answer:?}");
        assert_eq!(w.stored("s1").unwrap().generation, 1, "the pin is unchanged");
        assert_eq!(w.count("drain_moves_failed"), 1);
        assert!(w.vm.lookups.is_empty());
    }
}

#[test]
fn delete_and_requests_without_control_are_never_moved() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    drain(&mut w, &["10.0.0.2:80"]);
    let delete = HeaderPairs::from_pairs(&[(":method", "DELETE"), (":path", "/mcp"), ("mcp-session-id", "s1")]);
    let step = Stream::new(1).on_request_headers(&mut w.cx(), delete, true);
    assert_eq!(step, Step { ops: vec![Op::WantResponse, Op::SetRequestHeader(Header::Pin, "10.0.0.2:80".into())], flow: Flow::Continue });
    let mut w = World::new(false);
    w.pin("s1", "10.0.0.2:80", true);
    drain(&mut w, &["10.0.0.2:80"]);
    let step = Stream::new(1).on_request_headers(&mut w.cx(), post(Some("s1")), false);
    assert_eq!(step.flow, Flow::Continue, "without control there is no move (and no drain list)");
}

#[test]
fn a_lookup_that_finds_a_draining_pin_moves_the_session_too() {
    let mut w = World::new(true);
    drain(&mut w, &["10.0.0.4:80"]);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: RECORD.into() });
    assert_eq!(step.flow, Flow::Stay, "still held: now moving");
    assert_eq!(json(calls(&step)[0].body.as_ref().unwrap())["reason"], "draining");
    let step = a.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: MOVED.into() });
    assert_eq!(step.flow, Flow::ResumeRequest);
    assert!(matches!(&step.ops[0], Op::Wake { waiters, resume: true, .. } if waiters == &vec![2]));
}

#[test]
fn a_mover_that_ends_early_sends_its_waiters_to_the_old_pin() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    drain(&mut w, &["10.0.0.2:80"]);
    let (mut a, mut b) = (Stream::new(1), Stream::new(2));
    a.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    b.on_request_headers(&mut w.cx(), post(Some("s1")), false);
    let step = a.on_done(&mut w.cx());
    assert_eq!(step.ops, vec![Op::Wake { waiters: vec![2], ops: vec![Op::SetRequestHeader(Header::Pin, "10.0.0.2:80".into())], resume: true }]);
}

#[test]
fn open_get_streams_on_an_upstream_that_starts_draining_are_ended() {
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    w.pin("s2", "10.0.0.3:80", true);
    let get = |id| HeaderPairs::from_pairs(&[(":method", "GET"), (":path", "/mcp"), ("accept", "text/event-stream"), ("mcp-session-id", id)]);
    let (mut a, mut b) = (Stream::new(7), Stream::new(8));
    assert_eq!(a.on_request_headers(&mut w.cx(), get("s1"), true).flow, Flow::Continue);
    assert_eq!(b.on_request_headers(&mut w.cx(), get("s2"), true).flow, Flow::Continue);
    assert_eq!(Stream::new(9).on_request_headers(&mut w.cx(), post(Some("s1")), false).flow, Flow::Continue);
    assert!(w.vm.streams_to_end().is_empty(), "nothing drains");
    drain(&mut w, &["10.0.0.2:80"]);
    assert_eq!(w.vm.streams_to_end(), [7], "only the GET on the draining upstream; POSTs in flight finish there");
    a.on_done(&mut w.cx());
    assert!(w.vm.streams_to_end().is_empty());
    // The client reopens the stream: it is moved first, then remembered on its new pin.
    let mut c = Stream::new(10);
    c.on_request_headers(&mut w.cx(), get("s1"), true);
    c.on_control_answer(&mut w.cx(), ControlAnswer { status: Some(200), body: MOVED.into() });
    assert_eq!(w.vm.open_streams.get(&10).map(String::as_str), Some("10.0.0.5:80"));
    assert!(w.vm.streams_to_end().is_empty());
}

mod any_sequence {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Event {
        Request { method: &'static str, session: Option<&'static str>, spoof: bool, end: bool },
        Body { chunk: Vec<u8>, end: bool },
        Response { status: u16, json: bool, session: Option<&'static str>, details: &'static str },
        ControlAnswer { status: Option<u16>, body: Vec<u8> },
        Done,
    }

    fn event() -> impl Strategy<Value = Event> {
        let session = prop::option::of(prop::sample::select(vec!["s1", "s2", "bad id"]));
        let body = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            Just(INIT.as_bytes().to_vec()),
            Just(RECORD.as_bytes().to_vec()),
            Just(REPLAYED.as_bytes().to_vec()),
            Just(br#"{"outcome":"alive"}"#.to_vec()),
            Just(MOVED.as_bytes().to_vec()),
            Just(STAYED.as_bytes().to_vec()),
        ];
        prop_oneof![
            (prop::sample::select(vec!["POST", "GET", "DELETE"]), session.clone(), any::<bool>(), any::<bool>())
                .prop_map(|(method, session, spoof, end)| Event::Request { method, session, spoof, end }),
            (body.clone(), any::<bool>()).prop_map(|(chunk, end)| Event::Body { chunk, end }),
            (prop::sample::select(vec![200u16, 202, 400, 404, 500, 503]), any::<bool>(), session, prop::sample::select(vec!["via_upstream", "upstream_reset_before_response_started{remote_connection_failure}", "upstream_reset_before_response_started{connection_termination}"]))
                .prop_map(|(status, json, session, details)| Event::Response { status, json, session, details }),
            (prop::option::of(prop::sample::select(vec![200u16, 201, 404, 500])), body).prop_map(|(status, body)| Event::ControlAnswer { status, body }),
            Just(Event::Done),
        ]
    }

    /// Splits `body` at `cuts` (positions, any order, repeats allowed) into chunks.
    fn chunks_of(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        at.sort_unstable();
        let mut out = Vec::new();
        let mut from = 0;
        for c in at.into_iter().chain([body.len()]) {
            out.push(body[from..c].to_vec());
            from = c;
        }
        out
    }

    proptest! {
        /// A replay carries exactly the bytes the client sent, or nothing: whatever the
        /// chunking of the body, wherever among the chunks the failed answer arrives (a
        /// router local reply can come before any body byte), whatever `content-length`
        /// says. And a body the filter saw whole within the limits is sent once, whole.
        #[test]
        fn a_replay_carries_the_whole_body_or_nothing(
            text in ".{0,120}",
            invalid_utf8 in prop::bool::weighted(0.1),
            cuts in prop::collection::vec(any::<usize>(), 0..5),
            response_at in 0usize..8,
            declared_off in prop::option::of(-2i64..3),
            failure in prop::sample::select(vec![0u8, 1, 2]),
            limit in prop::sample::select(vec![16usize, 1 << 20]),
        ) {
            let mut body = text.into_bytes();
            if invalid_utf8 { body.push(0xff); }
            let mut w = World::new(true);
            w.cfg.recovery.max_replay_body_bytes = limit;
            w.pin("s1", "10.0.0.2:80", true);
            let declared = declared_off.map(|off| (body.len() as i64 + off).max(0).to_string());
            let mut h = vec![(":method", "POST"), (":path", "/mcp"), ("mcp-session-id", "s1"), ("content-type", "application/json")];
            if let Some(d) = &declared { h.push(("content-length", d.as_str())); }
            let mut s = Stream::new(1);
            let chunks = chunks_of(&body, &cuts);
            let mut steps = vec![s.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&h), false)];
            let response = match failure {
                0 => Resp::local_reply("upstream_reset_before_response_started{remote_connection_failure}", 0x20),
                1 => Resp::new(404, &[]),
                _ => Resp::new(400, &[("content-type", "application/json")]),
            };
            let response_at = response_at.min(chunks.len());
            for (i, chunk) in chunks.iter().enumerate() {
                if i == response_at { steps.push(s.on_response_headers(&mut w.cx(), &response)); }
                steps.push(s.on_request_body(&mut w.cx(), &|| chunk.clone(), i + 1 == chunks.len()));
            }
            if response_at == chunks.len() { steps.push(s.on_response_headers(&mut w.cx(), &response)); }
            let sent: Vec<serde_json::Value> = steps.iter().flat_map(|st| calls(st).into_iter().map(|c| json(c.body.as_ref().unwrap())).collect::<Vec<_>>()).collect();
            prop_assert_eq!(sent.len(), 1, "one recover call: {:?}", sent);
            let req = &sent[0]["request"];
            let seen_whole = response_at == chunks.len();
            let replayable = seen_whole && body.len() <= limit && declared.as_deref().is_none_or(|d| d == body.len().to_string()) && !invalid_utf8;
            if req["body_complete"] == true {
                prop_assert_eq!(req["body"].as_str().unwrap().as_bytes(), body.as_slice(), "a replay carries exactly the client's bytes");
            } else {
                prop_assert_eq!(req["body"].as_str(), Some(""), "a body not held whole is never sent");
            }
            prop_assert_eq!(req["body_complete"] == true, replayable);
        }

        /// Whatever order events arrive in, on any of three streams of one VM, with or
        /// without control, replayed by the filter or by Envoy's retry: the machine never
        /// panics, and a client-sent pin header never becomes the route.
        #[test]
        fn no_sequence_panics(control in any::<bool>(), envoy_retry in any::<bool>(), events in prop::collection::vec((0usize..3, event()), 0..40)) {
            let mut w = World::new(control);
            if envoy_retry { w.cfg.recovery.replay_by = ReplayBy::EnvoyRetry; }
            w.pin("s2", "10.0.0.9:80", false);
            w.pin("s1", "10.0.0.2:80", true);
            drain(&mut w, &["10.0.0.2:80", "10.0.0.4:80"]);
            let mut streams = [Stream::new(1), Stream::new(2), Stream::new(3)];
            for (i, e) in events {
                let s = &mut streams[i];
                let step = match e {
                    Event::Request { method, session, spoof, end } => {
                        let mut h = vec![(":method", method), (":path", "/mcp")];
                        if let Some(id) = session { h.push(("mcp-session-id", id)); }
                        if spoof { h.push(("x-session-pod", "10.9.9.9:1")); }
                        s.on_request_headers(&mut w.cx(), HeaderPairs::from_pairs(&h), end)
                    }
                    Event::Body { chunk, end } => s.on_request_body(&mut w.cx(), &|| chunk.clone(), end),
                    Event::Response { status, json, session, details } => {
                        let mut h = vec![];
                        if json { h.push(("content-type", "application/json")); }
                        if let Some(id) = session { h.push(("mcp-session-id", id)); }
                        // Control's replay-listener answer, on a retried attempt or not.
                        if status == 200 { h.push(("x-mcp-affinity-pin", "10.0.0.7:80 b7 3")); }
                        let mut r = Resp::new(status, &h);
                        r.details = details;
                        r.attempt = if json { 2 } else { 1 };
                        s.on_response_headers(&mut w.cx(), &r)
                    }
                    Event::ControlAnswer { status, body } => s.on_control_answer(&mut w.cx(), ControlAnswer { status, body }),
                    Event::Done => s.on_done(&mut w.cx()),
                };
                // A client's pin header never becomes the route.
                for op in &step.ops {
                    if let Op::SetRequestHeader(Header::Pin, v) = op { prop_assert_ne!(v.as_str(), "10.9.9.9:1"); }
                }
            }
        }
    }
}

#[test]
fn the_filter_asks_for_exactly_the_answers_it_acts_on() {
    // Envoy's response matcher skips the filter for a 2xx answer unless the stream asked.
    let wants = |step: &Step| step.ops.contains(&Op::WantResponse);
    let mut w = World::new(true);
    w.pin("s1", "10.0.0.2:80", true);
    // A POST without session id: its answer may open a session.
    assert!(wants(&Stream::new(1).on_request_headers(&mut w.cx(), post(None), false)));
    assert!(wants(&Stream::new(2).on_request_headers(&mut w.cx(), post(None), true)));
    // A DELETE ends the session: pinned now, or after a lookup it waits for.
    let delete = |id| HeaderPairs::from_pairs(&[(":method", "DELETE"), (":path", "/mcp"), ("mcp-session-id", id)]);
    assert!(wants(&Stream::new(3).on_request_headers(&mut w.cx(), delete("s1"), true)));
    let step = Stream::new(4).on_request_headers(&mut w.cx(), delete("s9"), true);
    assert_eq!(step.flow, Flow::Pause, "a lookup");
    assert!(wants(&step));
    // The steady request and a GET stream of a known session: nothing to do on a 2xx.
    assert!(!wants(&Stream::new(5).on_request_headers(&mut w.cx(), post(Some("s1")), false)));
    let get = HeaderPairs::from_pairs(&[(":method", "GET"), (":path", "/mcp"), ("mcp-session-id", "s1")]);
    assert!(!wants(&Stream::new(6).on_request_headers(&mut w.cx(), get, true)));
    // A request sent under the backend's id (after a recovery): the answer's id is rewritten.
    let pin = Pin { upstream: "10.0.0.5:80".into(), generation: 2, last_seen: 1_000, backend_session_id: "b2".into(), recorded: true };
    store::put(&mut w.env.shared, w.cfg.layout(), "s2", &pin);
    assert!(wants(&Stream::new(7).on_request_headers(&mut w.cx(), post(Some("s2")), false)));
}

/// `touch_interval_secs`: a pinned request rewrites its pin's last-seen time (shared data,
/// and a touch queued for control) only once the interval has passed since the last one.
#[test]
fn a_pin_is_touched_once_per_touch_interval() {
    let mut w = World::new(true);
    w.cfg.touch_interval_secs = 60;
    w.pin("s1", "10.0.0.2:80", true);
    let request = |w: &mut World| {
        Stream::new(1).on_request_headers(&mut w.cx(), post(Some("s1")), false);
    };
    w.advance(59);
    request(&mut w);
    assert_eq!((w.stored("s1").unwrap().last_seen, w.vm.touches.len()), (1_000, 0), "inside the interval: nothing written");
    w.advance(1);
    request(&mut w);
    assert_eq!(w.stored("s1").unwrap().last_seen, 1_060, "touched in shared data");
    assert!(w.vm.touches.contains("s1"), "and queued for control");
    w.vm.touches.clear();
    w.advance(30);
    request(&mut w);
    assert_eq!((w.stored("s1").unwrap().last_seen, w.vm.touches.len()), (1_060, 0), "the interval starts again from the touch");
}

/// A full shared-data bucket evicts its least recently used pin to take a new session, and
/// the machine counts it (`pins_evicted`).
#[test]
fn a_new_session_in_a_full_bucket_evicts_the_least_recently_used_pin() {
    let mut w = World::new(false);
    (w.cfg.shared_data_buckets, w.cfg.shared_data_bucket_capacity) = (1, 2);
    let open = |w: &mut World, id: &'static str| {
        let mut s = Stream::new(1);
        s.on_request_headers(&mut w.cx(), post(None), false);
        s.on_response_headers(&mut w.cx(), &Resp::new(200, &[("mcp-session-id", id)]));
    };
    open(&mut w, "s1");
    w.advance(1);
    open(&mut w, "s2");
    assert_eq!(w.count("pins_evicted"), 0);
    w.advance(1);
    open(&mut w, "s3");
    assert_eq!(w.count("pins_evicted"), 1);
    assert!(w.stored("s1").is_none(), "the least recently used pin went");
    assert!(w.stored("s2").is_some() && w.stored("s3").is_some());
}

/// An `initialize` answer whose upstream host Envoy does not name (`upstream.address`
/// empty or absent, which a real upstream answer always has) pins nothing and is counted.
#[test]
fn an_answer_without_upstream_address_pins_nothing() {
    let mut w = World::new(false);
    let mut s = Stream::new(1);
    s.on_request_headers(&mut w.cx(), post(None), false);
    let mut r = Resp::new(200, &[("mcp-session-id", "s1")]);
    r.upstream = "";
    assert_eq!(s.on_response_headers(&mut w.cx(), &r).flow, Flow::Continue, "the answer goes on");
    assert_eq!((w.count("no_upstream_address"), w.count("sessions_pinned")), (1, 0));
    assert!(w.stored("s1").is_none());
}

#[test]
fn a_body_copy_keeps_the_host_s_buffer_of_its_first_chunk() {
    // The host allocates each chunk in the VM (`proxy_on_memory_allocate`); the copy takes
    // the first one as it is instead of allocating and copying it again.
    let mut copy = BodyCopy::new(64, false);
    let chunk = b"{\"jsonrpc\":\"2.0\"".to_vec();
    let first = chunk.as_ptr();
    assert!(copy.push(chunk, false));
    let BodyCopy::On { bytes, whole: false, .. } = &copy else { panic!("{copy:?}") };
    assert_eq!(bytes.as_ptr(), first, "no second allocation for a one-chunk body");
    assert!(copy.wants(), "still streaming");
    assert!(copy.push(b",\"id\":1}".to_vec(), true), "later chunks are appended");
    let BodyCopy::On { bytes, whole: true, .. } = &copy else { panic!("{copy:?}") };
    assert_eq!(bytes.as_slice(), b"{\"jsonrpc\":\"2.0\",\"id\":1}");
    assert!(!copy.wants(), "whole: nothing more to copy");
    let mut copy = BodyCopy::new(8, false);
    assert!(!copy.push(vec![b'y'; 9], true), "over the limit");
    assert_eq!(copy, BodyCopy::Over);
}

#[test]
fn a_body_copy_is_whole_only_at_the_end_of_the_stream_and_at_its_declared_length() {
    let head = |len: Option<&'static str>| {
        let mut h = vec![(":method", "POST")];
        h.extend(len.map(|l| ("content-length", l)));
        HeaderPairs::from_pairs(&h)
    };
    let mut copy = BodyCopy::new(64, false);
    copy.push(b"{}".to_vec(), false);
    assert_eq!(copy.whole(&head(None)), None, "the end of the stream was not seen");
    copy.push(Vec::new(), true);
    assert_eq!(copy.whole(&head(None)), Some(&b"{}"[..]), "chunked and HTTP/2 bodies declare no length");
    assert_eq!(copy.whole(&head(Some("2"))), Some(&b"{}"[..]));
    assert_eq!(copy.whole(&head(Some("3"))), None, "shorter than declared: never replayed");
    assert_eq!(BodyCopy::new(64, true).whole(&head(None)), Some(&b""[..]), "headers that end the stream: an empty body, whole");
    assert_eq!(BodyCopy::Over.whole(&head(None)), None);
    assert_eq!(BodyCopy::Off.whole(&head(None)), None);
}

mod tasks;
