//! The root machine against a recording host: which calls a tick makes and when, what
//! control's answers do to the queue, the draining list and the counters.

use std::cell::RefCell;

use hashbrown::HashMap;

use super::*;
use crate::config::{ControlConfig, FilterConfig};
use crate::drain;
use crate::machine::vm::Vm;
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::record_queue::{MAX_ATTEMPTS, NewRecord};
use crate::store::memory::MemorySharedData;

/// A host that records what the root asked of it.
#[derive(Default)]
struct Host {
    shared: MemorySharedData,
    now_ms: u64,
    counts: HashMap<&'static str, u64>,
    periods: Vec<u64>,
    housekeeping: u32,
    /// Calls made, in order: (method, path or session id, body).
    calls: Vec<(String, String, Vec<u8>)>,
    /// The host refuses calls (a missing cluster).
    refuse: bool,
    next_token: u32,
    /// Streams that exist (and so can be ended), and those ended.
    streams: Vec<u32>,
    ended: Vec<u32>,
}

impl Host {
    fn token(&mut self, method: &str, what: &str, body: &[u8]) -> Option<u32> {
        if self.refuse {
            return None;
        }
        self.calls.push((method.into(), what.into(), body.to_vec()));
        self.next_token += 1;
        Some(self.next_token)
    }
    fn count(&self, c: Counter) -> u64 {
        self.counts.get(c.name()).copied().unwrap_or(0)
    }
    fn methods(&self) -> Vec<&str> {
        self.calls.iter().map(|(m, w, _)| if m == "PATCH" { "PATCH" } else { w.as_str() }).collect()
    }
}

impl RootHost for Host {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn count(&mut self, counter: Counter, n: u64) {
        *self.counts.entry(counter.name()).or_default() += n;
    }
    fn set_tick_period(&mut self, ms: u64) {
        self.periods.push(ms);
    }
    fn housekeeping(&mut self) {
        self.housekeeping += 1;
    }
    fn call(&mut self, call: &Call) -> Option<u32> {
        self.token(call.method, &call.id, call.body.as_deref().unwrap_or_default())
    }
    fn write_records(&mut self, body: &[u8]) -> Option<u32> {
        self.token("POST", "records", body)
    }
    fn fetch_draining(&mut self) -> Option<u32> {
        self.token("GET", "draining", b"")
    }
    fn end_stream(&mut self, context_id: u32) -> bool {
        let exists = self.streams.contains(&context_id);
        if exists {
            self.ended.push(context_id);
        }
        exists
    }
}

struct World {
    cfg: FilterConfig,
    vm: RefCell<Vm>,
    host: Host,
    root: Root,
}

impl World {
    /// A plugin, with control (the draining list not polled) or without.
    fn new(control: bool) -> World {
        World::with(control.then(|| ControlConfig { drain_poll_ms: 0, ..ControlConfig::default() }))
    }

    /// A plugin with control that polls the draining list every 5 s.
    fn polling() -> World {
        World::with(Some(ControlConfig { drain_poll_ms: 5_000, ..ControlConfig::default() }))
    }

    fn with(control: Option<ControlConfig>) -> World {
        let cfg = FilterConfig { control, ..FilterConfig::default() };
        let mut w = World { cfg, vm: RefCell::default(), host: Host { now_ms: 1_700_000_000_000, ..Host::default() }, root: Root::default() };
        w.run(|root, cx| root.on_configure(cx));
        w
    }

    fn run<T>(&mut self, f: impl FnOnce(&mut Root, &mut RootCtx) -> T) -> T {
        let mut cx = RootCtx { cfg: &self.cfg, vm: &self.vm, host: &mut self.host };
        f(&mut self.root, &mut cx)
    }

    fn tick(&mut self) {
        self.run(|root, cx| root.on_tick(cx));
    }

    /// Moves the clock on by `ms` and ticks.
    fn tick_after(&mut self, ms: u64) {
        self.host.now_ms += ms;
        self.tick();
    }

    fn answer(&mut self, token: u32, status: Option<u16>, body: &str) {
        let body = body.as_bytes().to_vec();
        self.run(|root, cx| root.on_answer(cx, token, status, &|| body.clone()));
    }

    fn queue(&mut self, id: &str) {
        let record = NewRecord::new(id, id, "10.0.0.1:80", 1, "{}".into());
        assert!(self.vm.borrow_mut().records.push(record));
    }

    /// A stream event may have queued a record: the period the proxy then sets.
    fn after_stream_event(&mut self) -> Option<u64> {
        tick_change(&self.cfg, &mut self.vm.borrow_mut())
    }

    /// The token of the last call made.
    fn last_token(&self) -> u32 {
        self.host.next_token
    }
}

