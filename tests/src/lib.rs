//! Test harness for mcp-affinity.
//!
//! - [`process`]: free loopback ports and child processes stopped by pid.
//! - [`demo_server`]: the demo MCP server (rmcp, stateful Streamable HTTP).
//! - [`mcp_client`]: a raw-HTTP MCP client that shows exact statuses and headers.
//! - [`rmcp_client`]: the real rmcp Streamable HTTP client.
pub mod process;
pub mod demo_server;
pub mod mcp_client;
pub mod rmcp_client;
