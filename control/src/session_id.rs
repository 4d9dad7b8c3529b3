//! Session id validation, identical to the filter's: an MCP session id is 1..=256 bytes of
//! visible ASCII (0x21–0x7E).

use std::fmt;

/// Longest accepted session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 256;

/// A validated MCP session id (1..=256 bytes, each 0x21–0x7E).
///
/// Constructed only through [`SessionId::parse`], so holding one proves the id is valid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

/// Why a string is not a valid session id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSessionId {
    /// The id is empty.
    #[error("session id is empty")]
    Empty,
    /// The id is longer than [`MAX_SESSION_ID_LEN`] bytes.
    #[error("session id is longer than {MAX_SESSION_ID_LEN} bytes")]
    TooLong,
    /// The id holds a byte outside visible ASCII (0x21–0x7E); `position` is its byte index.
    #[error("session id byte {position} is not visible ASCII (0x21-0x7E)")]
    NotVisibleAscii {
        /// Byte index of the first offending byte.
        position: usize,
    },
}

/// True when `s` is 1..=256 bytes of visible ASCII. The same rule as the filter's.
pub fn is_valid_session_id(s: &str) -> bool {
    validate(s).is_ok()
}

fn validate(s: &str) -> Result<(), InvalidSessionId> {
    if s.is_empty() {
        return Err(InvalidSessionId::Empty);
    }
    if s.len() > MAX_SESSION_ID_LEN {
        return Err(InvalidSessionId::TooLong);
    }
    match s.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        Some(position) => Err(InvalidSessionId::NotVisibleAscii { position }),
        None => Ok(()),
    }
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

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_visible_ascii_up_to_256_bytes() {
        assert!(SessionId::parse("a").is_ok());
        assert!(SessionId::parse("!~/%?#{}").is_ok());
        assert!(SessionId::parse(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_invisible() {
        assert_eq!(SessionId::parse(""), Err(InvalidSessionId::Empty));
        assert_eq!(SessionId::parse(&"x".repeat(257)), Err(InvalidSessionId::TooLong));
        assert_eq!(
            SessionId::parse("ab c"),
            Err(InvalidSessionId::NotVisibleAscii { position: 2 })
        );
        assert!(SessionId::parse("a\x7f").is_err());
        assert!(SessionId::parse("a\tb").is_err());
        assert!(SessionId::parse("é").is_err());
    }
}
