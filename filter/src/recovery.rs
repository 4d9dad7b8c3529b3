//! When a pinned session needs recovery, and what the filter sends to and gets from the
//! control service's `POST /v1/sessions/{id}/recover`.
//!
//! Triggers (on the response path of a request that carried a known session id):
//! - the router's local reply says the upstream could not be reached or reset: Envoy's
//!   `response.code_details` (e.g. `upstream_reset_before_response_started{remote_connection_failure}`)
//!   and `response.flags` bits (Envoy `include/envoy/stream_info/stream_info.h`,
//!   `ResponseFlag`: UH 0x2, UF 0x20, UC 0x40, UO 0x80);
//! - the upstream says the session is unknown: configured statuses (404, per MCP
//!   `basic/transports`);
//! - the upstream answers with a status whose JSON body may say so (400 with -32001, or
//!   -32000 "Bad Request: No valid session ID provided" as TypeScript-SDK servers answer).
//!   Envoy gives no body before the headers are decided, so control probes the session
//!   with these rules ([`SessionErrors`]) and answers `alive` or recovers it.
//!
//! With `recovery.replay_by: envoy_retry` ([`crate::config::ReplayBy::EnvoyRetry`]) none of
//! these triggers is the filter's: Envoy's route retries a connect failure or a 404 once, to
//! control's replay listener, and the filter only learns the new pin from the answer
//! ([`parse_recovered_pin`]).


pub use mcp_affinity_proto::recover::{ClientResponse, OriginalRequest, Outcome, Placement, Reason, RecoverAnswer, RecoverRequest, SessionErrors};

use crate::config::RecoveryConfig;

/// Envoy `ResponseFlag` bits the filter reads from `response.flags`.
pub mod flags {
    /// UH: no healthy upstream host (also the stateful-session `strict` 503).
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// UF: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// UC: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    /// UO: upstream overflow (circuit breaking).
    pub const UPSTREAM_OVERFLOW: u64 = 0x80;
}

/// Reads a router local reply. `details` is `response.code_details`, `flags` the
/// `response.flags` bit set. `None` for real upstream answers (`via_upstream`) and for
/// local replies that say nothing about the upstream.
pub fn local_reply_reason(details: &str, flags: u64) -> Option<Reason> {
    if details == "via_upstream" {
        return None;
    }
    let not_sent = flags::NO_HEALTHY_UPSTREAM | flags::UPSTREAM_CONNECTION_FAILURE | flags::UPSTREAM_OVERFLOW;
    if flags & not_sent != 0
        || details.contains("remote_connection_failure")
        || details.contains("overflow")
        || details.contains("no_healthy_upstream")
    {
        return Some(Reason::ConnectFailure);
    }
    if flags & flags::UPSTREAM_CONNECTION_TERMINATION != 0 || details.starts_with("upstream_reset_before_response_started") {
        return Some(Reason::ResetAfterSend);
    }
    None
}

/// What a response status says about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVerdict {
    /// The status alone says the session is unknown.
    SessionUnknown,
    /// Look at a small JSON body to decide.
    InspectBody,
    /// Nothing to recover.
    Fine,
}

/// Classifies an upstream status per the configuration.
pub fn status_verdict(cfg: &RecoveryConfig, status: u16) -> StatusVerdict {
    if cfg.session_unknown_statuses.contains(&status) {
        StatusVerdict::SessionUnknown
    } else if cfg.error_body_statuses.contains(&status) {
        StatusVerdict::InspectBody
    } else {
        StatusVerdict::Fine
    }
}

/// The plugin configuration's "session unknown" rules, as control's probe applies them.
pub fn session_errors(cfg: &RecoveryConfig) -> SessionErrors {
    SessionErrors {
        statuses: cfg.session_unknown_statuses.clone(),
        body_statuses: cfg.error_body_statuses.clone(),
        codes: cfg.session_unknown_codes.clone(),
        message_codes: cfg.message_codes.clone(),
        message_patterns: cfg.message_patterns.clone(),
    }
}

/// Parses control's replay-listener header ([`crate::headers::RECOVERED_PIN`],
/// [`Placement`]'s `FromStr`).
///
/// # Errors
/// A message naming what is wrong; the caller ignores the header.
pub fn parse_recovered_pin(value: &[u8]) -> Result<Placement, String> {
    std::str::from_utf8(value).map_err(|_| "recovered pin: not UTF-8".to_string())?.parse().map_err(|e| format!("recovered pin: {e}"))
}

