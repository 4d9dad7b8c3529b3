//! mcp-affinity filter: a proxy-wasm HTTP filter that pins MCP sessions (Streamable HTTP
//! transport) to the upstream host that answered `initialize`.
//!
//! Host-independent logic lives in plain modules with native unit tests:
//! - [`config`]: the plugin configuration (JSON), its defaults and validation;
//! - [`session_id`]: `Mcp-Session-Id` validation (MCP `basic/transports`);
//! - [`jsonrpc`]: recognising `initialize` in a POST body, JSON-RPC error bodies;
//! - [`pin`]: the session → upstream host record kept in Envoy shared data, and the
//!   routing-header encodings;
//! - [`drain`]: the draining upstream hosts, shared by the VMs of one Envoy;
//! - [`headers`]: the header names it reads and writes;
//! - [`header_map`]: the ABI's serialised header map, read without copies;
//! - [`record_queue`]: new sessions' records waiting in the VM, sent to control in
//!   batches on the root context's tick;
//! - [`recovery`]: when a pinned session needs recovery, and the recover call's shapes;
//! - [`pin_cache`]: a worker VM's own copies of the pins it used, valid while no pin
//!   changed anywhere in Envoy;
//! - [`store`]: pins in shared data (CAS, tombstones, sweep) over a [`store::SharedData`]
//!   interface;
//! - [`metrics`]: the filter's counters;
//! - [`tasks`]: the MCP 2026-07-28 era and its tasks extension (which requests concern a
//!   task, the task a `tools/call` answer created);
//! - [`machine`]: the decisions — the per-stream state machine (events in, actions out)
//!   that encodes the rules real Envoy imposes on a proxy-wasm filter, and the root
//!   context's machine (ticks, record batches, the sweep, touches, the draining list).
//!
//! The proxy-wasm layer (`proxy`, compiled for `wasm32` only) only translates Envoy's
//! callbacks into [`machine`] events and its actions into host calls. What crosses to
//! control is defined once, in `mcp-affinity-proto`.

pub mod config;
pub mod drain;
pub mod header_map;
pub mod headers;
pub mod jsonrpc;
pub mod metrics;
pub mod pin;
pub mod pin_cache;
pub mod record_queue;
pub mod recovery;
pub use mcp_affinity_proto::session_id;
pub mod store;
pub mod tasks;
pub mod machine;

#[cfg(target_arch = "wasm32")]
mod proxy;
