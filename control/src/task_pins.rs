//! Task pins (MCP 2026-07-28 era, tasks extension): `PUT|GET|DELETE /v1/tasks/{id}`. The
//! filter writes a task's upstream host through when it sees the answer that created the
//! task, and reads it back when a `tasks/get|update|cancel` names a task it holds no pin
//! for (another Envoy created it, or this one restarted). Shapes: the contract crate's
//! [`mcp_affinity_proto::tasks`].

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use mcp_affinity_proto::tasks::{PutTask, TaskRecord, is_valid_task_id};

use tokio::time::Instant;

use crate::api::{AppState, RawBody, WAIT_POLL, WaitQuery, parse_json, wait_of};
use crate::errors::ApiError;
use crate::store::SessionStore;

/// Route template of one task's pin.
pub const TASK_ROUTE: &str = "/v1/tasks/{id}";

/// How long a pin is kept at most: for a task whose `ttlMs` is `null` (unlimited) or longer.
pub const TASK_TTL_CAP: Duration = Duration::from_secs(24 * 3600);

/// A task id taken from the path and checked ([`is_valid_task_id`]).
pub(crate) struct ValidTaskId(String);

impl<St: Send + Sync> FromRequestParts<St> for ValidTaskId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let Path(raw): Path<String> = Path::from_request_parts(parts, state).await.map_err(|e| invalid_task_id(&e.body_text()))?;
        if !is_valid_task_id(&raw) {
            return Err(invalid_task_id("1..=256 bytes without control characters expected"));
        }
        Ok(ValidTaskId(raw))
    }
}

fn invalid_task_id(why: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_task_id", format!("invalid task id: {why}"))
}

fn task_not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "task_not_found", format!("no task {id:?}"))
}

/// `PUT /v1/tasks/{id}`: 200 with the stored [`TaskRecord`]; 400 `invalid_task_id`, or
/// `malformed_json` / `unknown_field` / `invalid_request` for the body; 503 when the store
/// fails. The pin expires after the task's `ttl_ms`, at most [`TASK_TTL_CAP`]. With
/// `"terminal": true` the existing pin keeps its expiry and stops counting as unfinished
/// on its upstream (the draining list's `tasks`).
pub(crate) async fn put_task<S: SessionStore>(State(state): State<AppState<S>>, ValidTaskId(id): ValidTaskId, RawBody(body): RawBody) -> Result<Json<TaskRecord>, ApiError> {
    let put: PutTask = parse_json(&body)?;
    put.validate().map_err(|e| ApiError::invalid_request(e.to_string()))?;
    let ttl = put.ttl_ms.map_or(TASK_TTL_CAP, |ms| Duration::from_millis(ms).min(TASK_TTL_CAP));
    Ok(Json(state.timed("put_task", state.store.put_task(&id, &put.upstream, ttl, put.terminal)).await?))
}

/// `GET /v1/tasks/{id}[?wait_ms=N]`: 200 [`TaskRecord`], 404 `task_not_found`, 503. With
/// `wait_ms` a missing pin is looked for again every few milliseconds for up to that long:
/// the pin of a task created through another Envoy a moment ago may still be on its way.
pub(crate) async fn get_task<S: SessionStore>(
    State(state): State<AppState<S>>,
    ValidTaskId(id): ValidTaskId,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<TaskRecord>, ApiError> {
    let deadline = Instant::now() + wait_of(query)?;
    loop {
        if let Some(record) = state.timed("get_task", state.store.get_task(&id)).await? {
            return Ok(Json(record));
        }
        if Instant::now() >= deadline {
            return Err(task_not_found(&id));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// `DELETE /v1/tasks/{id}`: 204, 404 `task_not_found`, 503.
pub(crate) async fn delete_task<S: SessionStore>(State(state): State<AppState<S>>, ValidTaskId(id): ValidTaskId) -> Result<StatusCode, ApiError> {
    if state.timed("delete_task", state.store.delete_task(&id)).await? { Ok(StatusCode::NO_CONTENT) } else { Err(task_not_found(&id)) }
}
