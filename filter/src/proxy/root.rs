//! The root context: reads the plugin configuration, defines the counters, and on each
//! tick sends control the new sessions' records the streams queued
//! ([`crate::record_queue`]). Every `sweep_period_ms` it also sweeps idle pins, sends
//! control the touches the streams queued, and keeps the VM's draining list current
//! ([`crate::drain`]): adopts it from shared data, polls control for it when due, and
//! ends open GET streams on upstreams that start draining.
//! Also the host side of the machine's [`Env`]: shared data, the clock and the counters.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::abi::{self, Buffer, StreamType};
use super::control::{ControlClient, answer_status};
use crate::config::FilterConfig;
use mcp_affinity_proto::sessions::PatchSession;
use crate::drain;
use crate::metrics::Counter;
use crate::record_queue::{self, NewRecord};
use crate::store::{self, SharedData};
use crate::machine::{Call, Env, Vm};

/// Most touches sent to control per tick; the rest wait for the next tick.
const TOUCHES_PER_TICK: usize = 256;

/// Most shared-data buckets the sweep looks at per tick (each one shared-data read).
const SWEEP_PER_TICK: u32 = 64;

/// Most record batches in flight to control per VM; more wait for the next tick.
const RECORD_CALLS_IN_FLIGHT: usize = 8;


fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

/// Host metric ids, indexed by `Counter as usize` (0 = not defined), and the counts of
/// the per-request counters ([`Counter::per_request`]) not yet sent to the host.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    ids: Vec<u32>,
    pending: Vec<Cell<u64>>,
}

impl Metrics {
    /// Defines every counter (`proxy_define_metric`); a refused definition leaves id 0.
    fn define() -> Metrics {
        let ids: Vec<u32> = Counter::ALL.iter().map(|c| abi::define_counter(c.name())).collect();
        Metrics { pending: ids.iter().map(|_| Cell::new(0)).collect(), ids }
    }

    /// Adds `n` to a counter: a per-request counter in the VM (sent by [`Metrics::flush`]),
    /// any other at once (`proxy_increment_metric`); a no-op when undefined or refused.
    pub fn add(&self, c: Counter, n: u64) {
        if c.per_request()
            && let Some(pending) = self.pending.get(c as usize)
        {
            pending.set(pending.get() + n);
            return;
        }
        self.send(c, n);
    }

    fn send(&self, c: Counter, n: u64) {
        if let Some(&id) = self.ids.get(c as usize)
            && id != 0
        {
            abi::increment(id, n);
        }
    }

    /// The value of a counter, process-wide (`proxy_get_metric`), 0 when undefined or refused.
    pub fn value(&self, c: Counter) -> u64 {
        self.ids.get(c as usize).filter(|id| **id != 0).map_or(0, |id| abi::metric(*id))
    }

    /// Sends the per-request counts gathered since the last flush (one host call per
    /// counter that moved; called every `sweep_period_ms` on the tick).
    pub fn flush(&self) {
        for (&c, pending) in Counter::ALL.iter().zip(&self.pending) {
            let n = pending.replace(0);
            if n > 0 {
                self.send(c, n);
            }
        }
    }
}

/// Envoy shared data through `proxy_get_shared_data` / `proxy_set_shared_data`.
pub struct HostSharedData;

impl SharedData for HostSharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
        abi::shared_data(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        abi::set_shared_data(key, value, cas)
    }
}

/// The machine's host services. The clock is the VM's, refreshed every `sweep_period_ms`: pins
/// need seconds, and a host call per request for them would be waste.
pub struct HostEnv<'a> {
    metrics: &'a Metrics,
    now_secs: u64,
    shared: HostSharedData,
}

impl<'a> HostEnv<'a> {
    pub fn new(plugin: &'a Plugin) -> Self {
        HostEnv { metrics: &plugin.metrics, now_secs: plugin.now_secs.get(), shared: HostSharedData }
    }
}

impl Env for HostEnv<'_> {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }

    fn now_secs(&self) -> u64 {
        self.now_secs
    }

    fn count(&mut self, counter: Counter) {
        self.metrics.add(counter, 1);
    }

    fn pins_changed(&self) -> u64 {
        self.metrics.value(Counter::PinsChanged)
    }
}

