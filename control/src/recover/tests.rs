//! Recovery against real demo-like pods (a tiny axum server) and the memory store.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::{Value, json};

use super::answer::outcome_unknown;
use super::request::JsonRpcInfo;
use super::*;
use crate::metrics::Metrics;
use crate::record::{PutCondition, PutSession};
use crate::session_id::SessionId;

#[test]
fn jsonrpc_info() {
    let i = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}"#);
    assert_eq!((i.id.clone(), i.methods.clone(), i.has_request), (json!(7), vec!["tools/call".to_string()], true));
    let n = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#);
    assert_eq!((n.id.clone(), n.has_request), (Value::Null, false));
    let b = JsonRpcInfo::of(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#);
    assert_eq!((b.id.clone(), b.methods.len(), b.has_request), (Value::Null, 2, true));
    assert_eq!(JsonRpcInfo::of(""), JsonRpcInfo::default());
    assert_eq!(JsonRpcInfo::of("not json").methods.len(), 0);
}

#[test]
fn client_answers() {
    let req = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":"a","method":"tools/call"}"#);
    let r = outcome_unknown(&req, "m");
    assert_eq!((r.status, r.content_type.as_deref()), (200, Some("application/json")));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!("a"), json!(OUTCOME_UNKNOWN_CODE)));
    let note = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#);
    assert_eq!(outcome_unknown(&note, "m").status, 202);
    let resp = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#);
    assert_eq!(outcome_unknown(&resp, "m").status, 202);
    let empty = outcome_unknown(&JsonRpcInfo::default(), "m");
    assert_eq!(empty.status, 200);
    let nf = session_not_found(&json!(5));
    assert_eq!(nf.status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&nf.body).unwrap(),
        json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":5})
    );
}

#[test]
fn validation_and_redaction() {
    let mut req: RecoverRequest = serde_json::from_value(json!({
        "failed_generation": 1, "failed_upstream": "127.0.0.1:1", "reason": "connect_failure",
        "request": {"method": "POST", "path": "/mcp", "authority": "mcp.local", "content_type": null,
                    "accept": null, "protocol_version": null, "authorization": "Bearer secret", "body": ""},
        "future_field": true
    }))
    .unwrap();
    assert!(Recovery::validate(&req).is_ok());
    assert!(!format!("{req:?}").contains("secret"));
    req.request.method = "DELETE".into();
    assert!(Recovery::validate(&req).unwrap_err().message.contains("DELETE"));
    req.request.method = "PUT".into();
    assert!(Recovery::validate(&req).is_err());
    req.request.method = "GET".into();
    req.request.path = "mcp".into();
    assert!(Recovery::validate(&req).is_err());
    req.request.path = "/mcp".into();
    req.request.accept = Some("bad\nvalue".into());
    assert!(Recovery::validate(&req).is_err());
    assert!(serde_json::from_value::<RecoverRequest>(json!({"failed_generation": 1, "failed_upstream": "x",
        "reason": "other", "request": {"method": "POST", "path": "/"}})).is_err());
}

#[test]
fn session_suspect_and_alive_serde() {
    let req: RecoverRequest = serde_json::from_value(json!({
        "failed_generation": 3, "failed_upstream": "10.0.0.1:80", "reason": "session_suspect",
        "request": {"method": "POST", "path": "/mcp", "body": "{}"}
    }))
    .unwrap();
    assert_eq!(req.reason, Reason::SessionSuspect);
    assert_eq!(serde_json::to_value(Reason::SessionSuspect).unwrap(), json!("session_suspect"));
    assert_eq!(serde_json::to_value(Outcome::Alive).unwrap(), json!("alive"));
    assert_eq!(serde_json::from_value::<Outcome>(json!("alive")).unwrap(), Outcome::Alive);
    assert_eq!(Outcome::Alive.as_str(), "alive");
    let alive = RecoverAnswer {
        outcome: Outcome::Alive,
        pin: Some(Placement { upstream: "10.0.0.1:80".into(), backend_session_id: "b-1".into(), generation: 3 }),
        response: None,
    };
    let v = serde_json::to_value(&alive).unwrap();
    assert_eq!(
        v,
        json!({"outcome": "alive", "pin": {"upstream": "10.0.0.1:80", "backend_session_id": "b-1", "generation": 3},
               "response": null})
    );
    assert_eq!(serde_json::from_value::<RecoverAnswer>(v).unwrap(), alive);
    // The other outcomes keep a response object.
    let replayed = RecoverAnswer {
        outcome: Outcome::Replayed,
        pin: alive.pin.clone(),
        response: Some(ClientResponse { status: 202, content_type: None, body: String::new() }),
    };
    assert_eq!(serde_json::to_value(&replayed).unwrap()["response"], json!({"status": 202, "content_type": null, "body": ""}));
}

