//! The replay listener (`--replay-listen ADDR`): a request Envoy retried to control.
//!
//! **How a request gets here.** Envoy's MCP route carries a retry policy (Envoy API
//! `config/route/v3/route_components.proto`, message `RetryPolicy`):
//!
//! ```yaml
//! retry_policy:
//!   retry_on: connect-failure,retriable-status-codes
//!   retriable_status_codes: [404]          # 400 too, if the operator adds it
//!   num_retries: 1
//!   retry_priority:
//!     name: envoy.retry_priorities.previous_priorities
//!     typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig, update_frequency: 1}
//! ```
//!
//! and the pods cluster holds the MCP server pods at priority 0 and this listener at
//! priority 1. `previous_priorities` excludes the priority already tried, so when a pinned
//! request fails — its pod is gone (connect failure), or restarted and lost the session
//! (404: MCP `basic/transports`, session management: a server answers a request with an
//! unknown `Mcp-Session-Id` 404 Not Found) — Envoy's single retry sends the very same
//! request (method, path, headers, whole body) here. The wasm filter then never copies
//! request bodies for recovery.
//!
//! **Request shape** (any method, any path; no bearer token):
//! - `mcp-session-id` ([`SESSION_HEADER`]): the id the pod knows. The client's own id, or
//!   after an earlier recovery the backend id, and then [`CLIENT_SESSION_HEADER`]
//!   (`x-mcp-affinity-session`) carries the client's id, the record key. The client's id
//!   is `x-mcp-affinity-session` when present, else `mcp-session-id`, validated as every
//!   session id ([`SessionId::parse`]).
//! - [`POD_HEADER`] (`x-session-pod`): the upstream that failed, `ip:port` or the standard
//!   base64 (padded) of it — the stateful-session header encoding
//!   (`envoy.http.stateful_session.header`); may be absent ([`decode_pod_header`]).
//! - the client's other headers and its body: `Content-Type`, `Accept`,
//!   `MCP-Protocol-Version`, `Authorization` (used for the calls to the pod, never stored
//!   or logged) and `Host` / `:authority` are passed on to the pod; the others are not.
//!
//! **What control does.** It reads the session's record, then
//! - `DELETE`: deletes the record (its pod is gone, and the client wanted to end the
//!   session anyway) and answers 200, empty body, `mcp-session-id: <client id>`;
//! - anything else: [`Recovery::recover`] with reason `session_suspect` — control cannot
//!   tell whether Envoy retried after a connect failure, a 404 or a 400, so it probes the
//!   pinned pod: unreachable or "session unknown" → re-initialize on a live pod and replay;
//!   alive → the pod's error answer was genuine and the request did not run, but Envoy
//!   discarded that answer when it retried, so control sends the request once more to the
//!   same pod ([`Recovery::resend`]) and returns its answer. `failed_upstream` is the
//!   decoded `x-session-pod` (the record's upstream when absent or undecodable);
//!   `failed_generation` is the record's generation when that is the record's upstream,
//!   else one less: a session already moved elsewhere (by another Envoy or control
//!   instance) is replayed on its current pin without a new re-initialization.
//!
//! **Answers.**
//!
//! | outcome | status, `content-type`, body | headers |
//! |---------|------------------------------|---------|
//! | `replayed` | the replay's answer (status, type, whole body) | `mcp-session-id`, [`PIN_HEADER`] (the new or current pin) |
//! | `not_replayed` | as for `POST /v1/sessions/{id}/recover` (200 JSON-RPC -32003; a GET: 200 `text/event-stream` `retry: 1000`) | `mcp-session-id`, `x-mcp-affinity-pin` |
//! | `alive` | the pod's answer to the request sent again | `mcp-session-id`, `x-mcp-affinity-pin` (unchanged pin, same generation) |
//! | `failed` | 404 JSON-RPC -32001 "Session not found" (record deleted) | none |
//! | `DELETE` | 200, no body | `mcp-session-id` |
//!
//! `x-mcp-affinity-pin` is `<upstream> <backend_session_id> <generation>`, single spaces,
//! exactly three fields ([`Placement`]'s `Display`); the wasm filter parses it to update its pin.
//!
//! **Errors** (JSON-RPC error bodies, `content-type: application/json`, `"id"` = the
//! request's id when it has one, else `null`):
//! - 400 -32600: no or invalid session id (`id` null), a body that is not UTF-8, a request
//!   recovery refuses (a method other than `POST`/`GET`/`DELETE`, a path or header that is
//!   not a valid header value); 413 -32600: a body over `--max-body-bytes`;
//! - 404 -32001 "Session not found": no record for the session ([`crate::recover`]'s body);
//! - 503 -32603: control's store is unavailable, or `--max-in-flight` requests are
//!   already served (this listener shares the `/v1` API's admission limit,
//!   [`crate::api::admit`]); 500 -32603: anything unexpected.
//!
//! **Security.** No bearer token: Envoy forwards the client's own request, which does not
//! carry control's token, so the listener must be reachable only by Envoy (loopback, or a
//! NetworkPolicy admitting only the proxies). Knowing a session id gives nothing here that
//! sending that id through Envoy does not already give: the request acts on that session
//! only, with the caller's own `Authorization` passed to the MCP server, which authorizes
//! it exactly as it would through Envoy; the answers carry no record fields beyond the pin
//! (pod address and backend id) and never a stored credential (records hold none).
//!
//! Metrics: every request counts in `replay_listener_requests_total{result}`; recoveries
//! also in the recovery metrics ([`crate::metrics`]). Logs: one info line per request
//! (session, method, outcome, status, pin), never `Authorization` or bodies.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::api::AppState;
use crate::errors::ApiError;
use crate::record::SessionRecord;
use crate::recover::{ClientResponse, OriginalRequest, Outcome, Placement, Reason, RecoverRequest, RecoverAnswer, Recovery, jsonrpc_id, session_not_found};
use crate::session_id::SessionId;
use crate::store::SessionStore;

