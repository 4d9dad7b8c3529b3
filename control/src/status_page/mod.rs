//! The status page (like HAProxy's stats page), read-only:
//!
//! | route             | auth ([`auth`])                       | answers                              |
//! |-------------------|---------------------------------------|--------------------------------------|
//! | `GET /status`     | API or status token: bearer, cookie, `?token=` | 200 HTML ([`render::page`]), 303 + cookie after `?token=`, 401 |
//! | `GET /v1/status`  | the same                              | 200 [`StatusReport`] as JSON, 401    |
//!
//! Both show one [`StatusReport`]: the upstreams (recovery endpoints and every upstream a
//! record is pinned to or a drain names) with their live sessions and drains, the last
//! recover calls of this instance ([`crate::recover::recent`]), the store's health, the
//! version and uptime. Nothing on them changes anything. See `docs/status-page.md`.

pub mod auth;
pub mod render;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use self::auth::StatusAuth;
use crate::api::AppState;
use crate::clock::{Clock as _, SystemClock};
use crate::recover::recent::RecentRecovery;
use crate::store::{Drain, SessionStore};

/// Route of the HTML page.
pub const PAGE_ROUTE: &str = "/status";

/// Route of the same data as JSON.
pub const JSON_ROUTE: &str = "/v1/status";

/// How long resolving `--endpoints-dns` may take for one view.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the page shows (the body of `GET /v1/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Control's version (its crate version).
    pub version: String,
    /// When this process started serving, Unix milliseconds.
    pub started_at_ms: u64,
    /// Seconds since then.
    pub uptime_secs: u64,
    /// When the report was made, Unix milliseconds.
    pub now_ms: u64,
    /// The store's health.
    pub store: StoreHealth,
    /// Why the recovery endpoints could not be listed (`--endpoints-dns` did not resolve);
    /// `None` when they were.
    pub endpoints_error: Option<String>,
    /// Every known upstream, sorted by `upstream` (as text).
    pub upstreams: Vec<UpstreamStatus>,
    /// The last recover calls of this instance (at most 50), newest first.
    pub recoveries: Vec<RecentRecovery>,
}

/// The store's health when the report was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreHealth {
    /// `memory`, or `redis (single|sentinel|cluster)`.
    pub backend: String,
    /// `true` when the ping and the read of the drains succeeded.
    pub ok: bool,
    /// Latency of the ping, in milliseconds.
    pub latency_ms: f64,
    /// The first error, when not `ok`.
    pub error: Option<String>,
    /// Live records, when the store counts them cheaply (memory: yes; Redis: `None`).
    pub records: Option<u64>,
}

/// One upstream (an MCP server pod, `ip:port`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The upstream as stored (`SocketAddr` text for addresses).
    pub upstream: String,
    /// `true` when it is a recovery endpoint now (`--endpoints`, or `--endpoints-dns` resolved).
    pub endpoint: bool,
    /// Live sessions pinned to it; `None` when the store cannot count them (Redis).
    pub sessions: Option<u64>,
    /// Its drain (since, source, moved, failed, last move, unfinished MCP 2026-07-28 tasks)
    /// while it is draining.
    pub drain: Option<Drain>,
}

/// State of the status routes: the API's state and what only the page needs.
pub struct StatusPage<S> {
    state: AppState<S>,
    backend: String,
    started: Instant,
    started_at_ms: u64,
}

impl<S> Clone for StatusPage<S> {
    fn clone(&self) -> Self {
        StatusPage {
            state: self.state.clone(),
            backend: self.backend.clone(),
            started: self.started,
            started_at_ms: self.started_at_ms,
        }
    }
}

impl<S: SessionStore> StatusPage<S> {
    /// The page of `state`, whose store is `backend` ([`StoreHealth::backend`]); uptime
    /// counts from now.
    pub fn new(state: AppState<S>, backend: impl Into<String>) -> Self {
        StatusPage {
            state,
            backend: backend.into(),
            started: Instant::now(),
            started_at_ms: SystemClock.unix_ms(),
        }
    }