/// A fake MCP pod for the probe: `initialize` creates session `new-id`; a request in a
/// session it knows (`known` or `new-id`) gets a JSON result (202 for notifications);
/// any other session gets the TypeScript SDK's 400 / -32000. Every request is logged
/// as `method session protocol-version host authorization`.
mod pod {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use serde_json::{Value, json};

    pub const TS_SDK_BODY: &str =
        r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#;

    pub async fn start(known: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let handler = move |headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                let method = v["method"].as_str().unwrap_or("").to_string();
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                let sid = h("mcp-session-id");
                seen.lock().unwrap().push(format!(
                    "{method} {sid} {} {} {}",
                    h("mcp-protocol-version"),
                    h("host"),
                    h("authorization")
                ));
                let json_ct = [("content-type", "application/json")];
                if method == "initialize" {
                    let result = json!({"jsonrpc":"2.0","id":v["id"],"result":{"protocolVersion":"2025-06-18"}});
                    return (json_ct, [("mcp-session-id", "new-id")], result.to_string()).into_response();
                }
                if sid != known && sid != "new-id" {
                    return (StatusCode::BAD_REQUEST, json_ct, TS_SDK_BODY).into_response();
                }
                if method.starts_with("notifications/") {
                    return StatusCode::ACCEPTED.into_response();
                }
                let result = json!({"jsonrpc":"2.0","id":v["id"],"result":{"session":sid}});
                (json_ct, result.to_string()).into_response()
            }
        };
        let app = axum::Router::new().route("/mcp", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, log)
    }
}

fn recovery_with(endpoints: Vec<SocketAddr>) -> Recovery {
    Recovery::new(RecoverySettings {
        endpoints: EndpointSource::Static(endpoints),
        replay_safe_methods: BTreeSet::new(),
        timeout: Duration::from_secs(5),
        max_response_bytes: 64 * 1024,
    })
    .unwrap()
}

/// A memory store holding session `client-1`, pinned to `upstream` as backend `b-1`
/// at generation 1.
async fn store_with(upstream: SocketAddr, protocol_version: Option<&str>) -> (crate::store::memory::MemoryStore, SessionId) {
    let store = crate::store::memory::MemoryStore::new(Duration::from_secs(60), 10);
    let id = SessionId::parse("client-1").unwrap();
    let put = PutSession {
        backend_session_id: Some("b-1".into()),
        upstream: upstream.to_string(),
        generation: Some(1),
        initialize: r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#.into(),
        initialized: None,
        protocol_version: protocol_version.map(str::to_string),
    };
    store.put(&id, &put, PutCondition::Always).await.unwrap();
    (store, id)
}

async fn suspect_setup(
    known: &'static str,
) -> (Recovery, crate::store::memory::MemoryStore, SessionId, SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let (addr, log) = pod::start(known).await;
    let (store, id) = store_with(addr, Some("2025-06-18")).await;
    (recovery_with(vec![addr]), store, id, addr, log)
}

fn suspect(addr: SocketAddr, failed_generation: u64) -> RecoverRequest {
    serde_json::from_value(json!({
        "failed_generation": failed_generation, "failed_upstream": addr.to_string(), "reason": "session_suspect",
        "request": {"method": "POST", "path": "/mcp", "authority": "mcp.local", "content_type": "application/json",
                    "accept": "application/json, text/event-stream", "protocol_version": "2025-03-26",
                    "authorization": "Bearer c", "body": r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{}}"#}
    }))
    .unwrap()
}