/// The headers of the replay listener's exchange, defined once in the contract crate:
/// `Mcp-Session-Id` (on the request, the id the pod knows; on the answer, the client's
/// session id); the client's session id when `mcp-session-id` carries a backend id (set by
/// the filter); the failed upstream as the routing header carries it (`ip:port`, or the
/// standard base64 of `ip:port`, [`decode_pod_header`]); and, on every answer with a pin
/// (`replayed`, `not_replayed`, `alive`), where the session lives now
/// ([`Placement`]'s `Display`: `<upstream> <backend_session_id> <generation>`), which the
/// filter parses to update its pin.
pub use mcp_affinity_proto::headers::{CLIENT_SESSION as CLIENT_SESSION_HEADER, MCP_SESSION_ID as SESSION_HEADER, PIN as POD_HEADER, RECOVERED_PIN as PIN_HEADER};

/// How long a missing record is waited for: a session's first requests may overtake the
/// filter's asynchronous write of its record (`control.initialize_write: async`, sent every
/// `record_flush_ms`), as the filter's own lookups allow for with its default
/// `control.lookup_wait_ms` (250 ms). An unknown session is answered 404 after this wait.
pub const RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// JSON-RPC "Invalid Request" (JSON-RPC 2.0 §5.1): a request control cannot recover.
pub const INVALID_REQUEST_CODE: i64 = -32600;

/// JSON-RPC "Internal error" (JSON-RPC 2.0 §5.1): control cannot serve the request now.
pub const INTERNAL_ERROR_CODE: i64 = -32603;

/// State of the replay listener: the API's state and its admission permits.
struct Listener<S> {
    app: AppState<S>,
    permits: Arc<Semaphore>,
    max_body_bytes: usize,
}

/// The replay listener's router: one fallback handler for any method and any path. It
/// shares `state` (store, metrics, recovery engine) and `permits` (admission control,
/// see [`crate::api::router_with_permits`]) with the `/v1` API; bodies are bounded by
/// `max_body_bytes`.
pub fn router<S: SessionStore>(state: AppState<S>, permits: Arc<Semaphore>, max_body_bytes: usize) -> Router {
    Router::new().fallback(replay::<S>).with_state(Arc::new(Listener { app: state, permits, max_body_bytes }))
}

/// The upstream named by an `x-session-pod` value: `ip:port` (`[v6]:port`) as is, or the
/// standard base64 (RFC 4648 §4, padded) of it. `None` for anything else.
pub fn decode_pod_header(value: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    std::str::from_utf8(&base64_standard(text)?).ok()?.parse().ok()
}

