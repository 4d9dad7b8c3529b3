//! The status page in process: its data, its HTML (escaping), its routes' authentication.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use super::auth::StatusAuth;
use super::render::{escape, page};
use super::*;
use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::record::{PutCondition, PutSession};
use crate::recover::endpoints::EndpointSource;
use crate::recover::recent::RecentRecovery;
use crate::recover::{Outcome, Reason, Recovery, RecoverySettings};
use crate::session_id::SessionId;
use crate::store::DrainSource;
use crate::store::memory::MemoryStore;

const EVIL: &str = "<script>alert('x')</script>&\"";

fn state(endpoints: &[&str]) -> AppState<MemoryStore> {
    let settings = RecoverySettings {
        endpoints: EndpointSource::Static(endpoints.iter().map(|e| e.parse().unwrap()).collect()),
        replay_safe_methods: Default::default(),
        timeout: Duration::from_secs(1),
        max_response_bytes: 1024,
    };
    AppState {
        store: Arc::new(MemoryStore::new(Duration::from_secs(60), 100)),
        metrics: Arc::new(Metrics::new()),
        recovery: Arc::new(Recovery::new(settings).unwrap()),
    }
}

async fn pin(state: &AppState<MemoryStore>, id: &str, upstream: &str) {
    let body = PutSession {
        upstream: upstream.into(),
        initialize: "{}".into(),
        backend_session_id: None,
        generation: None,
        initialized: None,
        protocol_version: None,
    };
    state
        .store
        .put(&SessionId::parse(id).unwrap(), &body, PutCondition::Always)
        .await
        .unwrap();
}

/// Two endpoints; sessions on one of them and on an upstream that is no endpoint; a drain.
async fn populated() -> AppState<MemoryStore> {
    let state = state(&["10.0.0.1:80", "10.0.0.2:80"]);
    for (id, upstream) in [("a", "10.0.0.1:80"), ("b", "10.0.0.1:80"), ("c", "10.0.0.9:80")] {
        pin(&state, id, upstream).await;
    }
    let upstream = "10.0.0.2:80".parse().unwrap();
    state.store.drain(upstream, DrainSource::Admin).await.unwrap();
    state.store.record_drain_move(upstream, true).await.unwrap();
    state.store.put_task("t1", "10.0.0.2:80", Duration::from_secs(60), false).await.unwrap();
    state.recovery.recent().push(RecentRecovery {
        at_ms: 1,
        session: "abcdefgh…".into(),
        reason: Reason::ConnectFailure,
        failed_upstream: "10.0.0.3:80".into(),
        new_upstream: Some("10.0.0.1:80".into()),
        outcome: Outcome::Replayed,
        elapsed_ms: 12,
    });
    state
}

#[tokio::test]
async fn the_report_joins_endpoints_pins_and_drains() {
    let report = StatusPage::new(populated().await, "memory").report().await;
    let summary: Vec<(&str, bool, Option<u64>, Option<u64>)> = report
        .upstreams
        .iter()
        .map(|u| (u.upstream.as_str(), u.endpoint, u.sessions, u.drain.as_ref().map(|d| d.moved)))
        .collect();
    assert_eq!(
        summary,
        [
            ("10.0.0.1:80", true, Some(2), None),
            ("10.0.0.2:80", true, Some(0), Some(1)),
            ("10.0.0.9:80", false, Some(1), None)
        ]
    );
    assert!(report.store.ok && report.store.error.is_none(), "{:?}", report.store);
    assert_eq!((report.store.backend.as_str(), report.store.records), ("memory", Some(3)));
    assert_eq!(report.recoveries.len(), 1);
    assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
    // The JSON shape docs/control-api.md documents.
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "version",
        "started_at_ms",
        "uptime_secs",
        "now_ms",
        "store",
        "endpoints_error",
        "upstreams",
        "recoveries",
    ] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(json["recoveries"][0]["outcome"], "replayed");
    assert_eq!(json["upstreams"][1]["drain"]["source"], "admin");
    assert_eq!(json["upstreams"][1]["drain"]["tasks"], 1, "the draining pod's unfinished task");
}