/// What the root context shares with its streams (one VM = one worker thread, so `Rc`).
pub struct Plugin {
    pub config: FilterConfig,
    pub metrics: Metrics,
    pub control: Option<ControlClient>,
    pub vm: RefCell<Vm>,
    /// The VM's clock (Unix seconds), refreshed on configure and every `sweep_period_ms`.
    pub now_secs: Cell<u64>,
    /// The root context ticks every `control.record_flush_ms` (records wait), not every
    /// `sweep_period_ms`.
    fast_tick: Cell<bool>,
}

impl Plugin {
    /// Makes the root context tick every `control.record_flush_ms` while records wait in
    /// the VM's queue; called after an event that may have queued one. The tick goes back
    /// to `sweep_period_ms` once the queue is empty, so an idle VM is not woken up 100
    /// times a second (`proxy_set_tick_period_milliseconds` applies to the stream's root
    /// context, Envoy `Context::setTickPeriod`).
    pub fn tick_for_records(&self) {
        if self.fast_tick.get() || !self.vm.borrow().records.ready() {
            return;
        }
        if let Some(c) = &self.config.control {
            abi::set_tick_period(Duration::from_millis(c.record_flush_ms));
            self.fast_tick.set(true);
        }
    }

    /// Back to the slow tick when nothing waits to be sent now (a held queue waits for the
    /// periodic tick).
    fn tick_slowly_when_idle(&self) {
        if self.fast_tick.get() && !self.vm.borrow().records.ready() {
            abi::set_tick_period(Duration::from_millis(self.config.sweep_period_ms));
            self.fast_tick.set(false);
        }
    }
}

/// The root context.
pub struct Root {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
    metrics: Option<Metrics>,
    /// Token of this VM's draining-list fetch in flight.
    drain_fetch: Option<(u32, u64)>,
    /// The last fetch failed (the next failure is not logged again).
    drain_failing: bool,
    /// Record batches in flight: token → their records (queued again if control did not
    /// take them).
    record_calls: HashMap<u32, Vec<NewRecord>>,
    /// When the tick's periodic work (sweep, touches, drains, counters) is next due,
    /// Unix milliseconds; the tick itself may come more often, to send records.
    housekeeping_due_ms: u64,
}

impl Root {
    /// The root context with the host's context id.
    pub fn new(context_id: u32) -> Root {
        Root { context_id, plugin: None, metrics: None, drain_fetch: None, drain_failing: false, record_calls: HashMap::new(), housekeeping_due_ms: 0 }
    }

    /// Adopts the shared draining list; when it changed, ends the VM's open GET streams
    /// whose upstream now drains (their clients reopen them and are moved).
    fn adopt_draining(&self, p: &Plugin) {
        let mut vm = p.vm.borrow_mut();
        if !vm.draining.refresh(&HostSharedData) {
            return;
        }
        p.metrics.add(Counter::DrainListUpdates, 1);
        let ends = vm.streams_to_end();
        drop(vm);
        for id in ends {
            if abi::set_effective_context(id) {
                log::info!("mcp-affinity: ending GET stream {id}: its upstream is draining");
                abi::close(StreamType::Response);
                p.metrics.add(Counter::StreamsEndedByDrain, 1);
            }
            p.vm.borrow_mut().open_gets.remove(&id);
        }
        // Later host calls of this callback (e.g. dispatching calls) belong to the root.
        abi::set_effective_context(self.context_id);
    }

    /// The draining-list fetch of the poll claimed at `claimed_at_ms` answered: share the
    /// list with every VM (unless a later poll's answer is there already).
    fn on_draining_answer(&mut self, p: &Plugin, claimed_at_ms: u64, num_headers: usize, body_size: usize) {
        let list = match answer_status(num_headers) {
            Some(200) => drain::parse_answer(&abi::buffer(Buffer::HttpCallResponseBody, 0, body_size)),
            other => Err(format!("status {other:?}")),
        };
        match list {
            Ok(list) => {
                self.drain_failing = false;
                drain::store_answer(&mut HostSharedData, claimed_at_ms, &list);
                self.adopt_draining(p);
            }
            Err(e) => {
                // The last list stays in force; the next poll is one interval away.
                if !std::mem::replace(&mut self.drain_failing, true) {
                    log::warn!("mcp-affinity: fetching the draining upstreams failed: {e}; retrying every interval");
                }
                p.metrics.add(Counter::DrainPollErrors, 1);
            }
        }
    }