/// Standard-alphabet base64 with padding (RFC 4648 §4); `None` for any other text.
fn base64_standard(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The client's session id: `x-mcp-affinity-session` when present, else `mcp-session-id`.
fn client_session_id(headers: &HeaderMap) -> Result<SessionId, String> {
    let (name, value) = match headers.get(CLIENT_SESSION_HEADER) {
        Some(v) => (CLIENT_SESSION_HEADER, v),
        None => (SESSION_HEADER, headers.get(SESSION_HEADER).ok_or("no Mcp-Session-Id header")?),
    };
    let text = value.to_str().map_err(|_| format!("{name} is not visible ASCII"))?;
    SessionId::parse(text).map_err(|e| format!("invalid {name}: {e}"))
}

/// `true` when `a` and `b` name the same upstream (as addresses when both are `ip:port`).
fn same_upstream(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The recovery of the retried request (see the module docs for the failed pin).
fn recover_request(parts: &Parts, body: &str, record: &SessionRecord) -> RecoverRequest {
    let failed = parts.headers.get(POD_HEADER).and_then(|v| decode_pod_header(v.as_bytes()));
    let failed_upstream = failed.map_or_else(|| record.upstream.clone(), |a| a.to_string());
    let failed_generation =
        if same_upstream(&failed_upstream, &record.upstream) { record.generation } else { record.generation.saturating_sub(1) };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let request = OriginalRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |pq| pq.as_str().to_string()),
        authority: header(header::HOST.as_str()).or_else(|| parts.uri.authority().map(|a| a.as_str().to_string())),
        content_type: header(header::CONTENT_TYPE.as_str()),
        accept: header(header::ACCEPT.as_str()),
        protocol_version: header("mcp-protocol-version"),
        authorization: header(header::AUTHORIZATION.as_str()),
        body: body.to_string(),
        // Envoy's retry carries the whole request, which this listener read to its end.
        body_complete: true,
    };
    RecoverRequest { failed_generation, failed_upstream, reason: Reason::SessionSuspect, request, session_errors: Default::default() }
}

/// The handler: admission, then [`handle`], counted by result.
async fn replay<S: SessionStore>(State(listener): State<Arc<Listener<S>>>, request: Request) -> Response {
    let (result, response) = match listener.permits.try_acquire() {
        Ok(_permit) => handle(&listener, request).await,
        Err(_) => (
            "overloaded",
            jsonrpc_error(StatusCode::SERVICE_UNAVAILABLE, INTERNAL_ERROR_CODE, "control is overloaded (too many requests in flight); try again later", &Value::Null),
        ),
    };
    listener.app.metrics.count_replay_request(result);
    response
}

/// One retried request: its metric result and its answer.
async fn handle<S: SessionStore>(listener: &Listener<S>, request: Request) -> (&'static str, Response) {
    let app = &listener.app;
    let (parts, body) = request.into_parts();
    let id = match client_session_id(&parts.headers) {
        Ok(id) => id,
        Err(why) => return bad_request(StatusCode::BAD_REQUEST, &format!("Bad Request: {why}")),
    };
    let Ok(body) = axum::body::to_bytes(body, listener.max_body_bytes).await else {
        return bad_request(StatusCode::PAYLOAD_TOO_LARGE, "Bad Request: the request body exceeds control's size limit or could not be read");
    };
    let text = std::str::from_utf8(&body);
    let rpc_id = text.map_or(Value::Null, jsonrpc_id);
    let record = match crate::api::wait_for_record(app, &id, RECORD_WAIT).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            tracing::info!(session = id.as_str(), method = parts.method.as_str(), outcome = "session_not_found", "replay listener");
            return ("session_not_found", client_response(session_not_found(&rpc_id), None));
        }
        Err(_) => return store_unavailable(&rpc_id),
    };
    if parts.method == Method::DELETE {
        if app.timed("delete", app.store.delete(&id)).await.is_err() {
            return store_unavailable(&rpc_id);
        }
        tracing::info!(session = id.as_str(), method = "DELETE", upstream = record.upstream.as_str(), outcome = "deleted", "replay listener");
        let ended = ClientResponse { status: 200, content_type: None, body: String::new() };
        return ("deleted", with_session(client_response(ended, None), &id));
    }
    let Ok(text) = text else {
        return bad_request(StatusCode::BAD_REQUEST, "Bad Request: the request body is not UTF-8");
    };
    let req = recover_request(&parts, text, &record);
    if let Err(e) = Recovery::validate(&req) {
        return bad_request(StatusCode::BAD_REQUEST, &format!("Bad Request: {}", e.message));
    }
    // In its own task, as `POST /v1/sessions/{id}/recover`: the recovery completes (and
    // releases its lease) even if Envoy goes away.
    let task = {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move { recover_and_resend(&app, &id, &req).await })
    };
    let (result, answer) = match task.await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return api_error(&e, &rpc_id),
        Err(e) => {
            tracing::error!(error = %e, "replay listener: recovery task failed");
            return ("internal", internal_error(&rpc_id));
        }
    };
    let pin = answer.pin.as_ref();
    tracing::info!(
        session = id.as_str(),
        method = parts.method.as_str(),
        outcome = result,
        status = answer.response.as_ref().map(|r| r.status),
        upstream = pin.map(|p| p.upstream.as_str()),
        generation = pin.map(|p| p.generation),
        "replay listener"
    );
    let Some(response) = answer.response else {
        return ("internal", internal_error(&rpc_id));
    };
    (result, client_response(response, pin.map(|pin| (&id, pin))))
}