#[tokio::test]
async fn the_page_shows_the_report() {
    let html = page(&StatusPage::new(populated().await, "memory").report().await);
    assert!(!html.contains("{{"), "every slot filled");
    assert!(html.contains(r#"data-upstream="10.0.0.1:80"><td class="name">10.0.0.1:80</td><td class="endpoint">yes</td><td class="sessions">2</td><td class="state serving">serving</td>"#), "{html}");
    assert!(html.contains(r#"<td class="sessions">0</td><td class="state draining">draining</td>"#));
    assert!(html.contains(r#"<span class="tasks-count">unfinished tasks 1</span>"#), "{html}");
    assert!(html.contains("source admin, <span class=\"moved-count\">moved 1</span>"));
    assert!(html.contains(r#"<td class="outcome replayed">replayed</td>"#));
    assert!(html.contains(r#"<td class="health ok">ok</td>"#));
}

#[test]
fn data_is_escaped_everywhere() {
    assert_eq!(escape(EVIL), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;");
    let report = StatusReport {
        version: EVIL.into(),
        started_at_ms: 0,
        uptime_secs: 0,
        now_ms: 0,
        store: StoreHealth {
            backend: EVIL.into(),
            ok: false,
            latency_ms: 1.0,
            error: Some(EVIL.into()),
            records: None,
        },
        endpoints_error: Some(EVIL.into()),
        upstreams: vec![UpstreamStatus {
            upstream: EVIL.into(),
            endpoint: false,
            sessions: None,
            drain: None,
        }],
        recoveries: vec![RecentRecovery {
            at_ms: 0,
            session: EVIL.into(),
            reason: Reason::Draining,
            failed_upstream: EVIL.into(),
            new_upstream: Some(format!("{{{{store}}}}{EVIL}")),
            outcome: Outcome::Stayed,
            elapsed_ms: 0,
        }],
    };
    let html = page(&report);
    assert!(!html.contains("<script") && !html.contains("'x'"), "{html}");
    assert_eq!(
        html.matches("&lt;script&gt;").count(),
        9,
        "version, backend, error, endpoints, upstream ×2, session, from, to"
    );
    assert!(html.contains("{{store}}&lt;script"), "a slot name in data is not expanded");
    assert!(html.contains(r#"<td class="sessions">n/a</td>"#) && html.contains("n/a (not counted with Redis)"));
    assert!(html.contains(r#"<td class="outcome stayed">stayed</td>"#));
}

/// The API's router and the status routes, as `serve` merges them: API token `api`,
/// read-only token `ro`.
fn app(state: AppState<MemoryStore>) -> axum::Router {
    let permits = Arc::new(Semaphore::new(8));
    crate::api::router_with_permits(state.clone(), Auth::token("api"), 1 << 20, permits.clone()).merge(router(
        StatusPage::new(state, "memory"),
        StatusAuth::new(Auth::token("api"), Some(Auth::token("ro"))),
        permits,
    ))
}

async fn send(app: &axum::Router, method: &str, uri: &str, header: Option<(header::HeaderName, String)>) -> axum::response::Response {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
}

fn bearer(token: &str) -> Option<(header::HeaderName, String)> {
    Some((header::AUTHORIZATION, format!("Bearer {token}")))
}

#[tokio::test]
async fn either_token_opens_the_page_and_the_read_only_one_nothing_else() {
    let app = app(populated().await);
    for token in ["api", "ro"] {
        assert_eq!(
            send(&app, "GET", JSON_ROUTE, bearer(token)).await.status(),
            StatusCode::OK,
            "{token}"
        );
        assert_eq!(
            send(&app, "GET", PAGE_ROUTE, bearer(token)).await.status(),
            StatusCode::OK,
            "{token}"
        );
    }
    assert_eq!(send(&app, "GET", PAGE_ROUTE, None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&app, "GET", JSON_ROUTE, bearer("wrong")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, "GET", "/status?token=wrong", bearer("api")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // ?token= → 303 to the bare path with the cookie, which then opens the page.
    let r = send(&app, "GET", "/status?token=ro", None).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], PAGE_ROUTE);
    let cookie = r.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let r = send(&app, "GET", PAGE_ROUTE, Some((header::COOKIE, cookie.clone()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    // Neither the read-only token nor any cookie opens another route.
    let api_cookie = auth::set_cookie(b"api").to_str().unwrap().split(';').next().unwrap().to_string();
    for (method, uri) in [
        ("POST", "/v1/upstreams/10.0.0.1:80/drain"),
        ("DELETE", "/v1/upstreams/10.0.0.2:80/drain"),
        ("GET", "/v1/upstreams/draining"),
        ("GET", "/v1/sessions/a"),
    ] {
        assert_eq!(
            send(&app, method, uri, bearer("ro")).await.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {uri}"
        );
        assert_eq!(
            send(&app, method, uri, Some((header::COOKIE, api_cookie.clone()))).await.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {uri}"
        );
        assert_eq!(
            send(&app, method, &format!("{uri}?token=api"), None).await.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {uri}"
        );
    }
    assert_eq!(
        send(&app, "GET", "/v1/upstreams/draining", bearer("api")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&app, "POST", JSON_ROUTE, bearer("api")).await.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "read-only"
    );
}