fn probes(metrics: &Metrics) -> String {
    let text = metrics.render(crate::store::StoreStats { records: None, evictions: 0 });
    text.lines().filter(|l| l.starts_with("mcp_affinity_control_probes_total{")).collect::<Vec<_>>().join("\n")
}

/// A drain-move request of session `client-1` pinned to `from` at `generation`, with
/// `body` (the filter sends an empty one).
fn draining_request(from: SocketAddr, generation: u64, method: &str, body: &str) -> RecoverRequest {
    serde_json::from_value(json!({
        "failed_generation": generation, "failed_upstream": from.to_string(), "reason": "draining",
        "request": {"method": method, "path": "/mcp", "authority": "mcp.local", "accept": "application/json, text/event-stream",
                    "protocol_version": "2025-06-18", "authorization": "Bearer c", "body": body}
    }))
    .unwrap()
}

fn rendered(metrics: &Metrics) -> String {
    metrics.render(crate::store::StoreStats { records: None, evictions: 0 })
}

#[tokio::test]
async fn draining_moves_to_a_live_endpoint_and_replays_nothing() {
    let (from, from_log) = pod::start("b-1").await;
    let (to, to_log) = pod::start("none").await;
    let (store, id) = store_with(from, Some("2025-06-18")).await;
    store.drain(from, crate::store::DrainSource::Admin).await.unwrap();
    let recovery = recovery_with(vec![from, to]);
    let metrics = Metrics::new();
    // Even a request body (a filter never sends one here) is not replayed.
    let body = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{}}"#;
    let answer = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "POST", body)).await.unwrap();
    let pin = Placement { upstream: to.to_string(), backend_session_id: "new-id".into(), generation: 2 };
    assert_eq!(answer, RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin.clone()), response: None });
    let methods: Vec<String> = to_log.lock().unwrap().iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
    assert_eq!(methods, ["initialize -", "notifications/initialized new-id"], "re-initialization only");
    assert!(from_log.lock().unwrap().is_empty(), "the draining pod is not called");
    let record = store.get(&id).await.unwrap().unwrap();
    assert_eq!((record.upstream.as_str(), record.generation), (to.to_string().as_str(), 2));
    let drain = store.draining().await.unwrap().remove(0);
    assert_eq!((drain.moved, drain.failed), (1, 0));
    assert!(drain.last_move_ms.is_some_and(|last| last >= drain.since_ms), "{drain:?}");
    let text = rendered(&metrics);
    assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="moved"} 1"#), "{text}");
    assert!(text.contains("mcp_affinity_control_drain_move_delay_seconds_count 1"), "{text}");
    assert!(text.contains("mcp_affinity_control_reinitializations_total 1"), "{text}");
    assert!(!text.contains("mcp_affinity_control_recoveries_total{"), "drain-moves are not recoveries: {text}");
    assert!(text.contains("mcp_affinity_control_upstreams_draining 1"), "{text}");

    // A filter still holding generation 1 (a GET, say): already moved, same pin,
    // nothing sent anywhere, nothing counted again.
    to_log.lock().unwrap().clear();
    let again = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "GET", "")).await.unwrap();
    assert_eq!(again, RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin), response: None });
    assert!(to_log.lock().unwrap().is_empty());
    assert_eq!(store.draining().await.unwrap()[0].moved, 1);
    assert!(rendered(&metrics).contains(r#"mcp_affinity_control_drain_moves_total{outcome="moved"} 1"#));
}

#[tokio::test]
async fn draining_without_a_live_endpoint_stays_and_keeps_the_record() {
    // The only other endpoint is draining too, and a third one is dead.
    let (from, _) = pod::start("b-1").await;
    let (other, other_log) = pod::start("none").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (store, id) = store_with(from, None).await;
    for a in [from, other] {
        store.drain(a, crate::store::DrainSource::Admin).await.unwrap();
    }
    let metrics = Metrics::new();
    let recovery = recovery_with(vec![from, other, dead]);
    let answer = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "POST", "")).await.unwrap();
    let pin = Placement { upstream: from.to_string(), backend_session_id: "b-1".into(), generation: 1 };
    assert_eq!(answer, RecoverAnswer { outcome: Outcome::Stayed, pin: Some(pin), response: None });
    assert!(other_log.lock().unwrap().is_empty(), "a draining endpoint is never a drain-move target");
    let record = store.get(&id).await.unwrap().expect("the record is kept");
    assert_eq!((record.upstream, record.generation), (from.to_string(), 1));
    let drains = store.draining().await.unwrap();
    let drain = drains.iter().find(|d| d.upstream == from.to_string()).unwrap();
    assert_eq!((drain.moved, drain.failed, drain.last_move_ms), (0, 1, None));
    let text = rendered(&metrics);
    assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="stayed"} 1"#), "{text}");
    assert!(text.contains("mcp_affinity_control_reinitializations_total 0"), "{text}");
}

