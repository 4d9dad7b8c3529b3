//! Steps 2 and 3 of a recovery: replay the client's request on the settled pin when that is
//! safe, or explain why not — the answer the client gets.


use std::net::SocketAddr;


pub use mcp_affinity_proto::recover::{ClientResponse, Outcome, Placement, Reason, RecoverAnswer};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::upstream::{self, CallError, Target};
use crate::metrics::Metrics;

use super::request::{JsonRpcInfo, RecoverRequest};
use super::Recovery;
use super::{GET_RETRY_BODY, NOT_DELIVERED_STATUS, OUTCOME_UNKNOWN_CODE, SESSION_NOT_FOUND_CODE};

impl Recovery {
    /// Sends `req` once more to `pin`, the session's current, unchanged pin, and answers
    /// with the pod's answer: the replay step of [`Recovery::recover`] under a deadline of
    /// its own (`--recovery-timeout-ms`). For the replay listener ([`crate::replay_listener`]) after
    /// [`Outcome::Alive`]: the pod's first answer was genuine, but Envoy discarded it when
    /// it retried. Outcome `replayed` (`not_replayed` for a GET, or when the resend got no
    /// complete answer).
    pub(crate) async fn resend(&self, req: &RecoverRequest, pin: Placement, metrics: &Metrics) -> RecoverAnswer {
        let deadline = Instant::now() + self.settings.timeout;
        self.answer(req, &JsonRpcInfo::of(&req.request.body), pin, metrics, deadline).await
    }

    /// Steps 2 and 3: replay or explain, on `pin`.
    pub(super) async fn answer(&self, req: &RecoverRequest, info: &JsonRpcInfo, pin: Placement, metrics: &Metrics, deadline: Instant) -> RecoverAnswer {
        let r = &req.request;
        let not_replayed = |response| RecoverAnswer { outcome: Outcome::NotReplayed, pin: Some(pin.clone()), response: Some(response) };
        if r.method.eq_ignore_ascii_case("GET") {
            return not_replayed(ClientResponse {
                status: 200,
                content_type: Some("text/event-stream".into()),
                body: GET_RETRY_BODY.into(),
            });
        }
        if !r.body_complete {
            return not_replayed(not_delivered(req.reason));
        }
        let safe = match req.reason {
            // `session_suspect` gets here only when the probe found the session unknown or
            // the pod unreachable (or the pin already moved): the pod answered the
            // original request with an error, so it did not run. Through `resend` the probe
            // found the session alive: the pod's error answer was genuine, an HTTP-level
            // refusal (404/400) of a request it did not run.
            Reason::ConnectFailure | Reason::SessionUnknown | Reason::SessionSuspect => true,
            Reason::ResetAfterSend => {
                !info.methods.is_empty() && info.methods.iter().all(|m| self.settings.replay_safe_methods.contains(m))
            }
            // Drain-moves never get here (see `move_off_draining`); never replay one.
            Reason::Draining => false,
        };
        if !safe {
            return not_replayed(outcome_unknown(
                info,
                "Outcome unknown: the connection to the MCP server was lost after the request was sent, and the \
                 request was not retried because it may already have taken effect. The session has been recovered; \
                 check the state before retrying.",
            ));
        }
        let Some(endpoint) = resolve_upstream(&pin.upstream, deadline).await else {
            return not_replayed(outcome_unknown(info, "The request could not be delivered to the MCP server after the session was recovered; it did not run."));
        };
        let target = Target { endpoint, path: &r.path, authority: r.authority.as_deref(), authorization: r.authorization.as_deref() };
        let headers = match upstream::replay_headers(
            &pin.backend_session_id,
            r.content_type.as_deref(),
            r.accept.as_deref(),
            r.protocol_version.as_deref(),
        ) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "replay headers");
                return not_replayed(outcome_unknown(info, "The request could not be replayed after the session was recovered; it did not run."));
            }
        };
        let wait_for = info.has_request.then_some(&info.id).filter(|id| !id.is_null());
        let sent = upstream::send(
            &self.http,
            &target,
            reqwest::Method::POST,
            headers,
            r.body.clone(),
            wait_for,
            deadline,
            self.settings.max_response_bytes,
        )
        .await;
        match sent {
            Ok(answer) => {
                metrics.count_replay();
                RecoverAnswer {
                    outcome: Outcome::Replayed,
                    pin: Some(pin.clone()),
                    response: Some(ClientResponse {
                        status: answer.status,
                        content_type: answer.content_type,
                        body: String::from_utf8_lossy(&answer.body).into_owned(),
                    }),
                }
            }
            Err(CallError::NotSent(e)) => {
                tracing::warn!(%endpoint, error = %e, "replay not sent");
                not_replayed(outcome_unknown(
                    info,
                    "The request could not be delivered to the MCP server after the session was recovered; it did not run.",
                ))
            }
            Err(CallError::MaybeSent(e)) => {
                tracing::warn!(%endpoint, error = %e, "replay without a complete answer");
                not_replayed(outcome_unknown(
                    info,
                    "Outcome unknown: the request was replayed after the session was recovered, but no complete answer \
                     came back. Check the state before retrying.",
                ))
            }
        }
    }
}

