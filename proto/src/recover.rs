//! Recovery's shared vocabulary: the filter's request (`POST /v1/sessions/{id}/recover`:
//! why it asks, the client's request, how the pods say "session unknown"), and control's answer (that endpoint's 200 body, or the headers of
//! its replay listener's answer). Control's API: `docs/recovery.md`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::session_id;

/// Why a request is recovered; decides whether control may replay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The upstream could not be reached; the request was not sent (connect failure,
    /// overflow, no healthy host).
    ConnectFailure,
    /// The connection reset after the request was (or may have been) sent.
    ResetAfterSend,
    /// The upstream answered that it does not know the session; the request did not run.
    SessionUnknown,
    /// The upstream answered an error status whose body may say "session unknown" (HTTP 400
    /// with a JSON body, as TypeScript-SDK servers answer). The filter cannot read that
    /// body before deciding on the headers in Envoy, so control probes the pinned upstream
    /// first: alive → [`Outcome::Alive`]; unknown → handled as [`Reason::SessionUnknown`].
    SessionSuspect,
    /// Not a failure: the pinned upstream is draining (a pod about to stop). Control moves
    /// the session to a live pod before the request is sent; nothing is replayed, the
    /// answer is [`Outcome::Moved`] or [`Outcome::Stayed`].
    Draining,
}

/// The client's request as the filter saw it (rule: the request headers are readable only
/// in their own callback, so the filter keeps what control needs).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalRequest {
    /// `POST` or `GET` (`DELETE` is never recovered).
    pub method: String,
    /// Path and query, e.g. `/mcp?x=1`.
    pub path: String,
    /// `:authority` / `Host`, sent as `Host` to the pod.
    #[serde(default)]
    pub authority: Option<String>,
    /// `Content-Type`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `Accept`.
    #[serde(default)]
    pub accept: Option<String>,
    /// `MCP-Protocol-Version`.
    #[serde(default)]
    pub protocol_version: Option<String>,
    /// `Authorization` of this request: used for the calls to the pod on the client's
    /// behalf, never stored or logged (`Debug` redacts it).
    #[serde(default)]
    pub authorization: Option<String>,
    /// The raw request body (JSON text; empty for GET, and when not `body_complete`).
    #[serde(default)]
    pub body: String,
    /// `body` is the whole body the client sent (the filter saw its end, it matches
    /// `content-length`, it is UTF-8). `false`: control recovers the session but never
    /// replays the request, and tells the client it did not run. Absent: `true`.
    #[serde(default = "whole_by_default")]
    pub body_complete: bool,
}

fn whole_by_default() -> bool {
    true
}

impl fmt::Debug for OriginalRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginalRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("authority", &self.authority)
            .field("content_type", &self.content_type)
            .field("accept", &self.accept)
            .field("protocol_version", &self.protocol_version)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("body_len", &self.body.len())
            .field("body_complete", &self.body_complete)
            .finish()
    }
}

/// How an MCP server says "I do not know this session" (the filter's plugin configuration,
/// `recovery.*`): control's probe and recovery apply these rules. Seen in the wild: HTTP 404
/// (MCP `basic/transports`), 400 with JSON-RPC -32000 "Bad Request: No valid session ID
/// provided" (TypeScript-SDK servers), -32001 "Session not found".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionErrors {
    /// Statuses that by themselves mean "session unknown".
    pub statuses: Vec<u16>,
    /// Statuses whose JSON-RPC error body is inspected.
    pub body_statuses: Vec<u16>,
    /// JSON-RPC error codes that mean "session unknown".
    pub codes: Vec<i64>,
    /// JSON-RPC error codes whose message is matched against `message_patterns`.
    pub message_codes: Vec<i64>,
    /// Case-insensitive substrings of such a message.
    pub message_patterns: Vec<String>,
}

impl Default for SessionErrors {
    fn default() -> Self {
        SessionErrors {
            statuses: vec![404],
            body_statuses: vec![400],
            codes: vec![-32001],
            message_codes: vec![-32000],
            message_patterns: vec!["session".to_string()],
        }
    }
}

impl SessionErrors {
    /// Whether a JSON-RPC error (`code`, `message`) means "session unknown".
    pub fn is_session_error(&self, code: i64, message: Option<&str>) -> bool {
        if self.codes.contains(&code) {
            return true;
        }
        self.message_codes.contains(&code)
            && message.is_some_and(|m| {
                let m = m.to_ascii_lowercase();
                self.message_patterns.iter().any(|p| m.contains(&p.to_ascii_lowercase()))
            })
    }
}

/// Body of `POST /v1/sessions/{id}/recover`. Unknown fields are ignored (newer filters may
/// send more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverRequest {
    /// The generation of the pin that failed (the filter's view).
    pub failed_generation: u64,
    /// The upstream that failed, `ip:port`.
    pub failed_upstream: String,
    /// What failed.
    pub reason: Reason,
    /// The client's request.
    pub request: OriginalRequest,
    /// How the upstream says "session unknown" (the filter's rules); absent → the defaults.
    #[serde(default)]
    pub session_errors: SessionErrors,
}

