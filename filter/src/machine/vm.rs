//! What a stream's events see besides the stream: the host services ([`Env`]), the state one
//! worker VM shares between its streams ([`Vm`]), and both with the plugin configuration
//! ([`Ctx`]), whose helpers keep shared data, the VM's pin copies and the change counter in
//! step.

use hashbrown::{HashMap, HashSet};

use mcp_affinity_proto::tasks::PutTask;

use crate::config::{FilterConfig, ReplayBy};
use crate::drain::Draining;
use crate::metrics::Counter;
use crate::pin::Pin;
use crate::pin_cache::PinCache;
use crate::record_queue::RecordQueue;
use crate::recovery::Placement;
use crate::store::{self, SharedData, Updated};

/// Most task pins waiting in one VM to be written to control; more are dropped (counted
/// `control_errors`): the task still works through this Envoy.
pub const MAX_TASK_WRITES: usize = 4096;

/// Host services the machine uses besides the stream itself.
pub trait Env {
    /// Envoy shared data (process-wide, all worker VMs).
    fn shared(&mut self) -> &mut dyn SharedData;
    /// Wall clock, Unix seconds (`proxy_get_current_time_nanoseconds`).
    fn now_secs(&self) -> u64;
    /// Adds one to a counter.
    fn count(&mut self, counter: Counter);
    /// The process-wide count of pin changes, counter `pins_changed` (`proxy_get_metric`:
    /// a number, no bytes copied into the VM).
    fn pins_changed(&self) -> u64;
}

/// State one VM (one Envoy worker thread) shares between its streams.
#[derive(Debug, Default)]
pub struct Vm {
    /// The next shared-data bucket this VM's sweep looks at.
    pub sweep_cursor: u32,
    /// Control lookups in flight on this VM: session id → waiting stream context ids. One
    /// lookup per session per VM; the other streams wait for it.
    pub lookups: HashMap<String, Vec<u32>>,
    /// Sessions whose last-seen should be refreshed in control on the next tick.
    pub touches: HashSet<String>,
    /// This VM's copies of the pins it used ([`crate::pin_cache`]).
    pub pins: PinCache,
    /// New sessions' records waiting for the root context's tick ([`crate::record_queue`]).
    pub records: RecordQueue,
    /// The draining upstream hosts, adopted from shared data on the tick.
    pub draining: Draining,
    /// Open long-lived streams: pinned GET streams (server-to-client SSE) and 2026-era
    /// `subscriptions/listen` streams, context id → upstream host. Ended when their
    /// upstream starts draining ([`Vm::streams_to_end`]).
    pub open_streams: HashMap<u32, String>,
    /// A listen stream was answered by an upstream this VM already knew draining (sent
    /// before the VM adopted the drain): the next tick ends it with the others.
    pub late_streams: bool,
    /// The VM's clock, Unix seconds, set by the root context on configure and every
    /// `sweep_period_ms`: pins need seconds, and a host call per request for them would
    /// be waste.
    pub clock_secs: u64,
    /// Task pins waiting for the root context's tick to be written to control
    /// (`PUT {prefix}/tasks/{id}`), at most [`MAX_TASK_WRITES`].
    pub task_writes: Vec<(String, PutTask)>,
    /// The root context ticks every `control.record_flush_ms` (records wait), not every
    /// `sweep_period_ms` ([`super::root::tick_change`]).
    pub fast_tick: bool,
}

impl Vm {
    /// The open streams whose upstream is draining: the root context ends them
    /// (`proxy_close_stream`) so that their clients reopen them (a GET stream) or re-listen
    /// (`subscriptions/listen`), on a live pod.
    pub fn streams_to_end(&self) -> Vec<u32> {
        if self.draining.is_empty() {
            return Vec::new();
        }
        let mut ids: Vec<u32> = self.open_streams.iter().filter(|(_, u)| self.draining.contains(u)).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }
}

/// What one event sees of the plugin and its VM.
pub struct Ctx<'a> {
    pub cfg: &'a FilterConfig,
    /// A control service is configured.
    pub control: bool,
    pub vm: &'a mut Vm,
    pub env: &'a mut dyn Env,
}

