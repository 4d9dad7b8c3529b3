//! HTTP error answers: always JSON `{"code": "...", "message": "..."}` with a stable
//! `code` (plus `"current"` for `generation_conflict`).
//!
//! | code                 | status | when                                             |
//! |----------------------|--------|--------------------------------------------------|
//! | `unauthorized`       | 401    | missing or wrong bearer token on `/v1`           |
//! | `invalid_session_id` | 400    | id not 1..=256 bytes of visible ASCII            |
//! | `malformed_json`     | 400    | body is not JSON                                 |
//! | `unknown_field`      | 400    | body has a field the API does not define         |
//! | `invalid_request`    | 400    | wrong field type/value, missing field, bad query |
//! | `invalid_upstream`   | 400    | `{upstream}` is not `ip:port` (`[v6]:port`)      |
//! | `session_not_found`  | 404    | no record for the id                             |
//! | `not_draining`       | 404    | undrain of an upstream that is not draining      |
//! | `not_found`          | 404    | no such route                                    |
//! | `method_not_allowed` | 405    | route exists, method does not                    |
//! | `generation_conflict`| 409    | `if_generation` did not match                    |
//! | `body_too_large`     | 413    | body over `--max-body-bytes`                     |
//! | `internal`           | 500    | a stored record cannot be read                   |
//! | `store_unavailable`  | 503    | the store cannot be reached in time              |
//! | `store_busy`         | 503    | concurrent writers kept changing the record      |
//! | `overloaded`         | 503    | `--max-in-flight` `/v1` requests already served  |

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::record::SessionRecord;
use crate::store::StoreError;

/// An error answer of the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (see the module table).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// For `generation_conflict` only: the current record (`Some(None)` = absent).
    /// Boxed to keep `Result<_, ApiError>` small.
    pub current: Option<Box<Option<SessionRecord>>>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<&'a Option<SessionRecord>>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), current: None }
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or invalid bearer token")
    }

    /// 400 `invalid_request`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `session_not_found`.
    pub fn session_not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "session_not_found", format!("no session {id:?}"))
    }

    /// 400 `invalid_upstream`: `raw` is not a socket address.
    pub fn invalid_upstream(raw: &str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_upstream",
            format!("invalid upstream {raw:?}: expected ip:port, e.g. 10.0.0.7:8080 or [fd00::7]:8080 ({why})"),
        )
    }

    /// 404 `not_draining`: `upstream` has no (unexpired) drain.
    pub fn not_draining(upstream: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_draining", format!("upstream {upstream} is not draining"))
    }

    /// 409 `generation_conflict` carrying the current record.
    pub fn generation_conflict(expected: u64, current: Option<SessionRecord>) -> Self {
        let message = match (&current, expected) {
            (Some(_), 0) => "the session already exists (if_generation=0 means only if absent)".to_string(),
            (Some(r), _) => format!("expected generation {expected}, current generation is {}", r.generation),
            (None, _) => format!("expected generation {expected}, but the session does not exist"),
        };
        ApiError { current: Some(Box::new(current)), ..Self::new(StatusCode::CONFLICT, "generation_conflict", message) }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()),
            StoreError::Busy(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_busy", e.to_string()),
            StoreError::Corrupt(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { code: self.code, message: &self.message, current: self.current.as_deref() };
        (self.status, Json(body)).into_response()
    }
}
