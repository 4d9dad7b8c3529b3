//! The proxy-wasm root context: reads the plugin configuration, defines the counters, and
//! hands ticks and control's answers to the root machine ([`crate::machine::root`]), whose
//! requests it carries out with host calls. No decision is made here.

use std::rc::Rc;
use std::time::Duration;

use super::abi::{self, Buffer, StreamType};
use super::dispatch::{ControlClient, answer_status};
use super::log;
use super::plugin::{HostCounters, HostSharedData, Plugin};
use crate::config::FilterConfig;
use crate::machine::{self, Call, RootCtx, RootHost};
use crate::metrics::Counter;
use crate::store::SharedData;

/// One root context: the plugin once a configuration was accepted, and its machine.
pub struct RootContext {
    context_id: u32,
    plugin: Option<Rc<Plugin>>,
    counters: Option<HostCounters>,
    machine: machine::Root,
}

/// The root machine's host: the ABI, as the root context `root_id`.
struct Host<'a> {
    plugin: &'a Plugin,
    root_id: u32,
    shared: HostSharedData,
}

impl RootHost for Host<'_> {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(abi::now().as_millis()).unwrap_or(u64::MAX)
    }

    fn count(&mut self, counter: Counter, n: u64) {
        self.plugin.counters.add(counter, n);
    }

    fn set_tick_period(&mut self, ms: u64) {
        abi::set_tick_period(Duration::from_millis(ms));
    }

    fn housekeeping(&mut self) {
        log::follow_host_level();
        self.plugin.counters.flush();
    }

    fn call(&mut self, call: &Call) -> Option<u32> {
        self.plugin.control.as_ref()?.call(call).ok()
    }

    fn write_records(&mut self, body: &[u8]) -> Option<u32> {
        self.plugin.control.as_ref()?.write_records(body).ok()
    }

    fn fetch_draining(&mut self) -> Option<u32> {
        self.plugin.control.as_ref()?.fetch_draining().ok()
    }

    /// `proxy_close_stream` on the stream's response, then this root is the effective
    /// context again (later host calls of this callback belong to the root).
    fn end_stream(&mut self, context_id: u32) -> bool {
        if !abi::set_effective_context(context_id) {
            return false;
        }
        abi::close(StreamType::Response);
        abi::set_effective_context(self.root_id);
        true
    }
}

impl RootContext {
    /// The root context with the host's context id.
    pub fn new(context_id: u32) -> RootContext {
        RootContext { context_id, plugin: None, counters: None, machine: machine::Root::default() }
    }

    /// The plugin, once a configuration was accepted.
    pub fn plugin(&self) -> Option<&Rc<Plugin>> {
        self.plugin.as_ref()
    }

    /// Runs one root machine event, when a configuration was accepted.
    fn event(&mut self, f: impl FnOnce(&mut machine::Root, &mut RootCtx)) {
        let Some(p) = self.plugin.clone() else { return };
        let mut host = Host { plugin: &p, root_id: self.context_id, shared: HostSharedData };
        let mut cx = RootCtx { cfg: &p.config, vm: &p.vm, host: &mut host };
        f(&mut self.machine, &mut cx);
    }

    /// `proxy_on_configure`: reads the plugin configuration (buffer type 7). Returning
    /// false rejects it: Envoy logs it and does not use the filter. A reconfiguration
    /// keeps the VM's state (the pins it indexed, queued records).
    pub fn on_configure(&mut self, size: usize) -> bool {
        let bytes = abi::buffer(Buffer::PluginConfiguration, 0, size);
        let parsed = FilterConfig::parse(&bytes).and_then(|config| {
            let control = config.control.as_ref().map(ControlClient::new).transpose()?;
            Ok((config, control))
        });
        match parsed {
            Ok((config, control)) => {
                ::log::info!("mcp-affinity: configured: {config:?}");
                let counters = self.counters.get_or_insert_with(HostCounters::define).clone();
                let vm = self.plugin.as_ref().map(|p| std::mem::take(&mut *p.vm.borrow_mut())).unwrap_or_default();
                self.plugin = Some(Rc::new(Plugin { config, counters, control, vm: vm.into() }));
                self.event(|root, cx| root.on_configure(cx));
                true
            }
            Err(e) => {
                ::log::error!("mcp-affinity: rejecting plugin configuration: {e}");
                false
            }
        }
    }

    /// `proxy_on_tick`.
    pub fn on_tick(&mut self) {
        self.event(|root, cx| root.on_tick(cx));
    }

    /// `proxy_on_http_call_response` of a call this root made itself (record batches, the
    /// draining list, touches); answers to streams' calls go to their streams.
    pub fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let status = answer_status(num_headers);
        let body = || abi::buffer(Buffer::HttpCallResponseBody, 0, body_size);
        self.event(|root, cx| root.on_answer(cx, token, status, &body));
    }

    /// The answer to a write made by a stream that has ended.
    pub fn on_write_answer(&mut self, num_headers: usize) {
        let status = answer_status(num_headers);
        self.event(|_, cx| machine::Root::on_write_answer(cx.host, status));
    }
}
