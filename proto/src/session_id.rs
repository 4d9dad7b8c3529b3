//! Validation of MCP session ids.
//!
//! Source: MCP specification, `basic/transports` (2025-03-26 and later), "Session
//! Management": the session id "SHOULD only contain visible ASCII characters (ranging from
//! 0x21 to 0x7E)". We enforce it (and a length bound) because the id becomes a shared-data
//! key, a control-service path segment and a header value.

/// The longest session id accepted, in bytes. UUIDs (36 bytes) and JWT-like ids fit easily;
/// longer values are rejected so one request cannot make the filter store a large key.
pub const MAX_SESSION_ID_LEN: usize = 256;

/// Why a session id was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidSessionId {
    /// The header value is empty.
    Empty,
    /// Longer than the configured bound (bytes).
    TooLong { len: usize, max: usize },
    /// A byte outside visible ASCII 0x21–0x7E, at this offset.
    InvalidByte { offset: usize, byte: u8 },
}

impl std::fmt::Display for InvalidSessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "Mcp-Session-Id is empty"),
            Self::TooLong { len, max } => {
                write!(f, "Mcp-Session-Id is {len} bytes long; at most {max} are accepted")
            }
            Self::InvalidByte { offset, byte } => write!(
                f,
                "Mcp-Session-Id has byte 0x{byte:02x} at offset {offset}; only visible ASCII (0x21-0x7E) is allowed"
            ),
        }
    }
}

impl std::error::Error for InvalidSessionId {}

/// Checks `id` against the MCP rule (visible ASCII 0x21–0x7E) and `max_len` (bytes).
///
/// Returns the id as `&str` (valid ASCII is valid UTF-8). No allocation.
pub fn validate(id: &[u8], max_len: usize) -> Result<&str, InvalidSessionId> {
    if id.is_empty() {
        return Err(InvalidSessionId::Empty);
    }
    if id.len() > max_len {
        return Err(InvalidSessionId::TooLong { len: id.len(), max: max_len });
    }
    if let Some(offset) = id.iter().position(|b| !(0x21..=0x7e).contains(b)) {
        return Err(InvalidSessionId::InvalidByte { offset, byte: id[offset] });
    }
    // Every byte is ASCII, hence UTF-8.
    Ok(std::str::from_utf8(id).expect("visible ASCII is UTF-8"))
}

/// True when `id` is a valid session id within [`MAX_SESSION_ID_LEN`].
pub fn is_valid(id: &str) -> bool {
    validate(id.as_bytes(), MAX_SESSION_ID_LEN).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuid_and_visible_ascii() {
        assert_eq!(validate(b"0b6f2a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b", 256), Ok("0b6f2a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"));
        assert_eq!(validate(b"!~", 256), Ok("!~"));
    }

    #[test]
    fn rejects_empty_long_and_invisible() {
        assert_eq!(validate(b"", 256), Err(InvalidSessionId::Empty));
        assert_eq!(validate(&[b'a'; 257], 256), Err(InvalidSessionId::TooLong { len: 257, max: 256 }));
        assert_eq!(validate(b"ab c", 256), Err(InvalidSessionId::InvalidByte { offset: 2, byte: b' ' }));
        assert_eq!(validate(b"a\x7f", 256), Err(InvalidSessionId::InvalidByte { offset: 1, byte: 0x7f }));
        assert_eq!(validate("é".as_bytes(), 256), Err(InvalidSessionId::InvalidByte { offset: 0, byte: 0xc3 }));
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let msg = validate(b"a b", 256).unwrap_err().to_string();
        assert!(msg.contains("0x20") && msg.contains("offset 1"), "{msg}");
    }
}