/// Parses a recover answer and checks it ([`RecoverAnswer::check`]).
///
/// # Errors
/// Not JSON of that shape, or incoherent; the caller lets the upstream's answer through.
pub fn parse_answer(body: &[u8]) -> Result<RecoverAnswer, String> {
    let a: RecoverAnswer = serde_json::from_slice(body).map_err(|e| format!("recover answer: {e}"))?;
    a.check()?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_replies() {
        assert_eq!(local_reply_reason("via_upstream", 0), None);
        assert_eq!(local_reply_reason("upstream_reset_before_response_started{remote_connection_failure}", 0x20), Some(Reason::ConnectFailure));
        assert_eq!(local_reply_reason("no_healthy_upstream", 0x2), Some(Reason::ConnectFailure));
        assert_eq!(local_reply_reason("upstream_reset_before_response_started{overflow}", 0x80), Some(Reason::ConnectFailure));
        assert_eq!(local_reply_reason("upstream_reset_before_response_started{connection_termination}", 0x40), Some(Reason::ResetAfterSend));
        assert_eq!(local_reply_reason("wasm_local_reply", 0), None);
        assert_eq!(local_reply_reason("request_overall_timeout", 0), None);
    }

    #[test]
    fn statuses_and_bodies() {
        let cfg = RecoveryConfig::default();
        assert_eq!(status_verdict(&cfg, 404), StatusVerdict::SessionUnknown);
        assert_eq!(status_verdict(&cfg, 400), StatusVerdict::InspectBody);
        assert_eq!(status_verdict(&cfg, 200), StatusVerdict::Fine);
        assert_eq!(status_verdict(&cfg, 500), StatusVerdict::Fine);
    }

    #[test]
    fn answers() {
        let a = parse_answer(br#"{"outcome":"replayed","pin":{"upstream":"10.0.0.2:80","backend_session_id":"b2","generation":2},"response":{"status":200,"content_type":"text/event-stream","body":"data: {}\n\n"}}"#).unwrap();
        assert_eq!(a.outcome, Outcome::Replayed);
        assert_eq!(a.pin.unwrap().generation, 2);
        let f = parse_answer(br#"{"outcome":"failed","pin":null,"response":{"status":404,"content_type":"application/json","body":"{}"}}"#).unwrap();
        assert_eq!((f.outcome, f.pin), (Outcome::Failed, None));
        assert!(parse_answer(br#"{"outcome":"replayed","pin":{"upstream":"a b","backend_session_id":"b","generation":2},"response":{"status":200}}"#).is_err());
        assert!(parse_answer(br#"{"outcome":"weird","pin":null,"response":{"status":200}}"#).is_err());
        assert_eq!(parse_answer(br#"{"outcome":"alive","pin":{"upstream":"10.0.0.1:80","backend_session_id":"b","generation":1}}"#).unwrap().outcome, Outcome::Alive);
        assert!(parse_answer(br#"{"outcome":"replayed","pin":null}"#).is_err(), "a recovery answer needs a response");
        let m = parse_answer(br#"{"outcome":"moved","pin":{"upstream":"10.0.0.3:80","backend_session_id":"b3","generation":3},"response":null}"#).unwrap();
        assert_eq!((m.outcome, m.pin.unwrap().generation), (Outcome::Moved, 3));
        assert!(parse_answer(br#"{"outcome":"moved","pin":null,"response":null}"#).is_err(), "moved needs a pin");
        assert_eq!(parse_answer(br#"{"outcome":"stayed","pin":{"upstream":"10.0.0.1:80","backend_session_id":"b","generation":1},"response":null}"#).unwrap().outcome, Outcome::Stayed);
    }

    #[test]
    fn recovered_pin_header() {
        let p = parse_recovered_pin(b"10.0.0.2:80 b-2 3").unwrap();
        assert_eq!(p, Placement { upstream: "10.0.0.2:80".into(), backend_session_id: "b-2".into(), generation: 3 });
        for bad in [&b"10.0.0.2:80 b-2"[..], b"10.0.0.2:80 b-2 3 x", b" b-2 3", b"10.0.0.2:80  3", b"10.0.0.2:80 b-2 0", b"10.0.0.2:80 b-2 -1", b"10.0.0.2:80 b\x01 3", b"\xff 1 1"] {
            assert!(parse_recovered_pin(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