/// [`Recovery::recover`]; after `alive`, the request sent once more to the unchanged pin
/// ([`Recovery::resend`]). The metric result (`alive` for a resend) and the answer.
async fn recover_and_resend<S: SessionStore>(app: &AppState<S>, id: &SessionId, req: &RecoverRequest) -> Result<(&'static str, RecoverAnswer), ApiError> {
    let answer = app.recovery.recover(app.store.as_ref(), &app.metrics, id, req).await?;
    match answer {
        RecoverAnswer { outcome: Outcome::Alive, pin: Some(pin), .. } => Ok(("alive", app.recovery.resend(req, pin, &app.metrics).await)),
        answer => Ok((answer.outcome.as_str(), answer)),
    }
}

/// `response` as an HTTP answer; with `pin`, the headers `mcp-session-id` (the client's
/// id) and [`PIN_HEADER`].
fn client_response(response: ClientResponse, pin: Option<(&SessionId, &Placement)>) -> Response {
    let mut builder = Response::builder().status(response.status);
    if let Some(content_type) = &response.content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    if let Some((id, pin)) = pin {
        builder = builder.header(SESSION_HEADER, id.as_str()).header(PIN_HEADER, pin.to_string());
    }
    builder.body(Body::from(response.body)).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "replay listener: the answer cannot be sent as is");
        internal_error(&Value::Null)
    })
}

