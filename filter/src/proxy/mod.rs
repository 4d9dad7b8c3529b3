//! proxy-wasm glue (ABI v0.2.1, without the SDK); it only translates, the decisions are
//! in [`crate::machine`]. Imports go one way: `exports` → `root`, `http_context` →
//! `plugin`, `dispatch`, `calls`, `log` → `abi`.
//! - `exports`: the callbacks Envoy calls and the VM's registry of contexts;
//! - `root`: the root context (configuration, counters; ticks and answers to the root
//!   machine);
//! - `http_context`: one per HTTP stream, events to the stream machine, its ops to host calls;
//! - `plugin`: what a root shares with its streams, and the host side of the machines'
//!   services (counters, shared data, clock);
//! - `dispatch`: calls to the control service (`proxy_http_call`);
//! - `calls`: which stream waits for which call's answer;
//! - `log`: the `log` facade on `proxy_log`, and the panic hook;
//! - `abi`: the host calls, each status a value.

mod abi;
mod calls;
mod dispatch;
mod exports;
mod http_context;
mod log;
mod plugin;
mod root;