impl Ctx<'_> {
    pub(super) fn recoverable(&self) -> bool {
        self.control && self.cfg.recovery.enabled
    }

    /// The filter replays failed requests itself through control (`replay_by: filter`):
    /// pinned requests' bodies are copied.
    pub(super) fn replays_itself(&self) -> bool {
        self.recoverable() && self.cfg.recovery.replay_by == ReplayBy::Filter
    }

    /// Envoy's retry carries failed requests to control's replay listener (`replay_by:
    /// envoy_retry`): nothing is copied; the answer may carry a new pin.
    pub(super) fn envoy_retries(&self) -> bool {
        self.recoverable() && self.cfg.recovery.replay_by == ReplayBy::EnvoyRetry
    }

    pub(super) fn count(&mut self, c: Counter) {
        self.env.count(c);
    }

    /// The change count this VM's cached pins are checked against; no host call when the
    /// cache is off.
    pub(super) fn pins_changed(&self) -> u64 {
        if self.cfg.local_pins == 0 { 0 } else { self.env.pins_changed() }
    }

    /// Writes a new pin (no VM can hold a copy of it).
    pub(super) fn put_pin(&mut self, session_id: &str, pin: &Pin) {
        self.write_pin(session_id, pin, false);
    }

    /// Writes a changed pin: shared data first, then the change count that makes every
    /// VM's copy of it stale.
    pub(super) fn change_pin(&mut self, session_id: &str, pin: &Pin) {
        self.write_pin(session_id, pin, true);
    }

    /// Writes a pin to shared data (counting an eviction it caused), counts a change, and
    /// keeps this VM's copy.
    pub(super) fn write_pin(&mut self, session_id: &str, pin: &Pin, changed: bool) {
        if store::put(self.env.shared(), self.cfg.layout(), session_id, pin) == Updated::Evicted {
            self.count(Counter::PinsEvicted);
        }
        if changed {
            self.count(Counter::PinsChanged);
        }
        let changes = self.pins_changed();
        self.vm.pins.put(session_id, pin, changes, self.cfg.local_pins);
    }

    /// Refreshes the last-seen time of a pin (shared data and this VM's copy).
    pub(super) fn touch_pin(&mut self, session_id: &str, now: u64) {
        store::touch(self.env.shared(), self.cfg.layout(), session_id, now);
        self.vm.pins.update(session_id, |p| p.last_seen = p.last_seen.max(now));
    }

    /// Marks a pin as past `notifications/initialized` (shared data and this VM's copy).
    pub(super) fn mark_recorded(&mut self, session_id: &str) {
        store::mark_recorded(self.env.shared(), self.cfg.layout(), session_id);
        self.vm.pins.update(session_id, |p| p.recorded = true);
    }

    /// `?wait_ms=` for calls about an existing session: control waits this long for a
    /// record whose (asynchronous) write may still be in flight.
    pub(super) fn record_wait(&self) -> Option<u64> {
        self.cfg.control.as_ref().map(|c| c.lookup_wait_ms).filter(|ms| *ms > 0)
    }

    /// Pins `session_id` where control says the session lives now (after a recovery or a
    /// move; control has recorded it, so nothing is left to record).
    pub(super) fn repin(&mut self, session_id: &str, new: &Placement) -> Pin {
        let pin = Pin {
            upstream: new.upstream.clone(),
            generation: new.generation,
            last_seen: self.env.now_secs(),
            backend_session_id: new.backend_session_id.clone(),
            recorded: true,
        };
        self.change_pin(session_id, &pin);
        pin
    }

    /// Forgets a pin: shared data, this VM's copy, and every other VM's (a change).
    pub(super) fn forget_pin(&mut self, session_id: &str) {
        store::forget(self.env.shared(), self.cfg.layout(), session_id);
        self.vm.pins.remove(session_id);
        self.count(Counter::PinsChanged);
    }

    /// The pin of a session: this VM's copy while no pin changed since it was taken, else
    /// shared data (then copied).
    pub(super) fn get_pin(&mut self, session_id: &str) -> Option<Pin> {
        let changes = self.pins_changed();
        let now = self.env.now_secs();
        if let Some(pin) = self.vm.pins.get(session_id, changes, now, self.cfg.session_ttl_secs) {
            return Some(pin.clone());
        }
        let pin = store::get(self.env.shared(), self.cfg.layout(), session_id)?;
        self.vm.pins.put(session_id, &pin, changes, self.cfg.local_pins);
        Some(pin)
    }
}

