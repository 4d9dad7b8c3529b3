//! The session record (schema version 1) and the request bodies that create and update
//! it. Pure data and pure functions: the stores and the HTTP layer share this logic.

use serde::{Deserialize, Serialize};

use crate::session_id::{SessionId, is_valid_session_id};

/// Schema version written into every record (`"version": 1`).
pub const RECORD_VERSION: u32 = 1;

/// Longest accepted `upstream` and `protocol_version`, in bytes.
pub const MAX_SHORT_FIELD_LEN: usize = 256;

/// One MCP session as stored by control. JSON shape (times are Unix milliseconds):
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
    /// The session id the upstream pod knows; equal to `session_id` until a recovery.
    pub backend_session_id: String,
    /// The pinned upstream, `ip:port`.
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

/// Body of `PUT /v1/sessions/{id}`: create or replace a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSession {
    /// Backend session id; defaults to the client's id.
    #[serde(default)]
    pub backend_session_id: Option<String>,
    /// Pinned upstream, `ip:port` (1..=256 bytes of visible ASCII).
    pub upstream: String,
    /// Generation to store; defaults to 1. Must be ≥ 1.
    #[serde(default)]
    pub generation: Option<u64>,
    /// Raw JSON text of the `initialize` request body (must parse as JSON).
    pub initialize: String,
    /// Raw JSON text of `notifications/initialized` (must parse as JSON when given).
    #[serde(default)]
    pub initialized: Option<String>,
    /// Negotiated protocol version (1..=256 bytes of visible ASCII when given).
    #[serde(default)]
    pub protocol_version: Option<String>,
}

/// Most records one `POST /v1/sessions` may carry.
pub const MAX_BATCH_RECORDS: usize = 1024;

/// Body of `POST /v1/sessions`: many new records at once, keyed by (unencoded) session id,
/// each created as `PUT /v1/sessions/{id}?if_generation=0` would be (only where no record
/// exists). The filter sends the records of the `initialize` answers of a few
/// milliseconds in one request (`control.record_flush_ms`), instead of one request per
/// session; a batch sent again after a failure never overwrites a newer record (say, one
/// a recovery re-pinned meanwhile).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSessions {
    /// Session id → record, at most [`MAX_BATCH_RECORDS`].
    pub records: std::collections::BTreeMap<String, PutSession>,
}

/// Answer of `POST /v1/sessions` (200): how many records were created, how many were
/// kept because a record of that id existed already, and why each of the others was not
/// written (by session id; its `code` is one of the API's error codes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutSessionsAnswer {
    pub written: usize,
    pub kept: usize,
    pub rejected: std::collections::BTreeMap<String, Rejected>,
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
    #[serde(default)]
    pub initialized: Option<String>,
    /// Negotiated protocol version; replaces the stored one when given.
    #[serde(default)]
    pub protocol_version: Option<String>,
}

/// The precondition of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutCondition {
    /// Write whatever is stored.
    Always,
    /// Write only if the stored generation equals this; `0` means "only if absent".
    IfGeneration(u64),
}

impl PutCondition {
    /// Whether a write may proceed given the current record (`None` = absent).
    pub fn holds(self, current: Option<&SessionRecord>) -> bool {
        match (self, current) {
            (PutCondition::Always, _) => true,
            (PutCondition::IfGeneration(0), None) => true,
            (PutCondition::IfGeneration(_), None) => false,
            (PutCondition::IfGeneration(g), Some(r)) => r.generation == g,
        }
    }
}

/// A field of a request body that failed validation; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidField(pub String);

fn check_short(name: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() || value.len() > MAX_SHORT_FIELD_LEN || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(InvalidField(format!(
            "`{name}` must be 1..={MAX_SHORT_FIELD_LEN} bytes of visible ASCII"
        )));
    }
    Ok(())
}