/// What happened to the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The session is on `pin` and the request was replayed there; `response` is its answer.
    Replayed,
    /// The session is on `pin`; the request was not replayed (it may have run, a GET, a body
    /// not held whole, or no complete answer to the replay); `response` says so.
    NotReplayed,
    /// The session could not be recovered; its record is deleted; `response` is 404.
    Failed,
    /// Only for [`Reason::SessionSuspect`]: the probe found the session alive on its pin.
    /// Nothing changed; `response` is `null` — the pod's own answer goes to the client.
    Alive,
    /// Only for [`Reason::Draining`]: the session lives on `pin` now, off the draining
    /// upstream; `response` is `null`: the filter sends the request there itself.
    Moved,
    /// Only for [`Reason::Draining`]: the session could not be moved and stays on its
    /// draining upstream (which still serves during its grace period); `response` is `null`.
    Stayed,
}

impl Outcome {
    /// The wire name (also control's metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Replayed => "replayed",
            Outcome::NotReplayed => "not_replayed",
            Outcome::Failed => "failed",
            Outcome::Alive => "alive",
            Outcome::Moved => "moved",
            Outcome::Stayed => "stayed",
        }
    }
}

/// Where a session lives: the upstream host (`ip:port`) of its pod, the session id that pod
/// knows, and the generation of this pin (1 at creation, +1 on every re-pin; control's
/// compare-and-set key).
///
/// `Display` / `FromStr` give the `x-mcp-affinity-pin` header value
/// ([`crate::headers::RECOVERED_PIN`]): `<upstream> <backend session id> <generation>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `ip:port` of the pod.
    pub upstream: String,
    /// The session id that pod knows (the client's own id until a recovery re-initialized
    /// the session).
    pub backend_session_id: String,
    /// Generation of this pin, ≥ 1.
    pub generation: u64,
}

impl Placement {
    /// Whether the fields fit the shared-data record and the header value: a non-empty
    /// upstream without spaces, a valid session id, a generation ≥ 1.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.upstream.is_empty() || self.upstream.contains(' ') {
            return Err(format!("pin: upstream {:?}", self.upstream));
        }
        session_id::validate(self.backend_session_id.as_bytes(), session_id::MAX_SESSION_ID_LEN).map_err(|e| format!("pin: {e}"))?;
        if self.generation == 0 {
            return Err("pin: generation 0".to_string());
        }
        Ok(())
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.upstream, self.backend_session_id, self.generation)
    }
}

impl FromStr for Placement {
    type Err = String;

    /// Parses `<upstream> <backend session id> <generation>`: single spaces, a valid
    /// session id, a generation ≥ 1.
    fn from_str(text: &str) -> Result<Placement, String> {
        let mut fields = text.split(' ');
        let (Some(upstream), Some(backend), Some(generation), None) = (fields.next(), fields.next(), fields.next(), fields.next()) else {
            return Err(format!("pin: expected `upstream backend_session_id generation`, got {text:?}"));
        };
        let generation = generation.parse::<u64>().map_err(|_| format!("pin: generation {generation:?}"))?;
        let p = Placement { upstream: upstream.to_string(), backend_session_id: backend.to_string(), generation };
        p.check()?;
        Ok(p)
    }
}

/// The HTTP answer the filter gives the client, as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientResponse {
    /// HTTP status (200–599).
    pub status: u16,
    /// `Content-Type`, `null` when the answer has none (e.g. 202).
    #[serde(default)]
    pub content_type: Option<String>,
    /// Body text (lossy UTF-8).
    #[serde(default)]
    pub body: String,
}

/// Answer of `POST /v1/sessions/{id}/recover` (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverAnswer {
    /// What happened.
    pub outcome: Outcome,
    /// Where the session lives now (`null` for `failed`).
    #[serde(default)]
    pub pin: Option<Placement>,
    /// The answer for the client; `null` for `alive` (the pod's original answer goes
    /// through) and for `moved` / `stayed` (the filter sends the request to `pin` itself).
    #[serde(default)]
    pub response: Option<ClientResponse>,
}