    /// Makes the report: pings the store, reads the drains, resolves the endpoints, counts
    /// the sessions. A failing store is reported in [`StoreHealth`], never an error.
    pub async fn report(&self) -> StatusReport {
        let store = &self.state.store;
        let start = Instant::now();
        let ping = self.state.timed("ping", store.ping()).await;
        let latency = start.elapsed();
        let drains = self.state.timed("draining", store.draining()).await;
        let error = ping.err().or_else(|| drains.as_ref().err().cloned()).map(|e| e.to_string());
        let (endpoints, endpoints_error) = match self.state.recovery.settings().endpoints.resolve(RESOLVE_TIMEOUT).await {
            Ok(list) => (list, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let counts = store.sessions_by_upstream();
        let mut upstreams: BTreeMap<String, UpstreamStatus> = BTreeMap::new();
        let counted = counts.is_some();
        for e in &endpoints {
            upstream_entry(&mut upstreams, &e.to_string(), counted).endpoint = true;
        }
        for (upstream, n) in counts.iter().flatten() {
            upstream_entry(&mut upstreams, upstream, counted).sessions = Some(*n);
        }
        for mut drain in drains.unwrap_or_default() {
            // Best effort, like the sessions: a failing count shows none.
            drain.tasks = self.state.timed("unfinished_tasks", store.unfinished_tasks(&drain.upstream)).await.unwrap_or(0);
            let upstream = drain.upstream.clone();
            upstream_entry(&mut upstreams, &upstream, counted).drain = Some(drain);
        }
        let now_ms = SystemClock.unix_ms();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: self.started_at_ms,
            uptime_secs: self.started.elapsed().as_secs(),
            now_ms,
            store: StoreHealth {
                backend: self.backend.clone(),
                ok: error.is_none(),
                latency_ms: latency.as_secs_f64() * 1000.0,
                error,
                records: store.stats().records,
            },
            endpoints_error,
            upstreams: upstreams.into_values().collect(),
            recoveries: self.state.recovery.recent().newest_first(),
        }
    }
}

/// The entry of `upstream` in `upstreams`, added (no endpoint, 0 sessions when `counted`,
/// no drain) when missing.
fn upstream_entry<'a>(upstreams: &'a mut BTreeMap<String, UpstreamStatus>, upstream: &str, counted: bool) -> &'a mut UpstreamStatus {
    upstreams.entry(upstream.to_string()).or_insert_with(|| UpstreamStatus {
        upstream: upstream.to_string(),
        endpoint: false,
        sessions: counted.then_some(0),
        drain: None,
    })
}

/// The status routes behind `auth` ([`auth::require_status_token`]) and the admission
/// limit of `permits` ([`crate::api::admit`]), their answers counted in the request metrics.
pub fn router<S: SessionStore>(page: StatusPage<S>, auth: StatusAuth, permits: Arc<Semaphore>) -> Router {
    let metrics = page.state.metrics.clone();
    Router::new()
        .route(PAGE_ROUTE, get(html::<S>))
        .route(JSON_ROUTE, get(json::<S>))
        .route_layer(middleware::from_fn_with_state(auth, auth::require_status_token))
        .route_layer(middleware::from_fn_with_state(permits, crate::api::admit))
        .with_state(page)
        .layer(middleware::from_fn_with_state(metrics, crate::api::track_requests))
}

async fn json<S: SessionStore>(State(page): State<StatusPage<S>>) -> Json<StatusReport> {
    Json(page.report().await)
}

/// The page, with headers that keep it out of caches and frames and forbid any script
/// (it has none: it reloads itself with `<meta http-equiv="refresh">`).
async fn html<S: SessionStore>(State(page): State<StatusPage<S>>) -> Response {
    let body = render::page(&page.report().await);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests;
