//! The drain routes through the real router on the memory store: `POST` / `DELETE
//! /v1/upstreams/{upstream}/drain` and `GET /v1/upstreams/draining` — authentication,
//! `invalid_upstream`, canonical upstreams, idempotence, 204/404, the exact list shape the
//! filter polls, and the metrics they feed. (Both stores are covered through HTTP by the
//! conformance suite, `tests/tests/control_conformance.rs`.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use mcp_affinity_control::clock::ManualClock;
use mcp_affinity_control::store::memory::MemoryStore;
use serde_json::{Value, json};
use tower::ServiceExt;

const T0: u64 = 1_700_000_000_000;

/// The router over a memory store whose clock starts at `T0` (drain TTL 60 s).
fn app() -> (Router, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = MemoryStore::with_clock(Duration::from_secs(60), 10, clock.clone()).with_drain_ttl(Duration::from_secs(60));
    (common::router_over(store), clock)
}

/// Sends `method uri` (with the token unless `token` is false): status and JSON (`Null`
/// for an empty body).
async fn call(app: &Router, method: Method, uri: &str, token: bool) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if token {
        request = request.header("authorization", "Bearer t");
    }
    let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
    (status, value)
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["code"], code, "{}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
}

async fn metrics(app: &Router) -> String {
    let response = app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    String::from_utf8(axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn every_drain_route_needs_the_token() {
    let (app, _) = app();
    for (method, uri) in [
        (Method::POST, "/v1/upstreams/10.0.0.1:80/drain"),
        (Method::DELETE, "/v1/upstreams/10.0.0.1:80/drain"),
        (Method::GET, "/v1/upstreams/draining"),
    ] {
        assert_error(&call(&app, method.clone(), uri, false).await, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // Nothing was drained by the refused POST.
    assert_eq!(call(&app, Method::GET, "/v1/upstreams/draining", true).await.1, json!({"draining": []}));
}

#[tokio::test]
async fn upstreams_must_be_socket_addresses() {
    let (app, _) = app();
    for raw in [
        "nope", "10.0.0.1", "10.0.0.1:", "10.0.0.1:99999", "10.0.0.1:80:1", "pod-a:80", "::1:80", "%5B::1%5D", "10.0.0.256:80",
        "%20", "%FF:80", "10.0.0.1%3A80%2F",
    ] {
        for method in [Method::POST, Method::DELETE] {
            let got = call(&app, method.clone(), &format!("/v1/upstreams/{raw}/drain"), true).await;
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_upstream");
        }
    }
    assert_eq!(call(&app, Method::GET, "/v1/upstreams/draining", true).await.1, json!({"draining": []}));
}

#[tokio::test]
async fn drain_is_idempotent_canonical_listed_and_undone() {
    let (app, clock) = app();
    let drained = call(&app, Method::POST, "/v1/upstreams/127.0.0.2:8080/drain", true).await;
    assert_eq!(drained.0, StatusCode::OK);
    let expected =
        json!({"upstream": "127.0.0.2:8080", "since_ms": T0, "source": "admin", "moved": 0, "failed": 0, "last_move_ms": null, "tasks": 0});
    assert_eq!(drained.1, expected);
    // Again (a retried preStop hook), later, percent-encoded: the same drain, unchanged.
    clock.advance(Duration::from_secs(5));
    assert_eq!(call(&app, Method::POST, "/v1/upstreams/127.0.0.2%3A8080/drain", true).await, (StatusCode::OK, expected.clone()));
    // IPv6, in any spelling, is stored canonically.
    let v6 = call(&app, Method::POST, "/v1/upstreams/%5B0:0:0:0:0:0:0:1%5D%3A8080/drain", true).await;
    assert_eq!((v6.0, v6.1["upstream"].as_str(), v6.1["since_ms"].as_u64()), (StatusCode::OK, Some("[::1]:8080"), Some(T0 + 5000)));
    call(&app, Method::POST, "/v1/upstreams/10.0.0.1:80/drain", true).await;

    // The exact shape the filter polls, sorted by upstream.
    let list = call(&app, Method::GET, "/v1/upstreams/draining", true).await;
    assert_eq!(list.0, StatusCode::OK);
    let upstreams: Vec<&str> = list.1["draining"].as_array().unwrap().iter().map(|d| d["upstream"].as_str().unwrap()).collect();
    assert_eq!(upstreams, ["10.0.0.1:80", "127.0.0.2:8080", "[::1]:8080"]);
    assert_eq!(list.1.as_object().unwrap().len(), 1, "{}", list.1);
    assert_eq!(list.1["draining"][1], expected);
    for d in list.1["draining"].as_array().unwrap() {
        assert_eq!(d.as_object().unwrap().len(), 7, "exactly the documented fields: {d}");
    }
    assert!(metrics(&app).await.contains("mcp_affinity_control_upstreams_draining 3"));

    // DELETE: 204, then 404 not_draining; the list shrinks.
    assert_eq!(call(&app, Method::DELETE, "/v1/upstreams/%5B::1%5D:8080/drain", true).await, (StatusCode::NO_CONTENT, Value::Null));
    assert_error(&call(&app, Method::DELETE, "/v1/upstreams/%5B::1%5D:8080/drain", true).await, StatusCode::NOT_FOUND, "not_draining");
    assert_error(&call(&app, Method::DELETE, "/v1/upstreams/10.9.9.9:1/drain", true).await, StatusCode::NOT_FOUND, "not_draining");
    let list = call(&app, Method::GET, "/v1/upstreams/draining", true).await.1;
    assert_eq!(list["draining"].as_array().unwrap().len(), 2);
    assert!(metrics(&app).await.contains("mcp_affinity_control_upstreams_draining 2"));

    // 60 s after its since_ms a drain has expired: 127.0.0.2 first, then 10.0.0.1 (drained
    // 5 s later); gone from the list, DELETE says 404.
    clock.advance(Duration::from_secs(55));
    let list = call(&app, Method::GET, "/v1/upstreams/draining", true).await.1;
    assert_eq!(list["draining"].as_array().unwrap().iter().map(|d| d["upstream"].as_str().unwrap()).collect::<Vec<_>>(), ["10.0.0.1:80"]);
    clock.advance(Duration::from_secs(5));
    assert_eq!(call(&app, Method::GET, "/v1/upstreams/draining", true).await.1, json!({"draining": []}));
    assert_error(&call(&app, Method::DELETE, "/v1/upstreams/10.0.0.1:80/drain", true).await, StatusCode::NOT_FOUND, "not_draining");
    // Drained again, it starts anew.
    let again = call(&app, Method::POST, "/v1/upstreams/127.0.0.2:8080/drain", true).await.1;
    assert_eq!(again["since_ms"], T0 + 65_000);

    let text = metrics(&app).await;
    for needle in [
        r#"mcp_affinity_control_http_requests_total{route="/v1/upstreams/{upstream}/drain",method="POST",status="200"} 5"#,
        r#"mcp_affinity_control_http_requests_total{route="/v1/upstreams/{upstream}/drain",method="DELETE",status="204"} 1"#,
        r#"mcp_affinity_control_http_requests_total{route="/v1/upstreams/{upstream}/drain",method="DELETE",status="404"} 3"#,
        r#"mcp_affinity_control_http_requests_total{route="/v1/upstreams/draining",method="GET",status="200"} 4"#,
        r#"mcp_affinity_control_store_operation_duration_seconds_count{op="drain",outcome="ok"} 5"#,
        "mcp_affinity_control_upstreams_draining 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    assert!(!text.contains("127.0.0.2"), "metrics labels never carry upstreams");
}

#[tokio::test]
async fn other_methods_on_drain_routes_are_not_allowed() {
    let (app, _) = app();
    for (method, uri) in [
        (Method::GET, "/v1/upstreams/10.0.0.1:80/drain"),
        (Method::PUT, "/v1/upstreams/10.0.0.1:80/drain"),
        (Method::POST, "/v1/upstreams/draining"),
        (Method::DELETE, "/v1/upstreams/draining"),
    ] {
        assert_error(&call(&app, method.clone(), uri, true).await, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
    assert_error(&call(&app, Method::GET, "/v1/upstreams/10.0.0.1:80", true).await, StatusCode::NOT_FOUND, "not_found");
}