/// `ip:port` of a stored upstream (a name is resolved, first address).
pub(super) async fn resolve_upstream(upstream: &str, deadline: Instant) -> Option<SocketAddr> {
    if let Ok(a) = upstream.parse() {
        return Some(a);
    }
    let lookup = tokio::time::timeout_at(deadline, tokio::net::lookup_host(upstream)).await;
    lookup.ok()?.ok()?.next()
}

/// The 200 JSON-RPC error (or, for a notification or a client's response, the 202 the
/// server would have sent) for a request that was not replayed.
pub(super) fn outcome_unknown(info: &JsonRpcInfo, message: &str) -> ClientResponse {
    let no_answer_expected = !info.has_request && (!info.methods.is_empty() || !info.id.is_null());
    if no_answer_expected {
        // Notifications and JSON-RPC responses get no body.
        return ClientResponse { status: 202, content_type: None, body: String::new() };
    }
    let body = json!({
        "jsonrpc": "2.0",
        "id": info.id,
        "error": {"code": OUTCOME_UNKNOWN_CODE, "message": message, "data": {"recovered": true}},
    });
    ClientResponse { status: 200, content_type: Some("application/json".into()), body: body.to_string() }
}

/// The answer to a request whose whole body control does not have ([`NOT_DELIVERED_STATUS`],
/// `id: null`). After `reset_after_send` the request may have run: the message says so and
/// `data.resend` is false.
fn not_delivered(reason: Reason) -> ClientResponse {
    let (message, resend) = if reason == Reason::ResetAfterSend {
        ("Outcome unknown: the connection to the MCP server was lost after the request was sent, and the request \
          could not be replayed (its body was not held whole). The session has been recovered; check the state \
          before retrying.", false)
    } else {
        ("The request did not run: the MCP server's pod was gone before the request reached it, and its body was not \
          held whole to replay it. The session has been recovered; send the request again.", true)
    };
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": OUTCOME_UNKNOWN_CODE, "message": message, "data": {"recovered": true, "resend": resend}},
    });
    ClientResponse { status: NOT_DELIVERED_STATUS, content_type: Some("application/json".into()), body: body.to_string() }
}

/// The 404 + JSON-RPC "Session not found" that makes a standard client re-initialize.
/// `id` is the request's JSON-RPC id ([`jsonrpc_id`]).
pub(crate) fn session_not_found(id: &Value) -> ClientResponse {
    let body = json!({"jsonrpc": "2.0", "error": {"code": SESSION_NOT_FOUND_CODE, "message": "Session not found"}, "id": id});
    ClientResponse { status: 404, content_type: Some("application/json".into()), body: body.to_string() }
}