#[test]
fn the_tick_is_fast_only_while_records_wait() {
    let mut w = World::new(true);
    let (slow, fast) = (w.cfg.sweep_period_ms, w.cfg.control.as_ref().unwrap().record_flush_ms);
    assert_eq!(w.host.periods, [slow], "configured: the slow tick");
    assert_eq!(w.after_stream_event(), None, "nothing queued, nothing changes");
    w.queue("s1");
    assert_eq!(w.after_stream_event(), Some(fast));
    assert_eq!(w.after_stream_event(), None, "set once");
    w.tick();
    assert_eq!(w.host.methods(), ["records"]);
    assert_eq!(w.host.periods, [slow, slow], "sent: back to the slow tick");
}

#[test]
fn without_control_nothing_is_sent_and_the_tick_stays_slow() {
    let mut w = World::new(false);
    w.queue("s1");
    assert_eq!(w.after_stream_event(), None);
    w.tick();
    w.vm.borrow_mut().touches.insert("s1".into());
    w.tick_after(1_000);
    assert!(w.host.calls.is_empty());
    assert_eq!(w.host.housekeeping, 2);
}

#[test]
fn periodic_work_runs_once_per_sweep_period_however_often_the_tick_comes() {
    let mut w = World::new(true);
    w.tick();
    assert_eq!(w.host.housekeeping, 1);
    w.tick_after(10);
    w.tick_after(10);
    assert_eq!(w.host.housekeeping, 1, "fast ticks between: records only");
    w.tick_after(w.cfg.sweep_period_ms);
    assert_eq!(w.host.housekeeping, 2);
    assert_eq!(w.vm.borrow().clock_secs, w.host.now_ms / 1000, "the VM's clock follows");
}

#[test]
fn a_batch_without_an_answer_is_sent_again_on_the_next_periodic_tick_only() {
    let mut w = World::new(true);
    w.queue("s1");
    w.tick();
    let token = w.last_token();
    w.answer(token, None, "");
    assert_eq!((w.host.count(Counter::ControlErrors), w.host.count(Counter::ControlWriteRetries)), (1, 1));
    w.tick_after(10);
    assert_eq!(w.host.calls.len(), 1, "held until the periodic tick");
    w.tick_after(w.cfg.sweep_period_ms);
    assert_eq!(w.host.methods(), ["records", "records"]);
    let body: serde_json::Value = serde_json::from_slice(&w.host.calls[1].2).unwrap();
    assert_eq!(body["records"]["s1"]["upstream"], "10.0.0.1:80");
}

#[test]
fn a_record_is_dropped_after_its_last_attempt_and_a_4xx_batch_is_never_sent_again() {
    let mut w = World::new(true);
    w.queue("s1");
    for _ in 0..MAX_ATTEMPTS {
        w.tick_after(w.cfg.sweep_period_ms);
        let token = w.last_token();
        w.answer(token, Some(503), "");
    }
    assert!(w.vm.borrow().records.is_empty());
    assert_eq!(w.host.calls.len(), usize::from(MAX_ATTEMPTS));
    assert_eq!(w.host.count(Counter::ControlErrors), u64::from(MAX_ATTEMPTS) + 1, "each failure and the drop");
    w.queue("s2");
    w.tick_after(w.cfg.sweep_period_ms);
    let token = w.last_token();
    w.answer(token, Some(400), "");
    w.tick_after(w.cfg.sweep_period_ms);
    assert_eq!(w.host.calls.len(), usize::from(MAX_ATTEMPTS) + 1, "a refused batch is not retried");
}

