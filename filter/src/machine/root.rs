//! The root context's decisions, host-independent: when the root context ticks, what the
//! tick does (send the queued records of new sessions, sweep idle pins, send touches,
//! adopt and poll the draining list, end GET streams on draining upstream hosts), and what
//! control's answers to the root's own calls mean. The proxy-wasm root context
//! (`proxy/root.rs`) only translates: Envoy's callbacks in, [`RootHost`] calls out.
//!
//! Tick cadence: every `sweep_period_ms` (default 1 s), or every
//! `control.record_flush_ms` while new sessions' records wait to be sent
//! ([`tick_change`]); the periodic work runs once per `sweep_period_ms` whatever the
//! cadence. Envoy `Context::setTickPeriod` (`proxy_set_tick_period_milliseconds`) applies
//! to the root context.

use std::cell::RefCell;

use hashbrown::HashMap;
use mcp_affinity_proto::sessions::PatchSession;
use mcp_affinity_proto::tasks::PutTask;

use super::ops::{Call, Resource, json};
use super::vm::{MAX_TASK_WRITES, Vm};
use crate::config::FilterConfig;
use crate::drain;
use crate::metrics::Counter;
use crate::record_queue::{self, NewRecord};
use crate::store::{self, SharedData};

/// Most touches sent to control per tick; the rest wait for the next tick.
pub const TOUCHES_PER_TICK: usize = 256;

/// Most shared-data buckets the sweep looks at per tick (each one shared-data read).
pub const SWEEP_PER_TICK: u32 = 64;

/// Most task pins written to control per tick; the rest wait for the next tick.
pub const TASK_WRITES_PER_TICK: usize = 64;

/// Most record batches in flight to control per VM; more wait for the next tick.
pub const RECORD_CALLS_IN_FLIGHT: usize = 8;

/// What the root context asks of its host (the proxy-wasm ABI in Envoy, a recording
/// mock in tests). A call to control returns its token, `None` when the host refused it
/// (ABI BAD_ARGUMENT / INTERNAL_FAILURE, logged by the host); its answer comes back
/// through [`Root::on_answer`] with that token.
pub trait RootHost {
    /// Envoy shared data (process-wide, all worker VMs).
    fn shared(&mut self) -> &mut dyn SharedData;
    /// Wall clock, Unix milliseconds (`proxy_get_current_time_nanoseconds`).
    fn now_ms(&self) -> u64;
    /// Adds `n` to a counter.
    fn count(&mut self, counter: Counter, n: u64);
    /// `proxy_set_tick_period_milliseconds`.
    fn set_tick_period(&mut self, ms: u64);
    /// The host's own periodic work, once per `sweep_period_ms`: sending the per-request
    /// counters gathered in the VM, following the host's log level.
    fn housekeeping(&mut self);
    /// A call about one session or task: touches, task pins.
    fn call(&mut self, call: &Call) -> Option<u32>;
    /// `POST {prefix}/sessions` with a batch of records.
    fn write_records(&mut self, body: &[u8]) -> Option<u32>;
    /// `GET {prefix}/upstreams/draining`.
    fn fetch_draining(&mut self) -> Option<u32>;
    /// Ends the response of stream `context_id` (`proxy_close_stream`); false when the
    /// stream is gone. The VM state is not borrowed while this runs.
    fn end_stream(&mut self, context_id: u32) -> bool;
}

/// What one root event sees: the plugin configuration, the VM's state (borrowed only
/// between host calls that may re-enter the VM) and the host.
pub struct RootCtx<'a> {
    pub cfg: &'a FilterConfig,
    pub vm: &'a RefCell<Vm>,
    pub host: &'a mut dyn RootHost,
}

/// The tick period to switch to, if it must change: `control.record_flush_ms` while
/// records wait and may be sent, `sweep_period_ms` otherwise, so an idle VM is not woken
/// 100 times a second. Called after any event that may have queued a record and on every
/// tick; remembers the period in `vm.fast_tick`.
pub fn tick_change(cfg: &FilterConfig, vm: &mut Vm) -> Option<u64> {
    let fast = cfg.control.as_ref().filter(|_| vm.records.ready() || !vm.task_writes.is_empty()).map(|c| c.record_flush_ms);
    if fast.is_some() == vm.fast_tick {
        return None;
    }
    vm.fast_tick = fast.is_some();
    Some(fast.unwrap_or(cfg.sweep_period_ms))
}

