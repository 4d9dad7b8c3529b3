//! The empty proxy-wasm HTTP filter of `make bench-envoy`: what any Rust proxy-wasm filter
//! costs in Envoy (V8 VM, the ABI's callbacks for every stream event, one header read)
//! before doing any work. It reads `mcp-session-id` on request headers and returns
//! `Continue`; every other callback is the SDK's default (`Continue`). Same SDK
//! (`proxy-wasm` 0.2.5), build profile (`wasm`) and `vm_config` as mcp-affinity, so
//! `affinity − empty` is the cost of the filter's own logic.
#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    // The plugin configuration is ignored (on_configure's default accepts anything).
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Empty))
    }
}

struct Empty;

impl Context for Empty {}

impl HttpContext for Empty {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One host call, as the cheapest useful filter would make; the value is unused.
        let _ = self.get_http_request_header("mcp-session-id");
        Action::Continue
    }
}
