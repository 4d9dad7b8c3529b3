//! The reference proxy-wasm HTTP filters of `make bench-envoy`, one module, two modes by
//! plugin configuration:
//!
//! - `{}` — **empty**: what any Rust proxy-wasm filter costs in Envoy (V8 VM, the ABI's
//!   callbacks for every stream event, one header read) before doing any work. It reads
//!   `mcp-session-id` on request headers and returns `Continue`.
//! - `{"pin":"IP:PORT"}` — **empty+pin**: exactly the necessary work of a pinned request
//!   and nothing else: one header read (`mcp-session-id`), one shared-data read (the pin,
//!   stored once at configure time) and one header write (`x-session-pod`), so Envoy routes
//!   by the header (route recomputation, `ORIGINAL_DST`) as it does for mcp-affinity.
//!
//! Every other callback is the SDK's default (`Continue`). Same SDK (`proxy-wasm` 0.2.5),
//! build profile (`wasm`) and `vm_config` as mcp-affinity, so `affinity − empty` is the cost
//! of the filter's logic plus what pinning costs Envoy, and `affinity − empty+pin` the cost
//! of the filter's logic beyond the necessary work.
#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

/// Shared-data key of the pin in `empty+pin` mode.
const PIN_KEY: &str = "mcp-affinity-bench/pin";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { pin: false }) });
}}

struct Root {
    pin: bool,
}

impl Context for Root {}

impl RootContext for Root {
    /// `{"pin":"IP:PORT"}` stores the pin in shared data and turns on the pin mode; any
    /// other configuration is the empty mode.
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        if let Some(rest) = text.split_once("\"pin\"").map(|(_, r)| r)
            && let Some(addr) = rest.split('"').nth(1)
        {
            self.pin = self.set_shared_data(PIN_KEY, Some(addr.as_bytes()), None).is_ok();
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { pin: self.pin }))
    }
}

struct Stream {
    pin: bool,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One host call, as the cheapest useful filter would make.
        let session = self.get_http_request_header("mcp-session-id");
        if self.pin
            && session.is_some()
            && let (Some(pin), _) = self.get_shared_data(PIN_KEY)
            && let Ok(pin) = std::str::from_utf8(&pin)
        {
            self.set_http_request_header("x-session-pod", Some(pin));
        }
        Action::Continue
    }
}
