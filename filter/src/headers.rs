//! Header names the filter reads and writes (lowercase, as Envoy's header maps hold them):
//! those it shares with control come from the contract crate (`mcp_affinity_proto::headers`).

pub use mcp_affinity_proto::headers::{CLIENT_SESSION, MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, RECOVERED_PIN};

/// HTTP/2-style pseudo-headers Envoy exposes in header maps.
pub const METHOD: &str = ":method";
pub const STATUS: &str = ":status";
pub const PATH: &str = ":path";
pub const AUTHORITY: &str = ":authority";
pub const CONTENT_TYPE: &str = "content-type";
/// Length of the request body the client declared (absent for chunked and HTTP/2 bodies).
pub const CONTENT_LENGTH: &str = "content-length";
