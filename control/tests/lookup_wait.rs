//! `GET`/`PATCH /v1/sessions/{id}?wait_ms=N`: a request that overtook the write of the
//! record it asks for (the filter writes `initialize` records without holding the answer)
//! finds the record instead of a 404; a genuinely missing one is answered 404 after N ms.

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use mcp_affinity_control::store::memory::MemoryStore;
use serde_json::Value;
use tower::ServiceExt;

fn app() -> Router {
    common::router_over(MemoryStore::new(Duration::from_secs(60), 100))
}

async fn call(app: &Router, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::builder().method(method).uri(uri).header("authorization", "Bearer t").header("content-type", "application/json");
    let response = app.clone().oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) })
}

/// Store reads of `op` so far, from `/metrics`.
async fn store_ops(app: &Router, op: &str) -> u64 {
    let request = Request::get("/metrics").body(Body::empty()).unwrap();
    let bytes = axum::body::to_bytes(app.clone().oneshot(request).await.unwrap().into_body(), 1 << 22).await.unwrap();
    let needle = format!("op=\"{op}\"");
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| l.starts_with("mcp_affinity_control_store_operation_duration_seconds_count") && l.contains(&needle))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

const PUT: &str = r#"{"backend_session_id":"s1","upstream":"10.0.0.1:8080","initialize":"{}"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lookup_finds_the_record_written_after_it_asked() {
    let app = app();
    for (method, body) in [(Method::GET, ""), (Method::PATCH, r#"{"initialized":"{}"}"#)] {
        let id = format!("s-{method}");
        let op = if method == Method::GET { "get" } else { "patch" };
        let before = store_ops(&app, op).await;
        let waiting = {
            let (app, uri) = (app.clone(), format!("/v1/sessions/{id}?wait_ms=5000"));
            tokio::spawn(async move { call(&app, method, &uri, body).await })
        };
        // The waiting request has seen the record missing before the record is written.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store_ops(&app, op).await == before {
            assert!(Instant::now() < deadline, "the {op} never reached the store");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(call(&app, Method::PUT, &format!("/v1/sessions/{id}"), PUT).await.0, StatusCode::CREATED);
        let (status, record) = waiting.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{record}");
        assert_eq!(record["upstream"], "10.0.0.1:8080");
    }
}

#[tokio::test]
async fn a_missing_record_is_404_after_the_wait_and_bad_waits_are_400() {
    let app = app();
    let started = Instant::now();
    let (status, body) = call(&app, Method::GET, "/v1/sessions/nobody?wait_ms=60", "").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("session_not_found")));
    assert!(started.elapsed() >= Duration::from_millis(60), "answered before the wait was over");
    assert_eq!(call(&app, Method::GET, "/v1/sessions/nobody", "").await.0, StatusCode::NOT_FOUND, "no wait by default");
    for uri in ["/v1/sessions/x?wait_ms=5001", "/v1/sessions/x?wait_ms=soon", "/v1/sessions/x?wait=1"] {
        let (status, body) = call(&app, Method::GET, uri, "").await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{uri}: {body}");
        assert_eq!(call(&app, Method::PATCH, uri, "{}").await.0, StatusCode::BAD_REQUEST, "{uri}");
    }
}