    /// The plugin, once a configuration was accepted.
    pub fn plugin(&self) -> Option<&Rc<Plugin>> {
        self.plugin.as_ref()
    }

    /// `proxy_on_http_call_response` of a call this root made itself (the draining list,
    /// touches); answers to streams' calls go to their streams ([`super::exports`]).
    pub fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize) {
        if let Some(records) = self.record_calls.remove(&token) {
            if let Some(p) = self.plugin.clone() {
                on_records_answer(&p, records, num_headers, body_size);
            }
            return;
        }
        if let Some((fetch, claimed_at_ms)) = self.drain_fetch
            && fetch == token
        {
            self.drain_fetch = None;
            if let Some(p) = self.plugin.clone() {
                self.on_draining_answer(&p, claimed_at_ms, num_headers, body_size);
            }
            return;
        }
        // Touches are best effort: an unanswered one is repeated at the next interval.
        if answer_status(num_headers).is_none_or(|s| !(200..300).contains(&s) && s != 404)
            && let Some(m) = &self.metrics
        {
            m.add(Counter::ControlErrors, 1);
        }
    }

    /// The answer to a write made by a stream that has ended (an update or a `DELETE`
    /// whose stream the upstream answered first).
    pub fn on_write_answer(&mut self, num_headers: usize) {
        let Some(m) = &self.metrics else { return };
        if answer_status(num_headers).is_some_and(|s| (200..300).contains(&s)) {
            m.add(Counter::ControlWrites, 1);
        } else {
            log::warn!("mcp-affinity: a write to control failed");
            m.add(Counter::ControlErrors, 1);
        }
    }

    /// `proxy_on_configure`: reads the plugin configuration (buffer type 7). Returning
    /// false rejects it: Envoy logs it and does not use the filter.
    pub fn on_configure(&mut self, size: usize) -> bool {
        let bytes = abi::buffer(Buffer::PluginConfiguration, 0, size);
        let parsed = FilterConfig::parse(&bytes).and_then(|config| {
            let control = config.control.as_ref().map(ControlClient::new).transpose()?;
            Ok((config, control))
        });
        match parsed {
            Ok((config, control)) => {
                log::info!("mcp-affinity: configured: {config:?}");
                let metrics = self.metrics.get_or_insert_with(Metrics::define).clone();
                abi::set_tick_period(Duration::from_millis(config.sweep_period_ms));
                // A reconfiguration keeps the pins this VM indexed.
                let vm = self.plugin.as_ref().map(|p| std::mem::take(&mut *p.vm.borrow_mut())).unwrap_or_default();
                self.plugin = Some(Rc::new(Plugin { config, metrics, control, vm: RefCell::new(vm), now_secs: Cell::new(abi::now().as_secs()), fast_tick: Cell::new(false) }));
                if let Some(p) = &self.plugin {
                    p.tick_for_records();
                }
                true
            }
            Err(e) => {
                log::error!("mcp-affinity: rejecting plugin configuration: {e}");
                false
            }
        }
    }

    /// `proxy_on_tick`, every `sweep_period_ms`, or every `control.record_flush_ms` while
    /// records wait ([`Plugin::tick_for_records`]): sends the queued records; the rest
    /// every `sweep_period_ms`.
    pub fn on_tick(&mut self) {
        let Some(p) = self.plugin.clone() else { return };
        let clock = abi::now();
        let periodic = millis(clock) >= self.housekeeping_due_ms;
        if periodic {
            // Records of a failed batch are sent again on the periodic tick only.
            p.vm.borrow_mut().records.release();
        }
        self.send_records(&p);
        p.tick_slowly_when_idle();
        if !periodic {
            return;
        }
        self.housekeeping_due_ms = millis(clock).saturating_add(p.config.sweep_period_ms);
        super::exports::follow_host_log_level();
        let now = clock.as_secs();
        p.now_secs.set(now);
        p.metrics.flush();
        if let (Some(control), Some(cfg)) = (&p.control, &p.config.control)
            && cfg.drain_poll_ms > 0
        {
            self.adopt_draining(&p);
            let now_ms = millis(clock);
            if self.drain_fetch.is_none() && drain::claim_poll(&mut HostSharedData, now_ms, cfg.drain_poll_ms) {
                match control.fetch_draining() {
                    Ok(token) => self.drain_fetch = Some((token, now_ms)),
                    Err(_) => p.metrics.add(Counter::DrainPollErrors, 1),
                }
            }
        }
        let mut vm = p.vm.borrow_mut();
        let expired = store::sweep(&mut HostSharedData, p.config.layout(), &mut vm.sweep_cursor, now, p.config.session_ttl_secs, SWEEP_PER_TICK);
        if expired > 0 {
            p.metrics.add(Counter::SessionsExpired, expired);
            log::debug!("mcp-affinity: swept {expired} idle pins");
        }
        if let Some(control) = &p.control {
            let batch: Vec<String> = vm.touches.iter().take(TOUCHES_PER_TICK).cloned().collect();
            let body = crate::machine::json(&PatchSession::default());
            for id in batch {
                vm.touches.remove(&id);
                let call = Call { method: "PATCH", session_id: id, suffix: "", body: Some(body.clone()), timeout_ms: None, wait_ms: None };
                if control.call(&call).is_err() {
                    p.metrics.add(Counter::ControlErrors, 1);
                }
            }
        }
    }

    /// Sends the VM's queued records, one call per batch, up to
    /// [`RECORD_CALLS_IN_FLIGHT`] calls at once. A call the host refuses puts its batch
    /// back for the next periodic tick.
    fn send_records(&mut self, p: &Plugin) {
        let Some(control) = &p.control else { return };
        while self.record_calls.len() < RECORD_CALLS_IN_FLIGHT {
            let Some(batch) = p.vm.borrow_mut().records.take_batch() else { return };
            match control.write_records(&batch.body) {
                Ok(token) => {
                    self.record_calls.insert(token, batch.records);
                }
                Err(_) => {
                    p.metrics.add(Counter::ControlErrors, 1);
                    requeue(p, batch.records);
                    return;
                }
            }
        }
    }
}

