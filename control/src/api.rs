//! HTTP routes.
//!
//! | route                      | auth   | answers                                            |
//! |----------------------------|--------|----------------------------------------------------|
//! | `PUT /v1/sessions/{id}`    | bearer | 201 created / 200 replaced (record), 409, 400, 413 |
//! | `POST /v1/sessions`        | bearer | 200 [`PutSessionsAnswer`] (created, kept, rejected by id), 400, 413, 503 |
//! | `GET /v1/sessions/{id}[?wait_ms=N]`   | bearer | 200 record, 404 (after waiting up to N ms, ≤ 5000, for it to appear) |
//! | `PATCH /v1/sessions/{id}[?wait_ms=N]` | bearer | 200 record (touched), 404 (likewise)                  |
//! | `DELETE /v1/sessions/{id}` | bearer | 204, 404                                           |
//! | `POST /v1/sessions/{id}/recover[?wait_ms=N]` | bearer | 200 outcome (see [`crate::recover`]), 404, 400, 503 |
//! | `POST /v1/upstreams/{upstream}/drain[?wait_tasks_secs=N]` | bearer | 200 the [`Drain`](crate::store::Drain) (new or already draining; after its tasks ended, or N s), 400 `invalid_upstream`, 503 |
//! | `DELETE /v1/upstreams/{upstream}/drain` | bearer | 204 undrained, 404 `not_draining`, 400, 503 |
//! | `GET /v1/upstreams/draining` | bearer | 200 [`DrainingList`] `{"draining":[Drain…],"serving":[…]}` sorted by upstream, 503 |
//! | `PUT\|GET\|DELETE /v1/tasks/{id}` | bearer | task pins ([`crate::task_pins`]) |
//! | `GET /healthz`             | none   | 200 while the process runs                         |
//! | `GET /readyz`              | none   | 200 when the store answers, else 503               |
//! | `GET /metrics`             | none   | Prometheus / OpenMetrics text                      |
//!
//! The read-only status page (`GET /status`, `GET /v1/status`) has a router of its own,
//! merged next to this one: [`crate::status_page`].
//!
//! The `{id}` path segment is the percent-encoded session id (encode at least `/`, `%`,
//! `?` and `#`). `{upstream}` is an MCP server pod as `ip:port` — IPv6 in brackets,
//! `[fd00::7]:8080` — optionally percent-encoded (`10.0.0.7%3A8080`); it is stored in
//! canonical form (`SocketAddr::to_string()`), the form Envoy reports upstream addresses
//! in. Errors are described in [`crate::errors`].

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::auth::{Auth, require_bearer};
use crate::{drain_api, task_pins};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::record::{MAX_BATCH_RECORDS, PatchSession, PutCondition, PutSession, PutSessions, PutSessionsAnswer, Rejected, SessionRecord};
use crate::recover::{RecoverRequest, RecoverAnswer, Recovery};
use crate::session_id::SessionId;
use crate::store::{PutOutcome, SessionStore, StoreError};
use tokio::sync::Semaphore;

/// Route of the session collection (`POST`: many records at once).
pub const SESSIONS_ROUTE: &str = "/v1/sessions";

/// Route template of the session resource.
pub const SESSION_ROUTE: &str = "/v1/sessions/{id}";

/// Route template of session recovery.
pub const RECOVER_ROUTE: &str = "/v1/sessions/{id}/recover";

/// Route template of an upstream's drain (`POST` drains, `DELETE` undrains).
pub const DRAIN_ROUTE: &str = "/v1/upstreams/{upstream}/drain";

/// Route template of the list of draining upstreams (polled by every filter).
pub const DRAINING_ROUTE: &str = "/v1/upstreams/draining";

/// Body of `GET /v1/upstreams/draining` (the contract crate's).
pub use mcp_affinity_proto::draining::DrainingList;

/// Shared state of the handlers.
pub struct AppState<S> {
    /// The session store.
    pub store: Arc<S>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The recovery engine.
    pub recovery: Arc<Recovery>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState { store: self.store.clone(), metrics: self.metrics.clone(), recovery: self.recovery.clone() }
    }
}

impl<S: SessionStore> AppState<S> {
    /// Runs one store operation, recording its latency under `op`.
    pub(crate) async fn timed<T>(&self, op: &'static str, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let start = Instant::now();
        let result = fut.await;
        self.metrics.observe_store(op, result.is_ok(), start.elapsed());
        if let Err(e) = &result {
            tracing::warn!(op, error = %e, "store operation failed");
        }
        result
    }

    /// Reads the draining list and updates the `upstreams_draining` gauge (best effort:
    /// a store error is logged by [`Self::timed`] and leaves the gauge as it was).
    pub(crate) async fn refresh_draining_gauge(&self) {
        if let Ok(list) = self.timed("draining", self.store.draining()).await {
            self.metrics.set_upstreams_draining(list.len());
        }
    }
}