fn check_json(name: &str, value: &str) -> Result<(), InvalidField> {
    serde_json::from_str::<serde::de::IgnoredAny>(value)
        .map(|_| ())
        .map_err(|e| InvalidField(format!("`{name}` must be JSON text: {e}")))
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
            && !is_valid_session_id(b)
        {
            return Err(InvalidField(
                "`backend_session_id` must be 1..=256 bytes of visible ASCII".into(),
            ));
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

    /// The record this body produces for session `id` at `now_ms`, replacing `current`
    /// (whose `created_at_ms` is kept) or creating a new one.
    pub fn to_record(&self, id: &SessionId, now_ms: u64, current: Option<&SessionRecord>) -> SessionRecord {
        SessionRecord {
            version: RECORD_VERSION,
            session_id: id.as_str().to_string(),
            backend_session_id: self.backend_session_id.clone().unwrap_or_else(|| id.as_str().to_string()),
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
mod tests {
    use super::*;

    fn put() -> PutSession {
        PutSession {
            backend_session_id: None,
            upstream: "127.0.0.1:8081".into(),
            generation: None,
            initialize: r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#.into(),
            initialized: None,
            protocol_version: None,
        }
    }

    #[test]
    fn defaults_backend_id_and_generation_and_keeps_created_at() {
        let id = SessionId::parse("s1").unwrap();
        let first = put().to_record(&id, 1000, None);
        assert_eq!(first.backend_session_id, "s1");
        assert_eq!(first.generation, 1);
        assert_eq!((first.created_at_ms, first.last_seen_ms), (1000, 1000));
        let mut p = put();
        p.generation = Some(2);
        p.backend_session_id = Some("b2".into());
        let second = p.to_record(&id, 2000, Some(&first));
        assert_eq!((second.created_at_ms, second.last_seen_ms), (1000, 2000));
        assert_eq!((second.generation, second.backend_session_id.as_str()), (2, "b2"));
    }

    #[test]
    fn condition_semantics() {
        let id = SessionId::parse("s1").unwrap();
        let r = put().to_record(&id, 1, None);
        assert!(PutCondition::Always.holds(None));
        assert!(PutCondition::Always.holds(Some(&r)));
        assert!(PutCondition::IfGeneration(0).holds(None));
        assert!(!PutCondition::IfGeneration(0).holds(Some(&r)));
        assert!(PutCondition::IfGeneration(1).holds(Some(&r)));
        assert!(!PutCondition::IfGeneration(1).holds(None));
        assert!(!PutCondition::IfGeneration(2).holds(Some(&r)));
    }

    #[test]
    fn validation() {
        assert!(put().validate().is_ok());
        let mut p = put();
        p.generation = Some(0);
        assert!(p.validate().unwrap_err().0.contains("generation"));
        let mut p = put();
        p.upstream = "".into();
        assert!(p.validate().unwrap_err().0.contains("upstream"));
        let mut p = put();
        p.initialize = "{not json".into();
        assert!(p.validate().unwrap_err().0.contains("initialize"));
        let mut p = put();
        p.backend_session_id = Some("has space".into());
        assert!(p.validate().unwrap_err().0.contains("backend_session_id"));
        assert!(PatchSession { initialized: Some("nope".into()), protocol_version: None }.validate().is_err());
    }

    #[test]
    fn patch_touches_and_fills() {
        let id = SessionId::parse("s1").unwrap();
        let r = put().to_record(&id, 1000, None);
        let p = PatchSession { initialized: Some("{}".into()), protocol_version: Some("2025-06-18".into()) };
        let out = p.apply(&r, 1500);
        assert_eq!(out.last_seen_ms, 1500);
        assert_eq!(out.initialized.as_deref(), Some("{}"));
        assert_eq!(out.protocol_version.as_deref(), Some("2025-06-18"));
        assert_eq!(out.created_at_ms, 1000);
        // An empty patch only touches; time never goes backwards.
        let out2 = PatchSession::default().apply(&out, 1200);
        assert_eq!(out2.last_seen_ms, 1500);
        assert_eq!(out2.initialized.as_deref(), Some("{}"));
    }

    #[test]
    fn record_json_shape() {
        let id = SessionId::parse("s1").unwrap();
        let r = put().to_record(&id, 7, None);
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "version", "session_id", "backend_session_id", "upstream", "generation", "initialize",
            "initialized", "protocol_version", "created_at_ms", "last_seen_ms",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert_eq!(keys.len(), 10);
        assert_eq!(v["version"], 1);
        assert!(v["initialized"].is_null());
    }
}
