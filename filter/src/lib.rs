//! mcp-affinity filter: a proxy-wasm HTTP filter that pins MCP sessions (Streamable HTTP
//! transport) to the upstream host that answered `initialize`.
//!
//! Host-independent logic lives in plain modules with native unit tests:
//! - [`config`]: the plugin configuration (JSON), its defaults and validation;
//! - [`session_id`]: `Mcp-Session-Id` validation (MCP `basic/transports`);
//! - [`jsonrpc`]: recognising `initialize` in a POST body, JSON-RPC error bodies;
//! - [`pin`]: the session → upstream host record kept in Envoy shared data, and the
//!   routing-header encodings;
//! - [`control`]: requests to and records from the control service;
//! - [`recovery`]: when a pinned session needs recovery, and the recover call's shapes.
//!
//! The proxy-wasm layer (`proxy`, compiled for `wasm32` only) is thin glue over these.

pub mod config;
pub mod control;
pub mod headers;
pub mod jsonrpc;
pub mod pin;
pub mod recovery;
pub mod session_id;

#[cfg(target_arch = "wasm32")]
mod proxy;
