//! What a root context shares with its streams once its plugin configuration is accepted
//! ([`Plugin`]), and the host's side of the machines' services: counters
//! (`proxy_define_metric` / `proxy_increment_metric`), shared data and the clock.

use std::cell::{Cell, RefCell};

use super::abi;
use super::dispatch::ControlClient;
use crate::config::FilterConfig;
use crate::machine::{Env, Vm};
use crate::metrics::Counter;
use crate::store::SharedData;

/// Host metric ids, indexed by `Counter as usize` (0 = not defined), and the counts of
/// the per-request counters ([`Counter::per_request`]) not yet sent to the host.
#[derive(Debug, Default, Clone)]
pub struct HostCounters {
    ids: Vec<u32>,
    pending: Vec<Cell<u64>>,
}

impl HostCounters {
    /// Defines every counter (`proxy_define_metric`); a refused definition leaves id 0.
    pub fn define() -> HostCounters {
        let ids: Vec<u32> = Counter::ALL.iter().map(|c| abi::define_counter(c.name())).collect();
        HostCounters { pending: ids.iter().map(|_| Cell::new(0)).collect(), ids }
    }

    /// Adds `n` to a counter: a per-request counter in the VM (sent by
    /// [`HostCounters::flush`]), any other at once (`proxy_increment_metric`); a no-op when
    /// undefined or refused.
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

/// The stream machine's host services. The clock is the VM's ([`Vm::clock_secs`]).
pub struct HostEnv<'a> {
    pub counters: &'a HostCounters,
    pub now_secs: u64,
    pub shared: HostSharedData,
}

impl Env for HostEnv<'_> {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }

    fn now_secs(&self) -> u64 {
        self.now_secs
    }

    fn count(&mut self, counter: Counter) {
        self.counters.add(counter, 1);
    }

    fn pins_changed(&self) -> u64 {
        self.counters.value(Counter::PinsChanged)
    }
}

/// What the root context shares with its streams (one VM = one worker thread, so `Rc`).
pub struct Plugin {
    pub config: FilterConfig,
    pub counters: HostCounters,
    pub control: Option<ControlClient>,
    pub vm: RefCell<Vm>,
}
