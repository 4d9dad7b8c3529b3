//! The drain routes (`docs/draining.md`): `POST|DELETE /v1/upstreams/{upstream}/drain` and
//! `GET /v1/upstreams/draining`. Shapes: the contract crate's
//! [`mcp_affinity_proto::draining`].
//!
//! A pod's Kubernetes `preStop` hook may drain its own address and wait for its tasks in one
//! call — `POST …/drain?wait_tasks_secs=N` — as MCP 2026-07-28 tasks cannot move: the
//! answer comes once no unfinished task has been counted on the upstream for
//! [`TASKS_SETTLE`] (a filter writes a new task's pin on its next tick), or after `N`
//! seconds, with what is left in `tasks`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Deserialize;
use tokio::time::Instant;

use crate::api::AppState;
use crate::errors::ApiError;
use crate::store::{Drain, DrainSource, SessionStore};
use mcp_affinity_proto::draining::DrainingList;

/// How long the count of unfinished tasks must stay 0 before a waiting drain answers.
pub const TASKS_SETTLE: Duration = Duration::from_secs(2);

/// Longest `wait_tasks_secs` accepted (a pod's grace period is shorter in practice).
pub const MAX_WAIT_TASKS_SECS: u64 = 24 * 3600;

/// How often a waiting drain counts the tasks again.
const TASKS_POLL: Duration = Duration::from_millis(250);

/// Longest wait for the endpoints' resolution of one draining list.
const SERVING_RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);

/// `serving` leaves out an endpoint that does not accept a TCP connection within this: a
/// crashed pod of a static `--endpoints` list must not get the new work.
const SERVING_PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// How long a probe's result is reused (every Envoy polls about once a second).
const SERVING_PROBE_TTL: Duration = Duration::from_secs(1);

/// The last probe of each endpoint: when, and whether it accepted a connection.
static PROBES: LazyLock<Mutex<HashMap<SocketAddr, (Instant, bool)>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// An upstream (`ip:port`) taken from the path and parsed.
pub(crate) struct ValidUpstream(SocketAddr);

impl<St: Send + Sync> FromRequestParts<St> for ValidUpstream {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let Path(raw): Path<String> = Path::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| ApiError::invalid_upstream("", &e.body_text()))?;
        raw.parse::<SocketAddr>().map(ValidUpstream).map_err(|e| ApiError::invalid_upstream(&raw, &e.to_string()))
    }
}

/// `?wait_tasks_secs=N` of `POST …/drain`.
#[derive(Deserialize)]
pub(crate) struct DrainQuery {
    wait_tasks_secs: Option<u64>,
}

/// `POST /v1/upstreams/{upstream}/drain[?wait_tasks_secs=N]`: idempotent, 200 with the
/// drain (a new one, or the existing one unchanged) and its unfinished tasks. With
/// `wait_tasks_secs` the answer waits for them (see the module documentation); 400
/// `invalid_request` above [`MAX_WAIT_TASKS_SECS`]. A store failure while waiting answers
/// 503 (the caller may simply call again: the drain exists).
pub(crate) async fn drain_upstream<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidUpstream(upstream): ValidUpstream,
    query: Result<Query<DrainQuery>, QueryRejection>,
) -> Result<Json<Drain>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid_request(e.body_text()))?;
    let wait = match q.wait_tasks_secs {
        Some(s) if s > MAX_WAIT_TASKS_SECS => return Err(ApiError::invalid_request(format!("wait_tasks_secs must be at most {MAX_WAIT_TASKS_SECS}, got {s}"))),
        s => Duration::from_secs(s.unwrap_or(0)),
    };
    let mut drain = state.timed("drain", state.store.drain(upstream, DrainSource::Admin)).await?;
    tracing::info!(%upstream, since_ms = drain.since_ms, source = drain.source.as_str(), "upstream draining");
    state.refresh_draining_gauge().await;
    drain.tasks = count_tasks(&state, &drain.upstream).await?;
    if !wait.is_zero() {
        drain.tasks = wait_for_tasks(&state, &drain.upstream, drain.tasks, wait).await?;
        tracing::info!(%upstream, tasks = drain.tasks, "drain's wait for its tasks ended");
    }
    Ok(Json(drain))
}

