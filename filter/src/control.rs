//! Requests to and answers from the control service (`control/`, API under `/v1`), built
//! and parsed without the host so they are unit-tested natively.
//!
//! The shapes follow control's API (control/README.md): `GET|PATCH|DELETE
//! {prefix}/sessions/{id}`, `PUT {prefix}/sessions/{id}` with a session record body.

use serde::{Deserialize, Serialize};

/// `{prefix}/sessions/{percent-encoded id}`. Session ids are visible ASCII, which includes
/// `/`, `?`, `#` and `%`; everything outside RFC 3986 "unreserved" is percent-encoded.
pub fn session_path(prefix: &str, session_id: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 10 + session_id.len() * 3);
    p.push_str(prefix);
    p.push_str("/sessions/");
    p.push_str(&encode_segment(session_id));
    p
}

/// Percent-encodes every byte outside RFC 3986 "unreserved" (`A-Z a-z 0-9 - . _ ~`), for
/// one path segment.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Body of `PUT /v1/sessions/{id}`: a new session pinned to `upstream`.
#[derive(Debug, Serialize)]
pub struct PutSession<'a> {
    pub backend_session_id: &'a str,
    pub upstream: &'a str,
    pub generation: u64,
    /// The raw `initialize` request body (JSON text), replayed on recovery.
    pub initialize: &'a str,
}

/// Body of `PATCH /v1/sessions/{id}`: touches last-seen; records the
/// `notifications/initialized` body and the negotiated protocol version when given.
#[derive(Debug, Default, Serialize)]
pub struct PatchSession<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initialized: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<&'a str>,
}

/// The part of control's session record the filter uses (other fields are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RecordView {
    pub backend_session_id: String,
    pub upstream: String,
    pub generation: u64,
    #[serde(default)]
    pub initialized: Option<String>,
}

/// Parses a `GET /v1/sessions/{id}` 200 body. Errors are strings for logs.
pub fn parse_record(body: &[u8]) -> Result<RecordView, String> {
    let r: RecordView = serde_json::from_slice(body).map_err(|e| format!("control record: {e}"))?;
    if r.upstream.is_empty() || r.upstream.contains(' ') || r.backend_session_id.is_empty() || r.backend_session_id.contains(' ') {
        return Err("control record: empty or malformed upstream / backend_session_id".to_string());
    }
    Ok(r)
}

/// Serialises a request body.
pub fn to_body<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_reserved_characters() {
        assert_eq!(session_path("/v1", "abc-123_X.~"), "/v1/sessions/abc-123_X.~");
        assert_eq!(session_path("/v1", "a/b?c#d%e"), "/v1/sessions/a%2Fb%3Fc%23d%25e");
    }

    #[test]
    fn bodies() {
        let put = PutSession { backend_session_id: "s", upstream: "10.0.0.1:80", generation: 1, initialize: "{\"id\":1}" };
        assert_eq!(String::from_utf8(to_body(&put)).unwrap(), r#"{"backend_session_id":"s","upstream":"10.0.0.1:80","generation":1,"initialize":"{\"id\":1}"}"#);
        assert_eq!(to_body(&PatchSession::default()), b"{}");
        assert_eq!(to_body(&PatchSession { protocol_version: Some("2025-06-18"), ..Default::default() }), br#"{"protocol_version":"2025-06-18"}"#);
    }

    #[test]
    fn parses_records() {
        let r = parse_record(br#"{"version":1,"session_id":"c","backend_session_id":"b","upstream":"10.0.0.1:80","generation":2,"initialize":"{}","initialized":null,"protocol_version":null,"created_at_ms":1,"last_seen_ms":2}"#).unwrap();
        assert_eq!(r, RecordView { backend_session_id: "b".into(), upstream: "10.0.0.1:80".into(), generation: 2, initialized: None });
        assert!(parse_record(b"{}").is_err());
        assert!(parse_record(br#"{"backend_session_id":"b","upstream":"","generation":1}"#).is_err());
    }
}