#[tokio::test]
async fn draining_an_upstream_that_is_not_draining_stays_uncounted() {
    let (from, _) = pod::start("b-1").await;
    let (to, to_log) = pod::start("none").await;
    let (store, id) = store_with(from, None).await;
    let metrics = Metrics::new();
    let answer = recovery_with(vec![from, to]).recover(&store, &metrics, &id, &draining_request(from, 1, "POST", "")).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Stayed);
    assert_eq!(answer.pin.unwrap().upstream, from.to_string());
    assert!(to_log.lock().unwrap().is_empty());
    assert!(!rendered(&metrics).contains("mcp_affinity_control_drain_moves_total{"));
    // No record: 404 as for every recovery.
    let other = SessionId::parse("nobody").unwrap();
    let err = recovery_with(vec![to]).recover(&store, &metrics, &other, &draining_request(from, 1, "POST", "")).await.unwrap_err();
    assert_eq!(err.code, "session_not_found");
}

#[tokio::test]
async fn other_reasons_avoid_draining_endpoints() {
    // Pinned to a dead address; two live pods, one draining: every recovery goes to the
    // other one, whatever the rotation.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (draining, draining_log) = pod::start("none").await;
    let (live, _) = pod::start("none").await;
    let store = crate::store::memory::MemoryStore::new(Duration::from_secs(60), 10);
    store.drain(draining, crate::store::DrainSource::Dns).await.unwrap();
    let recovery = recovery_with(vec![dead, draining, live]);
    for n in 0..4 {
        let id = SessionId::parse(&format!("s-{n}")).unwrap();
        let put = PutSession {
            backend_session_id: None,
            upstream: dead.to_string(),
            generation: None,
            initialize: r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#.into(),
            initialized: None,
            protocol_version: None,
        };
        store.put(&id, &put, PutCondition::Always).await.unwrap();
        let req: RecoverRequest = serde_json::from_value(json!({
            "failed_generation": 1, "failed_upstream": dead.to_string(), "reason": "connect_failure",
            "request": {"method": "GET", "path": "/mcp"}
        }))
        .unwrap();
        let answer = recovery.recover(&store, &Metrics::new(), &id, &req).await.unwrap();
        assert_eq!(answer.pin.unwrap().upstream, live.to_string(), "turn {n}");
    }
    assert!(draining_log.lock().unwrap().is_empty());
}