/// Control's answer to a batch of records: counts the records written
/// (`control_writes`) and rejected (`control_errors`, never sent again); without an
/// answer, or with a 5xx (unreachable, timeout, store down), the batch is queued again.
fn on_records_answer(p: &Plugin, records: Vec<NewRecord>, num_headers: usize, body_size: usize) {
    let answer = match answer_status(num_headers) {
        Some(200) => record_queue::parse_answer(&abi::buffer(Buffer::HttpCallResponseBody, 0, body_size)),
        Some(s) if s < 500 => Err(format!("status {s}")),
        other => {
            log::debug!("mcp-affinity: sending {} records to control failed (status {other:?}); sending them again", records.len());
            p.metrics.add(Counter::ControlErrors, 1);
            requeue(p, records);
            return;
        }
    };
    match answer {
        Ok(a) => {
            // A kept record is in control already.
            p.metrics.add(Counter::ControlWrites, (a.written + a.kept) as u64);
            if let Some((id, why)) = a.rejected.iter().next() {
                log::warn!("mcp-affinity: control rejected {} session records, e.g. {id:?}: {}: {}", a.rejected.len(), why.code, why.message);
                p.metrics.add(Counter::ControlErrors, a.rejected.len() as u64);
            }
        }
        Err(e) => {
            log::warn!("mcp-affinity: control refused a batch of {} session records: {e}; not recorded", records.len());
            p.metrics.add(Counter::ControlErrors, records.len() as u64);
        }
    }
}

/// Queues records again for the next periodic tick; logs those dropped after their last
/// attempt.
fn requeue(p: &Plugin, records: Vec<NewRecord>) {
    p.metrics.add(Counter::ControlWriteRetries, 1);
    let r = p.vm.borrow_mut().records.retry(records);
    if r.dropped > 0 {
        log::warn!("mcp-affinity: {} session records not recorded in control after {} attempts", r.dropped, record_queue::MAX_ATTEMPTS);
        p.metrics.add(Counter::ControlErrors, r.dropped as u64);
    }
}
