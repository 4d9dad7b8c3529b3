//! The contract between the mcp-affinity filter (`filter/`, a proxy-wasm module) and its
//! control service (`control/`): one definition of what crosses between them, used by both.
//!
//! - [`headers`]: the header names both sides read and write.
//! - [`session_id`]: what a valid MCP session id is (MCP `basic/transports`).
//! - [`sessions`]: the session record and the bodies of control's `/v1/sessions` API
//!   (create, batch create, touch), with their validation.
//! - [`draining`]: the draining upstream hosts (`/v1/upstreams/...`).
//! - [`tasks`]: task pins (MCP 2026-07-28 era, tasks extension; `/v1/tasks/...`).
//! - [`recover`]: the answer of `POST /v1/sessions/{id}/recover` and of control's replay
//!   listener — the outcome, where the session lives now ([`recover::Placement`], also the
//!   `x-mcp-affinity-pin` header value), and the answer for the client.
//!
//! serde types only, no I/O; each message has a round-trip test.
pub mod draining;
pub mod headers;
pub mod recover;
pub mod session_id;
pub mod sessions;
pub mod tasks;
