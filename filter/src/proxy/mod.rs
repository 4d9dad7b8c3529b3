//! proxy-wasm glue (ABI v0.2.1 through the `proxy-wasm` crate): the root context owns the
//! configuration, metrics, the expiry sweep and control touches; one HTTP context per
//! stream translates Envoy's callbacks for the machine in [`crate::stream`]; `control`
//! makes the calls to the control service; `abi` the host calls the SDK would panic on.

mod abi;
mod control;
mod root;
mod stream;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new(context_id))
    });
}}
