//! The root context: reads the plugin configuration, defines metrics, sweeps expired pins
//! on tick, and creates one HTTP context per stream.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::metrics::{self, Metrics};
use super::store::{self, SweepIndex};
use super::stream::Stream;
use crate::config::FilterConfig;

/// State shared by the root context and its streams (one VM = one worker thread, so `Rc`).
#[derive(Default)]
pub struct Root {
    config: Rc<FilterConfig>,
    metrics: Metrics,
    index: SweepIndex,
}

impl Context for Root {}

impl RootContext for Root {
    /// Envoy calls this with the plugin configuration (buffer type 7). Returning false
    /// rejects the configuration: Envoy logs it and does not use the filter.
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                log::info!("mcp-affinity: configured: {config:?}");
                self.set_tick_period(Duration::from_millis(config.sweep_period_ms));
                self.config = Rc::new(config);
                if self.metrics.requests_pinned == 0 {
                    self.metrics = Metrics::define();
                }
                true
            }
            Err(e) => {
                log::error!("mcp-affinity: rejecting plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let expired = store::sweep(&self.index, super::now_secs(), self.config.session_ttl_secs);
        if expired > 0 {
            metrics::add(self.metrics.sessions_expired, expired);
            log::debug!("mcp-affinity: swept {expired} idle pins");
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(self.config.clone(), self.metrics, self.index.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