/// Builds the service's router: `/v1` behind `auth`, a body limit of `max_body_bytes` and
/// admission control of `max_in_flight` requests at once ([`admit`]), the health and
/// metrics routes open.
pub fn router<S: SessionStore>(state: AppState<S>, auth: Auth, max_body_bytes: usize, max_in_flight: usize) -> Router {
    router_with_permits(state, auth, max_body_bytes, Arc::new(Semaphore::new(max_in_flight)))
}

/// [`router`] whose admission control takes its permits from `permits`, which other
/// listeners may share (the replay listener, [`crate::replay_listener`], takes one per request).
pub fn router_with_permits<S: SessionStore>(state: AppState<S>, auth: Auth, max_body_bytes: usize, permits: Arc<Semaphore>) -> Router {
    let v1 = Router::new()
        .route(
            SESSION_ROUTE,
            get(get_session::<S>).put(put_session::<S>).patch(patch_session::<S>).delete(delete_session::<S>),
        )
        .route(SESSIONS_ROUTE, post(put_sessions::<S>))
        .route(RECOVER_ROUTE, post(recover_session::<S>))
        .route(DRAIN_ROUTE, post(drain_api::drain_upstream::<S>).delete(drain_api::undrain_upstream::<S>))
        .route(DRAINING_ROUTE, get(drain_api::list_draining::<S>))
        .route(task_pins::TASK_ROUTE, get(task_pins::get_task::<S>).put(task_pins::put_task::<S>).delete(task_pins::delete_task::<S>))
        .route("/v1/sessions/", any(empty_session_id))
        .route_layer(middleware::from_fn_with_state(auth, require_bearer))
        .route_layer(middleware::from_fn_with_state(permits, admit))
        .layer(DefaultBodyLimit::max(max_body_bytes));
    let metrics = state.metrics.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics_text::<S>))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::from_fn_with_state(metrics, track_requests))
}

/// Middleware: admission control. At most as many requests as `permits` holds are served
/// at once; one more is answered 503 `overloaded` at once — no queue, so under any load an
/// overloaded control answers in microseconds and holds no more than the permitted
/// requests in memory. The filter treats the 503 like an unreachable control (a lookup
/// goes on unpinned, a write is logged and counted).
pub async fn admit(State(permits): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    let Ok(permit) = permits.try_acquire_owned() else {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight; try again later").into_response();
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

/// Middleware: counts every answer by route template, method and status.
pub(crate) async fn track_requests(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let method = request.method().as_str().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    metrics.observe_request(&route, &method, status);
    tracing::debug!(%method, %route, status, elapsed_us = start.elapsed().as_micros() as u64, "request");
    response
}

/// A session id taken from the path and validated.
struct ValidId(SessionId);

impl<St: Send + Sync> FromRequestParts<St> for ValidId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let Path(raw): Path<String> = Path::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| invalid_id(&e.body_text()))?;
        SessionId::parse(&raw).map(ValidId).map_err(|e| invalid_id(&e.to_string()))
    }
}

fn invalid_id(why: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_session_id", format!("invalid session id: {why}"))
}

/// The raw request body, within the body limit.
pub(crate) struct RawBody(pub(crate) Bytes);

impl<St: Send + Sync> FromRequest<St> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &St) -> Result<Self, ApiError> {
        Bytes::from_request(request, state).await.map(RawBody).map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body exceeds the size limit")
            } else {
                ApiError::invalid_request(format!("cannot read the request body: {}", e.body_text()))
            }
        })
    }
}

/// Parses a JSON body, telling malformed JSON, unknown fields and wrong values apart.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data if e.to_string().starts_with("unknown field") => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_field", e.to_string())
            }
            Category::Data => ApiError::invalid_request(e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("body is not valid JSON: {e}"))
            }
        }
    })
}

/// Query of `PUT`: `?if_generation=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    if_generation: Option<u64>,
}

async fn get_session<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidId(id): ValidId,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<SessionRecord>, ApiError> {
    match wait_for_record(&state, &id, wait_of(query)?).await? {
        Some(record) => Ok(Json(record)),
        None => Err(ApiError::session_not_found(id.as_str())),
    }
}