impl RecoverAnswer {
    /// Whether the answer is coherent: a pin that fits ([`Placement::check`]); `moved` with
    /// a pin; `replayed`, `not_replayed` and `failed` with a response of status 200–599.
    ///
    /// # Errors
    /// A message saying what is wrong; the filter then lets the upstream's answer through.
    pub fn check(&self) -> Result<(), String> {
        if let Some(p) = &self.pin {
            p.check()?;
        }
        match (self.outcome, &self.response) {
            (Outcome::Alive | Outcome::Stayed, _) => Ok(()),
            (Outcome::Moved, _) if self.pin.is_none() => Err("recover answer: moved without a pin".to_string()),
            (Outcome::Moved, _) => Ok(()),
            (_, None) => Err("recover answer: no response".to_string()),
            (_, Some(r)) if !(200..=599).contains(&r.status) => Err(format!("recover answer: status {} out of range", r.status)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug>(value: &T) {
        let text = serde_json::to_string(value).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), value, "{text}");
    }

    #[test]
    fn messages_round_trip() {
        for r in [Reason::ConnectFailure, Reason::ResetAfterSend, Reason::SessionUnknown, Reason::SessionSuspect, Reason::Draining] {
            round_trip(&r);
        }
        for o in [Outcome::Replayed, Outcome::NotReplayed, Outcome::Failed, Outcome::Alive, Outcome::Moved, Outcome::Stayed] {
            round_trip(&o);
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str(), "the wire name is the metric label");
        }
        let pin = Placement { upstream: "10.0.0.2:80".into(), backend_session_id: "b-2".into(), generation: 3 };
        round_trip(&pin);
        let answer = RecoverAnswer {
            outcome: Outcome::Replayed,
            pin: Some(pin),
            response: Some(ClientResponse { status: 200, content_type: Some("text/event-stream".into()), body: "data: {}\n\n".into() }),
        };
        round_trip(&answer);
        let request = RecoverRequest {
            failed_generation: 2,
            failed_upstream: "10.0.0.1:80".into(),
            reason: Reason::ConnectFailure,
            request: OriginalRequest {
                method: "POST".into(),
                path: "/mcp".into(),
                authority: Some("mcp.local".into()),
                content_type: Some("application/json".into()),
                accept: None,
                protocol_version: Some("2025-06-18".into()),
                authorization: Some("Bearer secret".into()),
                body: "{}".into(),
                body_complete: true,
            },
            session_errors: SessionErrors::default(),
        };
        round_trip(&request);
        assert!(!format!("{request:?}").contains("secret"), "Debug redacts the authorization");
        let minimal: RecoverRequest = serde_json::from_str(r#"{"failed_generation":1,"failed_upstream":"a:1","reason":"session_unknown","request":{"method":"GET","path":"/"}}"#).unwrap();
        assert!(minimal.request.body_complete, "absent: a whole (empty) body");
        assert_eq!(minimal.session_errors, SessionErrors::default());
        assert_eq!(serde_json::to_value(Reason::SessionSuspect).unwrap(), "session_suspect");
    }

    #[test]
    fn the_pin_header_value_round_trips_and_rejects_what_does_not_fit() {
        let p = Placement { upstream: "10.0.0.2:80".into(), backend_session_id: "b-2".into(), generation: 3 };
        assert_eq!(p.to_string(), "10.0.0.2:80 b-2 3");
        assert_eq!("10.0.0.2:80 b-2 3".parse::<Placement>().unwrap(), p);
        assert_eq!("[fd00::7]:8080 b 12".parse::<Placement>().unwrap().upstream, "[fd00::7]:8080");
        for bad in ["10.0.0.2:80 b-2", "10.0.0.2:80 b-2 3 x", " b-2 3", "10.0.0.2:80  3", "10.0.0.2:80 b-2 0", "10.0.0.2:80 b-2 -1", "10.0.0.2:80 b\u{1} 3"] {
            assert!(bad.parse::<Placement>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_error_rules() {
        let rules = SessionErrors::default();
        assert!(rules.is_session_error(-32001, None));
        assert!(rules.is_session_error(-32000, Some("Bad Request: No valid SESSION ID provided")));
        assert!(!rules.is_session_error(-32000, Some("Bad Request: malformed")));
        assert!(!rules.is_session_error(-32602, Some("session")));
    }

    #[test]
    fn incoherent_answers_are_refused() {
        let parse = |text: &str| serde_json::from_str::<RecoverAnswer>(text).map_err(|e| e.to_string()).and_then(|a| a.check().map(|()| a));
        assert!(parse(r#"{"outcome":"replayed","pin":{"upstream":"a b","backend_session_id":"b","generation":2},"response":{"status":200}}"#).is_err());
        assert!(parse(r#"{"outcome":"weird","pin":null,"response":{"status":200}}"#).is_err());
        assert!(parse(r#"{"outcome":"replayed","pin":null}"#).is_err(), "a recovery answer needs a response");
        assert!(parse(r#"{"outcome":"moved","pin":null,"response":null}"#).is_err(), "moved needs a pin");
        assert!(parse(r#"{"outcome":"failed","pin":null,"response":{"status":700}}"#).is_err());
        assert_eq!(parse(r#"{"outcome":"alive","pin":{"upstream":"10.0.0.1:80","backend_session_id":"b","generation":1}}"#).unwrap().outcome, Outcome::Alive);
        assert_eq!(parse(r#"{"outcome":"stayed","pin":{"upstream":"10.0.0.1:80","backend_session_id":"b","generation":1},"response":null}"#).unwrap().outcome, Outcome::Stayed);
    }
}
