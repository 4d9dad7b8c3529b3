//! Session records and the bodies that create and update them: control's
//! `/v1/sessions` API (`docs/control-api.md`), written by the filter (new sessions'
//! records, touches, `notifications/initialized`) and read back on a lookup.
//!
//! Validation lives here too, so the filter and control apply one rule; control answers
//! a body that fails it with 400 `invalid_body` naming the field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::session_id;

/// Schema version written into every record (`"version": 1`).
pub const RECORD_VERSION: u32 = 1;

/// Longest accepted `upstream` and `protocol_version`, in bytes.
pub const MAX_SHORT_FIELD_LEN: usize = 256;

/// Most records one `POST /v1/sessions` may carry.
pub const MAX_BATCH_RECORDS: usize = 1024;

/// `{prefix}/sessions/{percent-encoded id}`: the path of one session's record.
pub fn session_path(prefix: &str, session_id: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 10 + session_id.len() * 3);
    p.push_str(prefix);
    p.push_str("/sessions/");
    push_encoded(&mut p, session_id);
    p
}

/// One path segment, percent-encoded: session ids are visible ASCII, which includes `/`,
/// `?`, `#` and `%`; every byte outside RFC 3986 "unreserved" (`A-Z a-z 0-9 - . _ ~`) is
/// encoded.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() * 3);
    push_encoded(&mut out, segment);
    out
}

fn push_encoded(out: &mut String, segment: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

/// One MCP session as stored by control (`GET /v1/sessions/{id}` answers it). JSON shape
/// (times are Unix milliseconds):
///
/// ```json
/// {"version":1,"session_id":"abc","backend_session_id":"abc","upstream":"10.0.0.7:8080",
///  "generation":1,"initialize":"{\"jsonrpc\":\"2.0\",...}","initialized":null,
///  "protocol_version":"2025-06-18","created_at_ms":1700000000000,"last_seen_ms":1700000000000}
/// ```
///
/// No credentials are ever part of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Schema version of this record ([`RECORD_VERSION`]).
    pub version: u32,
    /// The session id the client holds (`Mcp-Session-Id` as the client sends it).
    pub session_id: String,
    /// The session id the upstream host knows; equal to `session_id` until a recovery.
    pub backend_session_id: String,
    /// The pinned upstream host, `ip:port`.
    pub upstream: String,
    /// Pin generation: 1 at creation, +1 on every re-pin. Compare-and-set key.
    pub generation: u64,
    /// Raw JSON text of the client's `initialize` request body.
    pub initialize: String,
    /// Raw JSON text of `notifications/initialized`, once seen.
    pub initialized: Option<String>,
    /// The negotiated `MCP-Protocol-Version`, once known.
    pub protocol_version: Option<String>,
    /// When control first stored the session (Unix ms). Kept across replacements.
    pub created_at_ms: u64,
    /// Last create, replace or touch (Unix ms).
    pub last_seen_ms: u64,
}

impl SessionRecord {
    /// Parses and [checks](SessionRecord::check) a record (a `GET /v1/sessions/{id}` 200 body).
    ///
    /// # Errors
    /// [`InvalidField`] saying what is wrong: not a record, or a field that fails the check.
    pub fn parse(body: &[u8]) -> Result<SessionRecord, InvalidField> {
        let record: SessionRecord = serde_json::from_slice(body).map_err(|e| InvalidField(format!("not a session record: {e}")))?;
        record.check()?;
        Ok(record)
    }

    /// Checks what a reader routes by: `upstream` and `backend_session_id` are non-empty
    /// visible ASCII (a record from a shared store is input like any other).
    ///
    /// # Errors
    /// [`InvalidField`] naming the field.
    pub fn check(&self) -> Result<(), InvalidField> {
        check_short("upstream", &self.upstream)?;
        if !session_id::is_valid(&self.backend_session_id) {
            return Err(InvalidField("`backend_session_id` must be 1..=256 bytes of visible ASCII".into()));
        }
        Ok(())
    }
}

/// Body of `PUT /v1/sessions/{id}` (create or replace a record) and the elements of
/// [`PutSessions`]. Only `upstream` and `initialize` are required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSession {
    /// Backend session id; defaults to the client's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_session_id: Option<String>,
    /// Pinned upstream host, `ip:port` (1..=256 bytes of visible ASCII).
    pub upstream: String,
    /// Generation to store; defaults to 1. Must be ≥ 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Raw JSON text of the `initialize` request body (must parse as JSON).
    pub initialize: String,
    /// Raw JSON text of `notifications/initialized` (must parse as JSON when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialized: Option<String>,
    /// Negotiated protocol version (1..=256 bytes of visible ASCII when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
}