#[test]
fn control_s_batch_answer_is_counted() {
    let mut w = World::new(true);
    for id in ["a", "b", "c"] {
        w.queue(id);
    }
    w.tick();
    let token = w.last_token();
    w.answer(token, Some(200), r#"{"written":1,"kept":1,"rejected":{"c":{"code":"invalid_body","message":"m"}}}"#);
    assert_eq!((w.host.count(Counter::ControlWrites), w.host.count(Counter::ControlErrors)), (2, 1));
}

#[test]
fn a_refused_call_puts_the_batch_back_and_limits_calls_in_flight() {
    let mut w = World::new(true);
    w.host.refuse = true;
    w.queue("s1");
    w.tick();
    assert_eq!(w.vm.borrow().records.len(), 1, "back in the queue");
    w.host.refuse = false;
    // Many batches: at most RECORD_CALLS_IN_FLIGHT calls until answers come.
    for i in 0..(crate::record_queue::MAX_BATCH_RECORDS * (RECORD_CALLS_IN_FLIGHT + 2)) {
        w.queue(&format!("s{i}"));
    }
    w.tick_after(w.cfg.sweep_period_ms);
    assert_eq!(w.host.calls.len(), RECORD_CALLS_IN_FLIGHT);
    let token = w.last_token();
    w.answer(token, Some(200), r#"{"written":256,"kept":0,"rejected":{}}"#);
    w.tick_after(10);
    assert_eq!(w.host.calls.len(), RECORD_CALLS_IN_FLIGHT + 1, "one answer frees one slot");
}

#[test]
fn touches_are_sent_on_the_periodic_tick_in_bounded_batches() {
    let mut w = World::new(true);
    w.tick();
    for i in 0..TOUCHES_PER_TICK + 3 {
        w.vm.borrow_mut().touches.insert(format!("s{i}"));
    }
    w.tick_after(10);
    assert!(w.host.calls.is_empty(), "not periodic yet");
    w.tick_after(w.cfg.sweep_period_ms);
    let patches = w.host.calls.iter().filter(|(m, _, body)| m == "PATCH" && body == b"{}").count();
    assert_eq!((patches, w.vm.borrow().touches.len()), (TOUCHES_PER_TICK, 3));
    // An unanswered touch or a 5xx is an error; a 404 (control forgot the session) is not.
    let token = w.last_token();
    w.answer(token, Some(404), "");
    w.answer(token - 1, None, "");
    w.answer(token - 2, Some(204), "");
    assert_eq!(w.host.count(Counter::ControlErrors), 1);
}

#[test]
fn one_vm_polls_the_draining_list_and_every_vm_ends_its_get_streams_on_a_draining_upstream() {
    let mut a = World::polling();
    a.tick();
    assert_eq!(a.host.methods(), ["draining"], "due at once");
    {
        let mut vm = a.vm.borrow_mut();
        vm.open_streams.insert(7, "10.0.0.2:80".into());
        vm.open_streams.insert(8, "10.0.0.3:80".into());
        vm.open_streams.insert(9, "10.0.0.2:80".into());
    }
    a.host.streams = vec![7, 8];
    let token = a.last_token();
    a.answer(token, Some(200), r#"{"draining":[{"upstream":"10.0.0.2:80","since_ms":1,"source":"admin","moved":0,"failed":0,"last_move_ms":null}]}"#);
    assert_eq!(a.host.ended, [7], "stream 9 is gone already");
    assert_eq!(a.vm.borrow().open_streams.keys().copied().collect::<Vec<_>>(), [8]);
    assert_eq!((a.host.count(Counter::StreamsEndedByDrain), a.host.count(Counter::DrainListUpdates)), (1, 1));
    // Another VM of the same Envoy sees the claim, does not poll, and adopts the list.
    let mut b = World::polling();
    b.host.shared = std::mem::take(&mut a.host.shared);
    b.host.now_ms = a.host.now_ms + 10;
    b.vm.borrow_mut().open_streams.insert(3, "10.0.0.2:80".into());
    b.host.streams = vec![3];
    b.tick();
    assert!(b.host.calls.is_empty());
    assert_eq!(b.host.ended, [3]);
    assert!(b.vm.borrow().draining.contains("10.0.0.2:80"));
}

/// A listen stream sent before this VM adopted its upstream's drain and answered after it
/// (seen on Envoy with two workers: the re-listen of a stream one VM ended went through the
/// other VM, which had not adopted the drain yet) is ended on the next tick; without a late
/// stream, an unchanged list ends nothing.
#[test]
fn a_stream_answered_after_the_drain_was_adopted_is_ended_on_the_next_tick() {
    let mut w = World::polling();
    drain::store_answer(&mut w.host.shared, 1, &drain::Upstreams { draining: vec!["10.0.0.2:80".into()], serving: Vec::new() });
    w.tick();
    w.host.streams = vec![4, 5];
    w.vm.borrow_mut().open_streams.insert(5, "10.0.0.2:80".into());
    w.tick_after(1000);
    assert!(w.host.ended.is_empty(), "the list did not change and no stream came late");
    {
        let mut vm = w.vm.borrow_mut();
        vm.open_streams.insert(4, "10.0.0.2:80".into());
        vm.late_streams = true;
    }
    w.tick_after(1000);
    assert_eq!(w.host.ended, [4, 5]);
    assert_eq!((w.host.count(Counter::StreamsEndedByDrain), w.host.count(Counter::DrainListUpdates)), (2, 1));
    assert!(!w.vm.borrow().late_streams);
}

#[test]
fn a_failed_poll_keeps_the_last_list_and_is_counted() {
    let mut w = World::polling();
    drain::store_answer(&mut w.host.shared, 1, &drain::Upstreams { draining: vec!["10.0.0.2:80".into()], serving: Vec::new() });
    w.tick();
    let token = w.last_token();
    w.answer(token, Some(503), "");
    w.answer(token, Some(200), "{}");
    assert_eq!(w.host.count(Counter::DrainPollErrors), 1, "the second answer is not the fetch's any more: a touch answer");
    assert!(w.vm.borrow().draining.contains("10.0.0.2:80"));
    w.tick_after(w.cfg.control.as_ref().unwrap().drain_poll_ms);
    let token = w.last_token();
    w.answer(token, Some(200), "not json");
    assert_eq!(w.host.count(Counter::DrainPollErrors), 2);
    assert!(w.vm.borrow().draining.contains("10.0.0.2:80"));
}

#[test]
fn the_sweep_expires_idle_pins_and_counts_them() {
    let mut w = World::new(true);
    let pin = Pin { upstream: "10.0.0.1:80".into(), generation: 1, last_seen: 1, backend_session_id: "s1".into(), recorded: true };
    crate::store::put(&mut w.host.shared, w.cfg.layout(), "s1", &pin);
    for _ in 0..w.cfg.layout().buckets / SWEEP_PER_TICK + 1 {
        w.tick_after(w.cfg.sweep_period_ms);
    }
    assert_eq!(w.host.count(Counter::SessionsExpired), 1);
    assert!(crate::store::get(&w.host.shared, w.cfg.layout(), "s1").is_none());
}

#[test]
fn a_write_answer_of_an_ended_stream_is_counted() {
    let mut host = Host::default();
    Root::on_write_answer(&mut host, Some(204));
    Root::on_write_answer(&mut host, Some(500));
    Root::on_write_answer(&mut host, None);
    assert_eq!((host.count(Counter::ControlWrites), host.count(Counter::ControlErrors)), (1, 2));
}

#[test]
fn task_pins_are_written_through_on_the_tick_in_bounded_batches() {
    let mut w = World::new(true);
    let put = mcp_affinity_proto::tasks::PutTask { upstream: "10.0.0.1:80".into(), ttl_ms: Some(1000), terminal: false };
    for i in 0..TASK_WRITES_PER_TICK + 2 {
        w.vm.borrow_mut().task_writes.push((format!("t{i}"), put.clone()));
    }
    assert_eq!(w.after_stream_event(), Some(w.cfg.control.as_ref().unwrap().record_flush_ms), "written soon: the fast tick");
    w.tick();
    assert_eq!(w.host.calls.len(), TASK_WRITES_PER_TICK);
    let (method, id, body) = &w.host.calls[0];
    assert_eq!((method.as_str(), id.as_str(), body.as_slice()), ("PUT", "t0", &br#"{"upstream":"10.0.0.1:80","ttl_ms":1000}"#[..]));
    w.tick_after(10);
    assert_eq!(w.host.calls.len(), TASK_WRITES_PER_TICK + 2);
    assert!(w.vm.borrow().task_writes.is_empty());
    // Without control nothing is written (and nothing queues: the stream machine checks).
    let mut w = World::new(false);
    w.vm.borrow_mut().task_writes.push(("t".into(), put));
    w.tick();
    assert!(w.host.calls.is_empty());
}

#[test]
fn a_task_pin_control_did_not_take_is_sent_again_on_the_periodic_tick_until_its_last_attempt() {
    let mut w = World::new(true);
    let put = mcp_affinity_proto::tasks::PutTask { upstream: "10.0.0.1:80".into(), ttl_ms: None, terminal: false };
    w.vm.borrow_mut().task_writes.push(("t1".into(), put.clone()));
    w.vm.borrow_mut().task_writes.push(("t2".into(), put));
    w.tick();
    let (t1, t2) = (w.last_token() - 1, w.last_token());
    w.answer(t1, None, "");
    w.answer(t2, Some(400), "");
    assert_eq!((w.host.count(Counter::ControlWriteRetries), w.host.count(Counter::ControlErrors)), (1, 1), "t1 kept, t2 refused for good");
    w.tick_after(10);
    assert_eq!(w.host.calls.len(), 2, "held until the periodic tick");
    for attempt in 2..=MAX_ATTEMPTS {
        w.tick_after(w.cfg.sweep_period_ms);
        assert_eq!(w.host.calls.last().map(|c| c.1.as_str()), Some("t1"), "attempt {attempt}");
        let token = w.last_token();
        w.answer(token, Some(503), "");
    }
    assert_eq!(w.host.calls.len(), 1 + usize::from(MAX_ATTEMPTS));
    assert_eq!(w.host.count(Counter::ControlErrors), 2, "dropped after its last attempt");
    w.tick_after(w.cfg.sweep_period_ms);
    assert_eq!(w.host.calls.len(), 1 + usize::from(MAX_ATTEMPTS), "not sent again");
    // A written pin is counted.
    w.vm.borrow_mut().task_writes.push(("t3".into(), mcp_affinity_proto::tasks::PutTask { upstream: "10.0.0.1:80".into(), ttl_ms: None, terminal: false }));
    w.tick_after(10);
    let token = w.last_token();
    w.answer(token, Some(200), "{}");
    assert_eq!(w.host.count(Counter::ControlWrites), 1);
}