/// The root context's own state (one per plugin configuration in a VM).
#[derive(Debug, Default)]
pub struct Root {
    /// Token of this VM's draining-list fetch in flight and the time of the poll it
    /// answers (Unix ms).
    drain_fetch: Option<(u32, u64)>,
    /// The last fetch failed (the next failure is not logged again).
    drain_failing: bool,
    /// Record batches in flight: token → their records (queued again if control did not
    /// take them).
    record_calls: HashMap<u32, Vec<NewRecord>>,
    /// When the tick's periodic work is next due, Unix milliseconds; the tick itself may
    /// come more often, to send records.
    housekeeping_due_ms: u64,
    /// Task pin writes in flight: token → the write and its sends so far.
    task_calls: HashMap<u32, TaskWrite>,
    /// Task pin writes control did not take, sent again on the next periodic tick.
    task_retries: Vec<TaskWrite>,
}

/// A task pin to write to control (`PUT {prefix}/tasks/{id}`) and how often it was sent.
#[derive(Debug)]
struct TaskWrite {
    task_id: String,
    put: PutTask,
    attempts: u8,
}

impl Root {
    /// A (new or changed) plugin configuration took effect: tick every
    /// `sweep_period_ms`, set the VM's clock, and tick faster at once if records wait
    /// (a reconfiguration keeps the VM's state).
    pub fn on_configure(&mut self, cx: &mut RootCtx) {
        cx.host.set_tick_period(cx.cfg.sweep_period_ms);
        let mut vm = cx.vm.borrow_mut();
        vm.fast_tick = false;
        vm.clock_secs = cx.host.now_ms() / 1000;
        if let Some(ms) = tick_change(cx.cfg, &mut vm) {
            cx.host.set_tick_period(ms);
        }
    }

    /// `proxy_on_tick`: sends the queued records; every `sweep_period_ms` also the
    /// periodic work (see the module docs).
    pub fn on_tick(&mut self, cx: &mut RootCtx) {
        let now_ms = cx.host.now_ms();
        let periodic = now_ms >= self.housekeeping_due_ms;
        if periodic {
            // Records of a failed batch are sent again on the periodic tick only.
            cx.vm.borrow_mut().records.release();
        }
        self.send_records(cx);
        self.send_task_writes(cx, periodic);
        if let Some(ms) = tick_change(cx.cfg, &mut cx.vm.borrow_mut()) {
            cx.host.set_tick_period(ms);
        }
        if !periodic {
            return;
        }
        self.housekeeping_due_ms = now_ms.saturating_add(cx.cfg.sweep_period_ms);
        cx.host.housekeeping();
        let now = now_ms / 1000;
        cx.vm.borrow_mut().clock_secs = now;
        if let Some(c) = &cx.cfg.control
            && c.drain_poll_ms > 0
        {
            adopt_draining(cx);
            if self.drain_fetch.is_none() && drain::claim_poll(cx.host.shared(), now_ms, c.drain_poll_ms) {
                match cx.host.fetch_draining() {
                    Some(token) => self.drain_fetch = Some((token, now_ms)),
                    None => cx.host.count(Counter::DrainPollErrors, 1),
                }
            }
        }
        let expired = {
            let mut vm = cx.vm.borrow_mut();
            store::sweep(cx.host.shared(), cx.cfg.layout(), &mut vm.sweep_cursor, now, cx.cfg.session_ttl_secs, SWEEP_PER_TICK)
        };
        if expired > 0 {
            cx.host.count(Counter::SessionsExpired, expired);
            log::debug!("mcp-affinity: swept {expired} idle pins");
        }
        if cx.cfg.control.is_some() {
            send_touches(cx);
        }
    }

    /// Control answered a call this root made (`proxy_on_http_call_response`): a record
    /// batch, the draining list, or a touch. `status` is `None` when the call failed
    /// without an answer; `body` reads the answer's body (only when needed).
    pub fn on_answer(&mut self, cx: &mut RootCtx, token: u32, status: Option<u16>, body: &dyn Fn() -> Vec<u8>) {
        if let Some(records) = self.record_calls.remove(&token) {
            on_records_answer(cx, records, status, body);
            return;
        }
        if let Some(write) = self.task_calls.remove(&token) {
            match status {
                Some(s) if (200..300).contains(&s) => cx.host.count(Counter::ControlWrites, 1),
                Some(s) if s < 500 => {
                    log::warn!("mcp-affinity: control refused the pin of task {} (status {s}); not sent again", write.task_id);
                    cx.host.count(Counter::ControlErrors, 1);
                }
                _ => self.retry_task_write(cx, write),
            }
            return;
        }
        if let Some((fetch, claimed_at_ms)) = self.drain_fetch
            && fetch == token
        {
            self.drain_fetch = None;
            self.on_draining_answer(cx, claimed_at_ms, status, body);
            return;
        }
        // Touches are best effort: an unanswered one is repeated at the next interval.
        if status.is_none_or(|s| !(200..300).contains(&s) && s != 404) {
            cx.host.count(Counter::ControlErrors, 1);
        }
    }

