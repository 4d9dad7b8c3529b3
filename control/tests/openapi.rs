//! `control/openapi.yaml` matches the real router: every documented path and method is
//! served, every other method on a documented path answers 405, and every error code the
//! document lists is one the API reference (`docs/control-api.md`) documents.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use mcp_affinity_control::api::{AppState, router};
use mcp_affinity_control::auth::Auth;
use mcp_affinity_control::metrics::Metrics;
use mcp_affinity_control::store::memory::MemoryStore;
use tower::ServiceExt;

const SPEC: &str = include_str!("../openapi.yaml");
/// The API reference, whose error table lists every code.
const API_DOC: &str = include_str!("../../docs/control-api.md");

/// Documented paths and their methods, read from the `paths:` section (two-space indent
/// for paths, four for methods).
fn documented() -> BTreeMap<String, Vec<Method>> {
    let section = SPEC.split("\npaths:\n").nth(1).expect("paths section");
    let mut out: BTreeMap<String, Vec<Method>> = BTreeMap::new();
    let mut current = None;
    for line in section.lines() {
        if let Some(path) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            current = Some(format!("/{path}"));
            out.entry(format!("/{path}")).or_default();
        } else if let (Some(path), Some(m)) = (&current, line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))) {
            if let Ok(method) = m.to_uppercase().parse::<Method>()
                && ["GET", "PUT", "PATCH", "DELETE", "POST"].contains(&method.as_str())
            {
                out.get_mut(path).unwrap().push(method);
            }
        } else if !line.starts_with("  ") && !line.is_empty() {
            break;
        }
    }
    out
}

#[tokio::test]
async fn documented_routes_are_the_served_routes() {
    let settings = mcp_affinity_control::recover::RecoverySettings {
        endpoints: mcp_affinity_control::recover::endpoints::EndpointSource::Static(Vec::new()),
        replay_safe_methods: Default::default(),
        timeout: std::time::Duration::from_secs(1),
        max_response_bytes: 1024,
    };
    let state = AppState {
        store: Arc::new(MemoryStore::new(std::time::Duration::from_secs(60), 10)),
        metrics: Arc::new(Metrics::new()),
        recovery: Arc::new(mcp_affinity_control::recover::Recovery::new(settings).unwrap()),
    };
    let app = router(state, Auth::token("t"), 1 << 20, 64);
    let routes = documented();
    assert_eq!(
        routes.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "/healthz",
            "/metrics",
            "/readyz",
            "/v1/sessions",
            "/v1/sessions/{id}",
            "/v1/sessions/{id}/recover",
            "/v1/tasks/{id}",
            "/v1/upstreams/draining",
            "/v1/upstreams/{upstream}/drain"
        ]
    );
    for (path, methods) in &routes {
        assert!(!methods.is_empty(), "{path} documents no method");
        let uri = path.replace("{id}", "doc-check").replace("{upstream}", "127.0.0.1:1");
        for method in [Method::GET, Method::PUT, Method::PATCH, Method::DELETE, Method::POST] {
            let body = if method == Method::PUT { r#"{"upstream":"h:1","initialize":"{}"}"# } else { "" };
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("authorization", "Bearer t")
                .body(Body::from(body))
                .unwrap();
            let status = app.clone().oneshot(request).await.unwrap().status();
            if methods.contains(&method) {
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED
                        && (status != StatusCode::NOT_FOUND
                            || path.starts_with("/v1/sessions/{id}")
                            || path.starts_with("/v1/tasks/{id}")
                            || path.starts_with("/v1/upstreams/{upstream}")),
                    "{method} {path} is documented but answers {status}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is served but not documented");
            }
        }
    }
}

#[test]
fn documented_error_codes_match_the_api_reference() {
    let enum_line = SPEC.split("enum: [").nth(1).expect("error code enum").split(']').next().unwrap();
    let codes: Vec<&str> = enum_line.split(',').map(|c| c.trim()).filter(|c| !c.is_empty()).collect();
    assert_eq!(codes.len(), 18, "{codes:?}");
    for code in codes {
        assert!(API_DOC.contains(&format!("| `{code}`")), "docs/control-api.md error table lacks {code}");
    }
}