#[test]
fn draining_validation_and_serde() {
    let from: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let mut req = draining_request(from, 1, "GET", "");
    assert_eq!(req.reason, Reason::Draining);
    assert!(Recovery::validate(&req).is_ok(), "GET with an empty body");
    req.request.method = "POST".into();
    assert!(Recovery::validate(&req).is_ok(), "POST with an empty body");
    req.failed_upstream = "[fd00::1]:8080".into();
    assert!(Recovery::validate(&req).is_ok());
    req.failed_upstream = "pod-a:80".into();
    assert_eq!(Recovery::validate(&req).unwrap_err().code, "invalid_upstream");
    req.failed_upstream = from.to_string();
    req.request.method = "DELETE".into();
    assert!(Recovery::validate(&req).is_err());
    assert_eq!(serde_json::to_value(Reason::Draining).unwrap(), json!("draining"));
    let moved = RecoverAnswer {
        outcome: Outcome::Moved,
        pin: Some(Placement { upstream: "10.0.0.2:80".into(), backend_session_id: "b-2".into(), generation: 2 }),
        response: None,
    };
    assert_eq!(
        serde_json::to_value(&moved).unwrap(),
        json!({"outcome": "moved", "pin": {"upstream": "10.0.0.2:80", "backend_session_id": "b-2", "generation": 2}, "response": null})
    );
    assert_eq!(serde_json::to_value(Outcome::Stayed).unwrap(), json!("stayed"));
}

#[tokio::test]
async fn session_suspect_on_a_live_session_is_alive_and_changes_nothing() {
    let (recovery, store, id, addr, log) = suspect_setup("b-1").await;
    let metrics = Metrics::new();
    let answer = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
    let pin = Placement { upstream: addr.to_string(), backend_session_id: "b-1".into(), generation: 1 };
    assert_eq!(answer, RecoverAnswer { outcome: Outcome::Alive, pin: Some(pin), response: None });
    // One ping in the backend session, with the record's protocol version and the
    // client's Host and Authorization; the request itself was not replayed.
    assert_eq!(*log.lock().unwrap(), ["ping b-1 2025-06-18 mcp.local Bearer c"]);
    assert_eq!(store.get(&id).await.unwrap().unwrap().generation, 1);
    assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="alive"} 1"#);
    let text = metrics.render(crate::store::StoreStats { records: None, evictions: 0 });
    assert!(text.contains(r#"mcp_affinity_control_recoveries_total{outcome="alive"} 1"#), "{text}");
    assert!(text.contains("mcp_affinity_control_reinitializations_total 0"), "{text}");
}

#[tokio::test]
async fn session_suspect_on_a_lost_session_reinitializes_and_replays() {
    let (recovery, store, id, addr, log) = suspect_setup("other").await;
    let metrics = Metrics::new();
    let answer = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Replayed, "{answer:?}");
    assert_eq!(answer.pin, Some(Placement { upstream: addr.to_string(), backend_session_id: "new-id".into(), generation: 2 }));
    let response = answer.response.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(serde_json::from_str::<Value>(&response.body).unwrap()["id"], 9);
    let methods: Vec<String> = log.lock().unwrap().iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
    assert_eq!(methods, ["ping b-1", "initialize -", "notifications/initialized new-id", "tools/call new-id"]);
    assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="session_unknown"} 1"#);

    // A filter still holding generation 1: the pin already moved, no probe, no
    // re-initialization, replayed on the current pin.
    log.lock().unwrap().clear();
    let again = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
    assert_eq!((again.outcome, again.pin.unwrap().generation), (Outcome::Replayed, 2));
    let lines = log.lock().unwrap().clone();
    assert_eq!(lines, ["tools/call new-id 2025-03-26 mcp.local Bearer c"], "only the replay");
    assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="session_unknown"} 1"#);
}

#[tokio::test]
async fn session_suspect_on_an_unreachable_pod_goes_on_as_session_unknown() {
    // Pinned to a closed port, no endpoint to move to: the probe finds the pod
    // unreachable and the session_unknown path ends in `failed`.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (store, id) = store_with(closed, None).await;
    let metrics = Metrics::new();
    let answer = recovery_with(Vec::new()).recover(&store, &metrics, &id, &suspect(closed, 1)).await.unwrap();
    assert_eq!((answer.outcome, answer.pin), (Outcome::Failed, None));
    assert_eq!(answer.response.unwrap().status, 404);
    assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="unreachable"} 1"#);
    assert!(store.get(&id).await.unwrap().is_none(), "record deleted");
}

