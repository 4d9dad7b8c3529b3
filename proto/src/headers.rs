//! Header names the filter and control share (lowercase, as Envoy's header maps and the
//! `http` crate hold them).

/// MCP session header (MCP `basic/transports`: `Mcp-Session-Id`, case-insensitive;
/// 2025-11-25 spells it `MCP-Session-Id`).
pub const MCP_SESSION_ID: &str = "mcp-session-id";
/// Optional method hint (SEP-2243). Used only to skip body inspection, never trusted.
pub const MCP_METHOD: &str = "mcp-method";
/// Negotiated protocol version sent by clients after `initialize` (MCP 2025-06-18).
pub const MCP_PROTOCOL_VERSION: &str = "mcp-protocol-version";
/// What a request is about (SEP-2243, MCP 2026-07-28): a tool's name, a resource's URI, a
/// task's id (`tasks/get`, `tasks/update`, `tasks/cancel`); `=?base64?…?=` when not a
/// plain token.
pub const MCP_NAME: &str = "mcp-name";
/// The default routing header carrying a pinned upstream host (`ip:port`, or its base64 for
/// Envoy's stateful-session header override): the filter's `pin_header`, and what control's
/// replay listener reads to learn which pod failed.
pub const PIN: &str = "x-session-pod";
/// Request header naming the client's session id when the filter sends a request under
/// the backend's (`recovery.replay_by: envoy_retry`): control's replay listener finds the
/// session's record by it. Naming a session here gives a client nothing it could not do
/// by sending that id as `Mcp-Session-Id`.
pub const CLIENT_SESSION: &str = "x-mcp-affinity-session";
/// Response header of control's replay listener: where the session lives now
/// ([`crate::recover::Placement`]'s `Display`). Never reaches the client.
pub const RECOVERED_PIN: &str = "x-mcp-affinity-pin";
