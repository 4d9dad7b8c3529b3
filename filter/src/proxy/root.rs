//! The root context: reads the plugin configuration, defines metrics, and on each tick
//! sweeps idle pins and sends the control service the touches streams queued.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::control::ControlClient;
use super::metrics::{self, Metrics};
use super::store::{self, SweepIndex};
use super::stream::Stream;
use crate::config::FilterConfig;
use crate::control::{PatchSession, to_body};

/// Most touches sent to control per tick; the rest wait for the next tick.
const TOUCHES_PER_TICK: usize = 256;

/// What the root context shares with its streams (one VM = one worker thread, so `Rc`).
pub struct Plugin {
    pub config: FilterConfig,
    pub metrics: Metrics,
    pub control: Option<ControlClient>,
    /// Pins this VM wrote (swept on tick).
    pub index: SweepIndex,
    /// Control lookups in flight on this VM: session id → waiting context ids. One lookup
    /// per session per VM; the others wait for it.
    pub lookups: RefCell<HashMap<String, Vec<u32>>>,
    /// Sessions whose last-seen should be refreshed in control on the next tick.
    pub touches: RefCell<HashSet<String>>,
}

/// The root context.
#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
    metrics: Metrics,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        // Touches are best effort: an unanswered one is repeated at the next interval.
        let status = self.get_http_call_response_header(":status");
        if status.as_deref().is_none_or(|s| !s.starts_with('2') && s != "404") {
            metrics::inc(self.metrics.control_errors);
        }
    }
}

impl RootContext for Root {
    /// Envoy calls this with the plugin configuration (buffer type 7). Returning false
    /// rejects the configuration: Envoy logs it and does not use the filter.
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let parsed = FilterConfig::parse(&bytes).and_then(|config| {
            let control = config.control.as_ref().map(ControlClient::new).transpose()?;
            Ok((config, control))
        });
        match parsed {
            Ok((config, control)) => {
                log::info!("mcp-affinity: configured: {config:?}");
                if self.metrics.requests_pinned == 0 {
                    self.metrics = Metrics::define();
                }
                self.set_tick_period(Duration::from_millis(config.sweep_period_ms));
                // A reconfiguration keeps the pins this VM indexed.
                let index = self.plugin.as_ref().map(|p| p.index.clone()).unwrap_or_default();
                self.plugin = Some(Rc::new(Plugin {
                    config,
                    metrics: self.metrics,
                    control,
                    index,
                    lookups: RefCell::default(),
                    touches: RefCell::default(),
                }));
                true
            }
            Err(e) => {
                log::error!("mcp-affinity: rejecting plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(p) = self.plugin.clone() else { return };
        let expired = store::sweep(&p.index, super::now_secs(), p.config.session_ttl_secs);
        if expired > 0 {
            metrics::add(p.metrics.sessions_expired, expired);
            log::debug!("mcp-affinity: swept {expired} idle pins");
        }
        if let Some(control) = &p.control {
            let batch: Vec<String> = p.touches.borrow().iter().take(TOUCHES_PER_TICK).cloned().collect();
            let body = to_body(&PatchSession::default());
            for id in batch {
                p.touches.borrow_mut().remove(&id);
                if control.call("PATCH", &id, Some(&body)).is_err() {
                    metrics::inc(p.metrics.control_errors);
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(Stream::new(plugin, context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
