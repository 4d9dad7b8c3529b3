//! Recovery's shared vocabulary: why the filter asks (`POST /v1/sessions/{id}/recover`,
//! body field `reason`), and control's answer (that endpoint's 200 body, or the headers of
//! its replay listener's answer). Control's API: `control/README.md`, section Recovery.

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
