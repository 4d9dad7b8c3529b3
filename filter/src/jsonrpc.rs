//! The little of JSON-RPC 2.0 the filter needs: what a request body is, and error bodies
//! for local replies.
//!
//! Sources: JSON-RPC 2.0 specification (request, notification, batch, error object);
//! MCP specification `basic/lifecycle` (`initialize` is the first request of a session)
//! and `basic/transports` (a POST body is one JSON-RPC message, or — in 2025-03-26 only —
//! a batch; `initialize` MUST NOT be part of a batch, yet we still recognise it there so
//! a non-conforming client is pinned rather than broken).

use serde::Deserialize;
use serde::de::IgnoredAny;

/// The JSON-RPC method that opens an MCP session.
pub const INITIALIZE: &str = "initialize";

/// What a POST body holds, as far as pinning is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// A JSON-RPC `initialize` request (alone, or inside a batch).
    Initialize,
    /// Valid JSON-RPC without `initialize` (or JSON of another shape).
    Other,
    /// Not JSON at all.
    Malformed,
}

/// One message; every field except `method` is skipped without allocation.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
}

/// Classifies a complete request body. Parses once for the common shapes (an object, or
/// a batch of objects) and allocates only for a batch's vector (and for a method name
/// with JSON escapes); any other shape is checked for JSON validity once more, so valid
/// JSON is never [`BodyKind::Malformed`]. Nesting deeper than serde_json's recursion limit
/// (128) is rejected as malformed, never a stack overflow.
pub fn classify(body: &[u8]) -> BodyKind {
    let first = body.iter().copied().find(|b| !b.is_ascii_whitespace());
    let is_initialize = match first {
        Some(b'{') => serde_json::from_slice::<Message>(body).map(|m| m.method.as_deref() == Some(INITIALIZE)),
        Some(b'[') => serde_json::from_slice::<Vec<Message>>(body).map(|batch| batch.iter().any(|m| m.method.as_deref() == Some(INITIALIZE))),
        _ => serde_json::from_slice::<IgnoredAny>(body).map(|_| false),
    };
    match is_initialize {
        Ok(true) => BodyKind::Initialize,
        Ok(false) => BodyKind::Other,
        // Valid JSON of another shape (e.g. a batch holding a non-object) is not JSON-RPC
        // we act on, but it is not malformed either.
        Err(_) if serde_json::from_slice::<IgnoredAny>(body).is_ok() => BodyKind::Other,
        Err(_) => BodyKind::Malformed,
    }
}

/// The `method` of a single JSON-RPC message, or `None` for a batch, a response or
/// malformed JSON.
pub fn method(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Message>(body).ok()?.method.map(|m| m.into_owned())
}

/// JSON-RPC error codes used in local replies.
pub mod code {
    /// JSON-RPC 2.0: "The JSON sent is not a valid Request object."
    pub const INVALID_REQUEST: i32 = -32600;
    /// JSON-RPC 2.0: "Invalid method parameter(s)." The MCP tasks extension's answer for
    /// a task id the server does not know.
    pub const INVALID_PARAMS: i32 = -32602;
    /// Convention of the MCP TypeScript SDK (not the spec) for "Session not found";
    /// clients and peers (ToolHive) recognise it.
    pub const SESSION_NOT_FOUND: i32 = -32001;
}

/// A JSON-RPC error response body `{"jsonrpc":"2.0","error":{"code":…,"message":…},"id":null}`.
///
/// `id` is `null`: the filter answers before (or without) reading the request body, so it
/// does not know the request id (JSON-RPC 2.0 allows `null` when the id is unknown).
pub fn error_body(code: i32, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0",
        "error": { "code": code, "message": message },
        "id": null,
    }))
    .expect("a JSON value serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_initialize_alone_and_in_batch() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}"#;
        assert_eq!(classify(init), BodyKind::Initialize);
        assert_eq!(classify(b" \n[{\"jsonrpc\":\"2.0\",\"method\":\"notifications/x\"},{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"method\":\"initialize\"}]"), BodyKind::Initialize);
        // Escaped method names are decoded.
        assert_eq!(classify(br#"{"id":1,"method":"initi\u0061lize"}"#), BodyKind::Initialize);
    }

    #[test]
    fn other_messages_are_not_initialize() {
        assert_eq!(classify(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"initialize"}}"#), BodyKind::Other);
        assert_eq!(classify(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#), BodyKind::Other);
        assert_eq!(classify(br#"{"method":42}"#), BodyKind::Other);
        assert_eq!(classify(br#"[]"#), BodyKind::Other);
        assert_eq!(classify(br#""initialize""#), BodyKind::Other);
    }

    #[test]
    fn malformed_json_is_reported() {
        assert_eq!(classify(b"{\"method\":\"initialize\""), BodyKind::Malformed);
        assert_eq!(classify(b"not json"), BodyKind::Malformed);
        assert_eq!(classify(b""), BodyKind::Malformed);
        assert_eq!(classify(b"[{\"method\":\"initialize\"},"), BodyKind::Malformed);
    }

    #[test]
    fn method_of_single_messages() {
        assert_eq!(method(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call"}"#).as_deref(), Some("tools/call"));
        assert_eq!(method(br#"[{"method":"ping"}]"#), None);
        assert_eq!(method(b"{"), None);
    }

    #[test]
    fn error_body_shape() {
        let v: serde_json::Value = serde_json::from_slice(&error_body(-32001, "Session not found")).unwrap();
        assert_eq!(v, serde_json::json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":null}));
    }
}
