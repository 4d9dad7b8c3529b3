//! Session id validation, the contract crate's rule (`mcp_affinity_proto::session_id`): an MCP session id is 1..=256 bytes of
//! visible ASCII (0x21–0x7E).

use std::fmt;

/// Longest accepted session id, in bytes (the filter's bound).
pub const MAX_SESSION_ID_LEN: usize = mcp_affinity_proto::session_id::MAX_SESSION_ID_LEN;

/// A validated MCP session id (1..=256 bytes, each 0x21–0x7E).
///
/// Constructed only through [`SessionId::parse`], so holding one proves the id is valid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

/// Why a string is not a valid session id: the contract crate's error, so both sides apply
/// one rule (MCP `basic/transports`, session management).
pub use mcp_affinity_proto::session_id::InvalidSessionId;

/// True when `s` is 1..=256 bytes of visible ASCII (the contract crate's rule).
pub fn is_valid_session_id(s: &str) -> bool {
    validate(s).is_ok()
}

fn validate(s: &str) -> Result<(), InvalidSessionId> {
    mcp_affinity_proto::session_id::validate(s.as_bytes(), MAX_SESSION_ID_LEN).map(|_| ())
}

impl SessionId {
    /// Validates `s` as a session id.
    ///
    /// # Errors
    /// [`InvalidSessionId`] when `s` is empty, longer than 256 bytes, or holds a byte
    /// outside 0x21–0x7E.
    pub fn parse(s: &str) -> Result<Self, InvalidSessionId> {
        validate(s)?;
        Ok(SessionId(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The rule itself is tested in the filter (`session_id`); here: the newtype applies it.
    #[test]
    fn parse_applies_the_shared_rule() {
        assert_eq!(SessionId::parse("!~/%?#{}").unwrap().as_str(), "!~/%?#{}");
        assert!(SessionId::parse(&"x".repeat(256)).is_ok());
        assert_eq!(SessionId::parse(""), Err(InvalidSessionId::Empty));
        assert_eq!(SessionId::parse(&"x".repeat(257)), Err(InvalidSessionId::TooLong { len: 257, max: 256 }));
        assert_eq!(SessionId::parse("ab c"), Err(InvalidSessionId::InvalidByte { offset: 2, byte: b' ' }));
    }
}
