//! Header names the filter reads and writes (lowercase, as Envoy's header maps hold them).

/// MCP session header (MCP `basic/transports`: `Mcp-Session-Id`, case-insensitive;
/// 2025-11-25 spells it `MCP-Session-Id`).
pub const MCP_SESSION_ID: &str = "mcp-session-id";
/// Optional method hint (SEP-2243). Used only to skip body inspection, never trusted.
pub const MCP_METHOD: &str = "mcp-method";
/// Negotiated protocol version sent by clients after `initialize` (MCP 2025-06-18).
pub const MCP_PROTOCOL_VERSION: &str = "mcp-protocol-version";
/// HTTP/2-style pseudo-headers Envoy exposes in header maps.
pub const METHOD: &str = ":method";
pub const STATUS: &str = ":status";
pub const PATH: &str = ":path";
pub const AUTHORITY: &str = ":authority";
pub const CONTENT_TYPE: &str = "content-type";
/// Length of the request body the client declared (absent for chunked and HTTP/2 bodies).
pub const CONTENT_LENGTH: &str = "content-length";
/// Request header naming the client's session id when the filter sends a request under
/// the backend's (`recovery.replay_by: envoy_retry`): control's replay listener finds the
/// session's record by it. Naming a session here gives a client nothing it could not do
/// by sending that id as `Mcp-Session-Id`.
pub const CLIENT_SESSION: &str = "x-mcp-affinity-session";
/// Response header of control's replay listener: where the session lives now,
/// `<upstream ip:port> <backend session id> <generation>` (`recovery.replay_by:
/// envoy_retry`). Never reaches the client.
pub const RECOVERED_PIN: &str = "x-mcp-affinity-pin";