    /// The answer to a write made by a stream that has ended (an update or a `DELETE`
    /// whose stream the upstream answered first): counted, nothing else.
    pub fn on_write_answer(host: &mut dyn RootHost, status: Option<u16>) {
        if status.is_some_and(|s| (200..300).contains(&s)) {
            host.count(Counter::ControlWrites, 1);
        } else {
            log::warn!("mcp-affinity: a write to control failed (status {status:?})");
            host.count(Counter::ControlErrors, 1);
        }
    }

    /// The draining-list fetch of the poll claimed at `claimed_at_ms` answered: share the
    /// list with every VM (unless a later poll's answer is there already). On failure the
    /// last list stays in force; the next poll is one interval away.
    fn on_draining_answer(&mut self, cx: &mut RootCtx, claimed_at_ms: u64, status: Option<u16>, body: &dyn Fn() -> Vec<u8>) {
        let list = match status {
            Some(200) => drain::parse_answer(&body()),
            other => Err(format!("status {other:?}")),
        };
        match list {
            Ok(list) => {
                self.drain_failing = false;
                drain::store_answer(cx.host.shared(), claimed_at_ms, &list);
                adopt_draining(cx);
            }
            Err(e) => {
                if !std::mem::replace(&mut self.drain_failing, true) {
                    log::warn!("mcp-affinity: fetching the draining upstreams failed: {e}; retrying every interval");
                }
                cx.host.count(Counter::DrainPollErrors, 1);
            }
        }
    }

    /// Writes up to [`TASK_WRITES_PER_TICK`] task pins (`PUT {prefix}/tasks/{id}`): on a
    /// periodic tick first those control did not take before, then the ones the streams
    /// queued, on every tick. A write without an answer, or answered 5xx, is sent again on
    /// the next periodic tick, at most [`record_queue::MAX_ATTEMPTS`] times, then dropped
    /// and counted (`control_errors`); the task keeps working through this Envoy.
    fn send_task_writes(&mut self, cx: &mut RootCtx, periodic: bool) {
        if cx.cfg.control.is_none() {
            return;
        }
        let mut writes = if periodic { std::mem::take(&mut self.task_retries) } else { Vec::new() };
        {
            let mut vm = cx.vm.borrow_mut();
            let n = vm.task_writes.len().min(TASK_WRITES_PER_TICK.saturating_sub(writes.len()));
            writes.extend(vm.task_writes.drain(..n).map(|(task_id, put)| TaskWrite { task_id, put, attempts: 0 }));
        }
        for mut write in writes {
            write.attempts += 1;
            let call = Call { method: "PUT", resource: Resource::Task, id: write.task_id.clone(), suffix: "", body: Some(json(&write.put)), timeout_ms: None, wait_ms: None };
            match cx.host.call(&call) {
                Some(token) => {
                    self.task_calls.insert(token, write);
                }
                None => self.retry_task_write(cx, write),
            }
        }
    }

    /// Keeps a task pin write for the next periodic tick, or drops it after its last attempt.
    fn retry_task_write(&mut self, cx: &mut RootCtx, write: TaskWrite) {
        if write.attempts >= record_queue::MAX_ATTEMPTS || self.task_retries.len() >= MAX_TASK_WRITES {
            log::warn!("mcp-affinity: the pin of task {} not written to control after {} attempts", write.task_id, write.attempts);
            cx.host.count(Counter::ControlErrors, 1);
        } else {
            cx.host.count(Counter::ControlWriteRetries, 1);
            self.task_retries.push(write);
        }
    }

