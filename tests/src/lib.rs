//! Test harness for mcp-affinity.
//!
//! - [`devproxy`]: the dev proxy that runs the filter per stream like Envoy.
//! - [`host`]: a proxy-wasm ABI v0.2.1 host on wasmtime, with Envoy's semantics.
//! - [`process`]: free loopback ports and child processes stopped by pid.
//! - [`demo_server`]: the demo MCP server (rmcp, stateful Streamable HTTP).
//! - [`mcp_client`]: a raw-HTTP MCP client that shows exact statuses and headers.
//! - [`rmcp_client`]: the real rmcp Streamable HTTP client.
//! - [`fixtures`]: external services started for tests (a real `redis-server`).
pub mod devproxy;
pub mod host;
pub mod process;
pub mod demo_server;
pub mod mcp_client;
pub mod rmcp_client;
pub mod fixtures;