/// Body of `POST /v1/sessions`: many new records at once, keyed by (unencoded) session id,
/// each created as `PUT /v1/sessions/{id}?if_generation=0` would be (only where no record
/// exists). The filter sends the records of the `initialize` answers of a few
/// milliseconds in one request (`control.record_flush_ms`); a batch sent again after a
/// failure never overwrites a newer record (say, one a recovery re-pinned meanwhile).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSessions {
    /// Session id → record, at most [`MAX_BATCH_RECORDS`].
    pub records: BTreeMap<String, PutSession>,
}

impl PutSessions {
    /// The JSON body of a batch of borrowed records: the same text as serialising a
    /// [`PutSessions`] of them, without copying a record.
    pub fn body<'a>(records: impl IntoIterator<Item = (&'a str, &'a PutSession)>) -> Vec<u8> {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            records: BTreeMap<&'a str, &'a PutSession>,
        }
        serde_json::to_vec(&Borrowed { records: records.into_iter().collect() }).expect("strings and numbers serialise")
    }
}

/// Answer of `POST /v1/sessions` (200): how many records were created, how many were
/// kept because a record of that id existed already, and why each of the others was not
/// written (by session id; its `code` is one of the API's error codes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutSessionsAnswer {
    pub written: usize,
    #[serde(default)]
    pub kept: usize,
    #[serde(default)]
    pub rejected: BTreeMap<String, Rejected>,
}

/// Why one record of a batch was not written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub code: String,
    pub message: String,
}

/// Body of `PATCH /v1/sessions/{id}`: touch the record and fill in late fields. An empty
/// body is the same as `{}` (touch only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchSession {
    /// Raw JSON text of `notifications/initialized`; replaces the stored one when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialized: Option<String>,
    /// Negotiated protocol version; replaces the stored one when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
}

/// A field of a body or record that failed validation; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidField(pub String);

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidField {}

fn check_short(name: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() || value.len() > MAX_SHORT_FIELD_LEN || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(InvalidField(format!("`{name}` must be 1..={MAX_SHORT_FIELD_LEN} bytes of visible ASCII")));
    }
    Ok(())
}

fn check_json(name: &str, value: &str) -> Result<(), InvalidField> {
    serde_json::from_str::<serde::de::IgnoredAny>(value).map(|_| ()).map_err(|e| InvalidField(format!("`{name}` must be JSON text: {e}")))
}

impl PutSession {
    /// Checks field contents: `backend_session_id` follows the session id rule,
    /// `upstream` and `protocol_version` are short visible ASCII, `generation` ≥ 1,
    /// `initialize` and `initialized` are JSON text.
    ///
    /// # Errors
    /// [`InvalidField`] naming the first offending field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let Some(b) = &self.backend_session_id
            && !session_id::is_valid(b)
        {
            return Err(InvalidField("`backend_session_id` must be 1..=256 bytes of visible ASCII".into()));
        }
        check_short("upstream", &self.upstream)?;
        if self.generation == Some(0) {
            return Err(InvalidField("`generation` must be at least 1".into()));
        }
        check_json("initialize", &self.initialize)?;
        if let Some(i) = &self.initialized {
            check_json("initialized", i)?;
        }
        if let Some(p) = &self.protocol_version {
            check_short("protocol_version", p)?;
        }
        Ok(())
    }

    /// The record this body produces for the (valid) session id `session_id` at `now_ms`,
    /// replacing `current` (whose `created_at_ms` is kept) or creating a new one.
    pub fn to_record(&self, session_id: &(impl AsRef<str> + ?Sized), now_ms: u64, current: Option<&SessionRecord>) -> SessionRecord {
        let session_id = session_id.as_ref();
        SessionRecord {
            version: RECORD_VERSION,
            session_id: session_id.to_string(),
            backend_session_id: self.backend_session_id.clone().unwrap_or_else(|| session_id.to_string()),
            upstream: self.upstream.clone(),
            generation: self.generation.unwrap_or(1),
            initialize: self.initialize.clone(),
            initialized: self.initialized.clone(),
            protocol_version: self.protocol_version.clone(),
            created_at_ms: current.map_or(now_ms, |c| c.created_at_ms),
            last_seen_ms: now_ms,
        }
    }
}

impl PatchSession {
    /// Checks field contents like [`PutSession::validate`].
    ///
    /// # Errors
    /// [`InvalidField`] naming the first offending field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let Some(i) = &self.initialized {
            check_json("initialized", i)?;
        }
        if let Some(p) = &self.protocol_version {
            check_short("protocol_version", p)?;
        }
        Ok(())
    }

    /// `record` touched at `now_ms` with the given fields filled in.
    pub fn apply(&self, record: &SessionRecord, now_ms: u64) -> SessionRecord {
        let mut out = record.clone();
        if let Some(i) = &self.initialized {
            out.initialized = Some(i.clone());
        }
        if let Some(p) = &self.protocol_version {
            out.protocol_version = Some(p.clone());
        }
        out.last_seen_ms = now_ms.max(record.last_seen_ms);
        out
    }
}

#[cfg(test)]
mod tests;
