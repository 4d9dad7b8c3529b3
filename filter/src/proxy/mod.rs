//! proxy-wasm glue (ABI v0.2.1 through the `proxy-wasm` crate): the root context owns the
//! configuration, metrics, the expiry sweep and control touches; one HTTP context per
//! stream applies the pinning rules; `store` wraps shared data and `control` the calls to
//! the control service.

mod control;
mod metrics;
mod root;
mod store;
mod stream;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::default())
    });
}}

/// Current time in Unix seconds, from the host clock (`proxy_get_current_time_nanoseconds`).
fn now_secs() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}
