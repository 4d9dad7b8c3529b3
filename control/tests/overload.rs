//! Admission control: with every permit taken, one more `/v1` request is answered 503
//! `overloaded` at once (no queue), and the held requests still complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::get;
use mcp_affinity_control::api::admit;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// `/v1/slow` answers once `gate` gives it a permit; admission by `permits`.
fn app(permits: Arc<Semaphore>, gate: Arc<Semaphore>) -> Router {
    Router::new()
        .route(
            "/v1/slow",
            get(move || {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    "done"
                }
            }),
        )
        .route_layer(middleware::from_fn_with_state(permits, admit))
}

#[tokio::test]
async fn over_the_limit_is_answered_503_at_once_and_held_requests_finish() {
    let gate = Arc::new(Semaphore::new(0));
    let permits = Arc::new(Semaphore::new(2));
    let app = app(permits.clone(), gate.clone());
    let call = |app: Router| async move { app.oneshot(Request::get("/v1/slow").body(Body::empty()).unwrap()).await.unwrap() };
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(call(app.clone()))).collect();
    // Wait (poll with a deadline) until both hold their permit; then one more is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while permits.available_permits() > 0 {
        assert!(Instant::now() < deadline, "the held requests never got their permits");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let response = call(app.clone()).await;
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "overloaded", "{v}");
    assert!(took < Duration::from_secs(1), "refused at once, not queued: {took:?}");
    gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.unwrap().status(), StatusCode::OK);
    }
}