/// `response` with `mcp-session-id: <id>` (a session id is always a valid header value).
fn with_session(mut response: Response, id: &SessionId) -> Response {
    if let Ok(value) = id.as_str().parse() {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

/// A JSON-RPC error answer: `{"jsonrpc":"2.0","id":<id>,"error":{"code":…,"message":…}}`.
fn jsonrpc_error(status: StatusCode, code: i64, message: &str, id: &Value) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    client_response(ClientResponse { status: status.as_u16(), content_type: Some("application/json".into()), body: body.to_string() }, None)
}

fn bad_request(status: StatusCode, message: &str) -> (&'static str, Response) {
    ("bad_request", jsonrpc_error(status, INVALID_REQUEST_CODE, message, &Value::Null))
}

fn store_unavailable(id: &Value) -> (&'static str, Response) {
    let message = "control's session store is unavailable; the session cannot be recovered now, try again later";
    ("store_unavailable", jsonrpc_error(StatusCode::SERVICE_UNAVAILABLE, INTERNAL_ERROR_CODE, message, id))
}

fn internal_error(id: &Value) -> Response {
    jsonrpc_error(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_ERROR_CODE, "control could not recover the session", id)
}

/// A recovery error as a JSON-RPC answer.
fn api_error(e: &ApiError, id: &Value) -> (&'static str, Response) {
    match e.status {
        StatusCode::NOT_FOUND => ("session_not_found", client_response(session_not_found(id), None)),
        StatusCode::SERVICE_UNAVAILABLE => store_unavailable(id),
        StatusCode::BAD_REQUEST => bad_request(StatusCode::BAD_REQUEST, &format!("Bad Request: {}", e.message)),
        _ => {
            tracing::warn!(code = e.code, message = e.message.as_str(), "replay listener: recovery error");
            ("internal", internal_error(id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_header_plain_and_base64() {
        let v4: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert_eq!(decode_pod_header(b"10.0.0.7:8080"), Some(v4));
        assert_eq!(decode_pod_header(b" 10.0.0.7:8080 "), Some(v4));
        // Standard base64 with padding: the filter's `pin_encoding: base64` and Envoy's
        // stateful-session header.
        let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
        let encoded = b64("10.0.0.7:8080");
        assert_eq!(encoded, "MTAuMC4wLjc6ODA4MA==");
        assert_eq!(decode_pod_header(encoded.as_bytes()), Some(v4));
        for (upstream, padding) in [("10.0.0.7:80", 1), ("10.0.0.17:80", 0), ("10.0.0.17:800", 2), ("[fd00::7]:8080", 1)] {
            let encoded = b64(upstream);
            assert_eq!(encoded.bytes().rev().take_while(|b| *b == b'=').count(), padding, "{encoded}");
            assert_eq!(decode_pod_header(encoded.as_bytes()), Some(upstream.parse().unwrap()), "{encoded}");
        }
        assert_eq!(decode_pod_header(b"[fd00::7]:8080"), Some("[fd00::7]:8080".parse().unwrap()));
    }

    #[test]
    fn pod_header_rejects_everything_else() {
        for bad in [
            &b""[..], b"pod-a:8080", b"10.0.0.7", b"MTAuMC4wLjc6ODA4MA", b"MTAuMC4wLjc6ODA4MA=", b"MTAuMC4wLjc6ODA4MA===",
            b"MTAuMC4wLjc=ODA4MA==", b"MTAuMC4wLjc6ODA4MA=A", b"MTAuMC4wLjc6ODA4MA-_", b"bm9wZQ==", b"\xff\xfe", b"====",
        ] {
            assert_eq!(decode_pod_header(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(base64_standard("aGk="), Some(b"hi".to_vec()));
        assert_eq!(base64_standard("aGk/+w=="), Some(vec![b'h', b'i', 0x3f, 0xfb]));
        assert_eq!(base64_standard("aG=k"), None);
    }

    #[test]
    fn session_id_headers() {
        let mut h = HeaderMap::new();
        assert!(client_session_id(&h).unwrap_err().contains("no Mcp-Session-Id"));
        h.insert(SESSION_HEADER, "b-2".parse().unwrap());
        assert_eq!(client_session_id(&h).unwrap().as_str(), "b-2");
        h.insert(CLIENT_SESSION_HEADER, "client-1".parse().unwrap());
        assert_eq!(client_session_id(&h).unwrap().as_str(), "client-1", "the record key wins");
        h.insert(CLIENT_SESSION_HEADER, axum::http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert!(client_session_id(&h).unwrap_err().contains(CLIENT_SESSION_HEADER));
        h.insert(CLIENT_SESSION_HEADER, "a b".parse().unwrap());
        assert!(client_session_id(&h).is_err());
    }

    #[test]
    fn failed_pin_of_the_retried_request() {
        let record: SessionRecord = serde_json::from_value(json!({
            "version": 1, "session_id": "client-1", "backend_session_id": "b-2", "upstream": "10.0.0.8:80", "generation": 2,
            "initialize": "{}", "initialized": null, "protocol_version": null, "created_at_ms": 0, "last_seen_ms": 0
        }))
        .unwrap();
        let request = |pod: Option<&str>| {
            let mut b = axum::http::Request::builder().method("POST").uri("/mcp?x=1").header("host", "mcp.local");
            if let Some(pod) = pod {
                b = b.header(POD_HEADER, pod);
            }
            b.header("authorization", "Bearer c").header("mcp-protocol-version", "2025-06-18").body(()).unwrap().into_parts().0
        };
        let failed = |pod| {
            let r = recover_request(&request(pod), "{}", &record);
            (r.failed_upstream, r.failed_generation)
        };
        assert_eq!(failed(None), ("10.0.0.8:80".to_string(), 2), "absent: the record's pin");
        assert_eq!(failed(Some("10.0.0.8:80")), ("10.0.0.8:80".to_string(), 2));
        assert_eq!(failed(Some("MTAuMC4wLjg6ODA=")), ("10.0.0.8:80".to_string(), 2), "base64 of the same upstream");
        assert_eq!(failed(Some("10.0.0.7:80")), ("10.0.0.7:80".to_string(), 1), "an older upstream: already moved");
        assert_eq!(failed(Some("garbage")), ("10.0.0.8:80".to_string(), 2), "undecodable: the record's pin");
        let r = recover_request(&request(None), r#"{"id":1}"#, &record);
        assert_eq!(r.reason, Reason::SessionSuspect);
        let o = &r.request;
        assert_eq!((o.method.as_str(), o.path.as_str(), o.authority.as_deref()), ("POST", "/mcp?x=1", Some("mcp.local")));
        assert_eq!((o.authorization.as_deref(), o.protocol_version.as_deref(), o.body.as_str()), (Some("Bearer c"), Some("2025-06-18"), r#"{"id":1}"#));
        let gen1 = SessionRecord { generation: 1, ..record };
        assert_eq!(recover_request(&request(Some("10.0.0.7:80")), "", &gen1).failed_generation, 0, "saturating");
    }
}