/// Counts `upstream`'s unfinished tasks until the count has been 0 for [`TASKS_SETTLE`] or
/// `wait` passed; the last count.
async fn wait_for_tasks<S: SessionStore>(state: &AppState<S>, upstream: &str, mut tasks: u64, wait: Duration) -> Result<u64, ApiError> {
    let (start, mut zero_since) = (Instant::now(), Instant::now());
    loop {
        if tasks > 0 {
            zero_since = Instant::now();
        }
        if (tasks == 0 && zero_since.elapsed() >= TASKS_SETTLE) || start.elapsed() >= wait {
            return Ok(tasks);
        }
        tokio::time::sleep(TASKS_POLL).await;
        tasks = count_tasks(state, upstream).await?;
    }
}

async fn count_tasks<S: SessionStore>(state: &AppState<S>, upstream: &str) -> Result<u64, ApiError> {
    Ok(state.timed("unfinished_tasks", state.store.unfinished_tasks(upstream)).await?)
}

/// `DELETE /v1/upstreams/{upstream}/drain`: 204, or 404 `not_draining`.
pub(crate) async fn undrain_upstream<S: SessionStore>(State(state): State<AppState<S>>, ValidUpstream(upstream): ValidUpstream) -> Result<StatusCode, ApiError> {
    let was = state.timed("undrain", state.store.undrain(upstream)).await?;
    state.refresh_draining_gauge().await;
    if was {
        tracing::info!(%upstream, "upstream no longer draining");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_draining(&upstream.to_string()))
    }
}

/// `GET /v1/upstreams/draining`: every unexpired drain, sorted by upstream, each with its
/// upstream's unfinished tasks; while something drains, `serving` lists the endpoints
/// (`--endpoints`, `--endpoints-dns`, resolved now) that do not drain, where the filters
/// send new work. A failed resolution leaves `serving` empty (filters then let Envoy
/// balance new work as usual).
pub(crate) async fn list_draining<S: SessionStore>(State(state): State<AppState<S>>) -> Result<Json<DrainingList>, ApiError> {
    let mut draining = state.timed("draining", state.store.draining()).await?;
    state.metrics.set_upstreams_draining(draining.len());
    for d in &mut draining {
        d.tasks = count_tasks(&state, &d.upstream).await?;
    }
    let mut serving = Vec::new();
    if !draining.is_empty() {
        let settings = state.recovery.settings();
        match settings.endpoints.resolve(settings.timeout.min(SERVING_RESOLVE_TIMEOUT)).await {
            Ok(endpoints) => {
                let candidates = endpoints.into_iter().filter(|e| draining.iter().all(|d| d.upstream != e.to_string())).collect();
                serving = accepting(candidates).await.iter().map(SocketAddr::to_string).collect();
            }
            Err(e) => tracing::warn!(error = %e, "draining list without `serving`: endpoints not resolved"),
        }
    }
    Ok(Json(DrainingList { draining, serving }))
}

/// The endpoints of `candidates` (order kept) that accept a TCP connection, probed at most
/// once per [`SERVING_PROBE_TTL`] each, all at once, each within [`SERVING_PROBE_TIMEOUT`].
async fn accepting(candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let now = Instant::now();
    let known: HashMap<SocketAddr, bool> = {
        let probes = PROBES.lock().unwrap();
        candidates.iter().filter_map(|a| probes.get(a).filter(|(at, _)| now.duration_since(*at) < SERVING_PROBE_TTL).map(|(_, up)| (*a, *up))).collect()
    };
    let mut probes = tokio::task::JoinSet::new();
    for addr in candidates.iter().copied().filter(|a| !known.contains_key(a)) {
        probes.spawn(async move { (addr, matches!(tokio::time::timeout(SERVING_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))) });
    }
    let mut up = known;
    while let Some(Ok((addr, accepted))) = probes.join_next().await {
        let mut all = PROBES.lock().unwrap();
        // Pods come and go (new addresses): results of endpoints no longer probed go.
        all.retain(|_, (at, _)| now.duration_since(*at) < SERVING_PROBE_TTL * 60);
        all.insert(addr, (Instant::now(), accepted));
        up.insert(addr, accepted);
    }
    candidates.into_iter().filter(|a| up.get(a).copied().unwrap_or(false)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serving_endpoints_are_those_that_accept_a_connection() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let live_addr = live.local_addr().unwrap();
        assert_eq!(accepting(vec![dead, live_addr]).await, [live_addr]);
        drop(live);
        assert_eq!(accepting(vec![live_addr]).await, [live_addr], "reused within the TTL");
    }
}