    /// Sends the VM's queued records, one call per batch, up to
    /// [`RECORD_CALLS_IN_FLIGHT`] calls at once. A call the host refuses puts its batch
    /// back for the next periodic tick.
    fn send_records(&mut self, cx: &mut RootCtx) {
        if cx.cfg.control.is_none() {
            return;
        }
        while self.record_calls.len() < RECORD_CALLS_IN_FLIGHT {
            let Some(batch) = cx.vm.borrow_mut().records.take_batch() else { return };
            match cx.host.write_records(&batch.body) {
                Some(token) => {
                    self.record_calls.insert(token, batch.records);
                }
                None => {
                    cx.host.count(Counter::ControlErrors, 1);
                    requeue(cx, batch.records);
                    return;
                }
            }
        }
    }
}

/// Adopts the shared draining list; when it changed, ends the VM's open GET streams
/// whose upstream now drains (their clients reopen them and are moved).
fn adopt_draining(cx: &mut RootCtx) {
    let ends = {
        let mut vm = cx.vm.borrow_mut();
        let changed = vm.draining.refresh(cx.host.shared());
        // Taken either way: a change ends the late streams too.
        let late = std::mem::take(&mut vm.late_streams);
        if !changed && !late {
            return;
        }
        if changed {
            cx.host.count(Counter::DrainListUpdates, 1);
        }
        vm.streams_to_end()
    };
    for id in ends {
        if cx.host.end_stream(id) {
            log::info!("mcp-affinity: ended stream {id}: its upstream is draining");
            cx.host.count(Counter::StreamsEndedByDrain, 1);
        }
        cx.vm.borrow_mut().open_streams.remove(&id);
    }
}

/// Sends up to [`TOUCHES_PER_TICK`] of the touches the streams queued (`PATCH` with `{}`:
/// control refreshes the record's last-seen). A refused call is counted and not retried:
/// the next request of the session queues the touch again.
fn send_touches(cx: &mut RootCtx) {
    let batch: Vec<String> = {
        let mut vm = cx.vm.borrow_mut();
        let batch: Vec<String> = vm.touches.iter().take(TOUCHES_PER_TICK).cloned().collect();
        for id in &batch {
            vm.touches.remove(id);
        }
        batch
    };
    if batch.is_empty() {
        return;
    }
    let body = json(&PatchSession::default());
    for id in batch {
        let call = Call { method: "PATCH", resource: Resource::Session, id, suffix: "", body: Some(body.clone()), timeout_ms: None, wait_ms: None };
        if cx.host.call(&call).is_none() {
            cx.host.count(Counter::ControlErrors, 1);
        }
    }
}

/// Control's answer to a batch of records: counts the records written
/// (`control_writes`) and rejected (`control_errors`, never sent again); without an
/// answer, or with a 5xx (unreachable, timeout, store down), the batch is queued again.
fn on_records_answer(cx: &mut RootCtx, records: Vec<NewRecord>, status: Option<u16>, body: &dyn Fn() -> Vec<u8>) {
    let answer = match status {
        Some(200) => record_queue::parse_answer(&body()),
        Some(s) if s < 500 => Err(format!("status {s}")),
        other => {
            log::debug!("mcp-affinity: sending {} records to control failed (status {other:?}); sending them again", records.len());
            cx.host.count(Counter::ControlErrors, 1);
            requeue(cx, records);
            return;
        }
    };
    match answer {
        Ok(a) => {
            // A kept record is in control already.
            cx.host.count(Counter::ControlWrites, (a.written + a.kept) as u64);
            if let Some((id, why)) = a.rejected.iter().next() {
                log::warn!("mcp-affinity: control rejected {} session records, e.g. {id:?}: {}: {}", a.rejected.len(), why.code, why.message);
                cx.host.count(Counter::ControlErrors, a.rejected.len() as u64);
            }
        }
        Err(e) => {
            log::warn!("mcp-affinity: control refused a batch of {} session records: {e}; not recorded", records.len());
            cx.host.count(Counter::ControlErrors, records.len() as u64);
        }
    }
}

/// Queues records again for the next periodic tick; counts those dropped after their
/// last attempt.
fn requeue(cx: &mut RootCtx, records: Vec<NewRecord>) {
    cx.host.count(Counter::ControlWriteRetries, 1);
    let r = cx.vm.borrow_mut().records.retry(records);
    if r.dropped > 0 {
        log::warn!("mcp-affinity: {} session records not recorded in control after {} attempts", r.dropped, record_queue::MAX_ATTEMPTS);
        cx.host.count(Counter::ControlErrors, r.dropped as u64);
    }
}

#[cfg(test)]
#[path = "root_tests.rs"]
mod tests;