/// The record of `id`, looked for again every [`WAIT_POLL`] for up to `wait` while it is
/// missing.
pub(crate) async fn wait_for_record<S: SessionStore>(state: &AppState<S>, id: &SessionId, wait: std::time::Duration) -> Result<Option<SessionRecord>, StoreError> {
    let deadline = Instant::now() + wait;
    loop {
        let record = state.timed("get", state.store.get(id)).await?;
        if record.is_some() || Instant::now() >= deadline {
            return Ok(record);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Query of `GET`, `PATCH` and `recover`: `?wait_ms=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    wait_ms: Option<u64>,
}

/// Longest `wait_ms` accepted.
pub const MAX_WAIT_MS: u64 = 5000;

/// How often a waiting `GET`/`PATCH` looks at the store again.
pub(crate) const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// `?wait_ms=N` of `GET`/`PATCH`: how long a missing record is waited for. A filter that
/// writes `initialize` records asynchronously asks for it, so a lookup or an update that
/// overtook the record's write in flight (another proxy, another connection) finds the
/// record instead of a 404.
pub(crate) fn wait_of(query: Result<Query<WaitQuery>, QueryRejection>) -> Result<std::time::Duration, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid_request(e.body_text()))?;
    match q.wait_ms {
        Some(ms) if ms > MAX_WAIT_MS => Err(ApiError::invalid_request(format!("wait_ms must be at most {MAX_WAIT_MS}, got {ms}"))),
        ms => Ok(std::time::Duration::from_millis(ms.unwrap_or(0))),
    }
}

async fn put_session<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidId(id): ValidId,
    query: Result<Query<PutQuery>, QueryRejection>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_request(e.body_text()))?;
    let body: PutSession = parse_json(&body)?;
    body.validate().map_err(|e| ApiError::invalid_request(e.0))?;
    let condition = query.if_generation.map_or(PutCondition::Always, PutCondition::IfGeneration);
    match state.timed("put", state.store.put(&id, &body, condition)).await? {
        PutOutcome::Created(r) => Ok((StatusCode::CREATED, Json(r)).into_response()),
        PutOutcome::Replaced(r) => Ok((StatusCode::OK, Json(r)).into_response()),
        PutOutcome::Conflict(current) => Err(ApiError::generation_conflict(query.if_generation.unwrap_or(0), current)),
    }
}

/// `POST /v1/sessions`: creates each record that does not exist yet (as `PUT
/// ?if_generation=0` would); an existing record is kept. A record with an invalid id or
/// body is rejected alone (named in the answer). A store failure answers 503 for the
/// whole batch: records created before it stay, and sending the batch again is safe.
async fn put_sessions<S: SessionStore>(State(state): State<AppState<S>>, RawBody(body): RawBody) -> Result<Json<PutSessionsAnswer>, ApiError> {
    let batch: PutSessions = parse_json(&body)?;
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(ApiError::invalid_request(format!("at most {MAX_BATCH_RECORDS} records per request, got {}", batch.records.len())));
    }
    let mut answer = PutSessionsAnswer::default();
    for (raw, record) in &batch.records {
        let checked = SessionId::parse(raw)
            .map_err(|e| invalid_id(&e.to_string()))
            .and_then(|id| record.validate().map(|()| id).map_err(|e| ApiError::invalid_request(e.0)));
        match checked {
            Ok(id) => match state.timed("put", state.store.put(&id, record, PutCondition::IfGeneration(0))).await? {
                PutOutcome::Created(_) | PutOutcome::Replaced(_) => answer.written += 1,
                PutOutcome::Conflict(_) => answer.kept += 1,
            },
            Err(e) => {
                answer.rejected.insert(raw.clone(), Rejected { code: e.code.to_string(), message: e.message });
            }
        }
    }
    Ok(Json(answer))
}

async fn patch_session<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidId(id): ValidId,
    query: Result<Query<WaitQuery>, QueryRejection>,
    RawBody(body): RawBody,
) -> Result<Json<SessionRecord>, ApiError> {
    let wait = wait_of(query)?;
    let patch: PatchSession = if body.iter().all(u8::is_ascii_whitespace) { PatchSession::default() } else { parse_json(&body)? };
    patch.validate().map_err(|e| ApiError::invalid_request(e.0))?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(record) = state.timed("patch", state.store.patch(&id, &patch)).await? {
            return Ok(Json(record));
        }
        if Instant::now() >= deadline {
            return Err(ApiError::session_not_found(id.as_str()));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

async fn delete_session<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidId(id): ValidId,
) -> Result<StatusCode, ApiError> {
    if state.timed("delete", state.store.delete(&id)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::session_not_found(id.as_str()))
    }
}

/// `POST /v1/sessions/{id}/recover`. The recovery runs in its own task so that it
/// completes (and releases its lease) even if the caller goes away.
async fn recover_session<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidId(id): ValidId,
    query: Result<Query<WaitQuery>, QueryRejection>,
    RawBody(body): RawBody,
) -> Result<Json<RecoverAnswer>, ApiError> {
    let wait = wait_of(query)?;
    let request: RecoverRequest = parse_json(&body)?;
    Recovery::validate(&request)?;
    if !wait.is_zero() {
        // A recovery right after the session began may overtake its record's write.
        wait_for_record(&state, &id, wait).await?;
    }
    let task = tokio::spawn(async move {
        state.recovery.recover(state.store.as_ref(), &state.metrics, &id, &request).await
    });
    match task.await {
        Ok(result) => result.map(Json),
        Err(e) => {
            tracing::error!(error = %e, "recovery task failed");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "recovery failed unexpectedly"))
        }
    }
}

async fn empty_session_id() -> ApiError {
    invalid_id("session id is empty")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz<S: SessionStore>(State(state): State<AppState<S>>) -> Result<Json<serde_json::Value>, ApiError> {
    state.timed("ping", state.store.ping()).await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn metrics_text<S: SessionStore>(State(state): State<AppState<S>>) -> impl IntoResponse {
    let text = state.metrics.render(state.store.stats());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}
