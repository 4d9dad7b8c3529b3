//! The recover request: the client's request as the filter saw it, the request body of
//! `POST /v1/sessions/{id}/recover`, what its JSON-RPC body holds, and the checks made before
//! anything is done.


use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use mcp_affinity_proto::recover::Reason;
use serde_json::Value;

use super::upstream::{self};
use crate::errors::ApiError;

use super::Recovery;

/// The client's request as the filter saw it.
#[derive(Clone, Serialize, Deserialize)]
pub struct OriginalRequest {
    /// `POST` or `GET` (`DELETE` is never recovered).
    pub method: String,
    /// Path and query, e.g. `/mcp?x=1`.
    pub path: String,
    /// `:authority` / `Host`, sent as `Host` to the pod.
    #[serde(default)]
    pub authority: Option<String>,
    /// `Content-Type`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `Accept`.
    #[serde(default)]
    pub accept: Option<String>,
    /// `MCP-Protocol-Version`.
    #[serde(default)]
    pub protocol_version: Option<String>,
    /// `Authorization` of this request: used for the calls to the pod, never stored or
    /// logged.
    #[serde(default)]
    pub authorization: Option<String>,
    /// The raw request body (JSON text; empty for GET).
    #[serde(default)]
    pub body: String,
    /// `body` is the whole body the client sent. `false` (the filter did not see the body
    /// end, or it was over the filter's replay limit; `body` is then empty): the session is
    /// recovered but the request is never replayed; the client is told it did not run
    /// ([`NOT_DELIVERED_STATUS`]). Absent: `true` (filters before this field).
    #[serde(default = "whole_by_default")]
    pub body_complete: bool,
}

fn whole_by_default() -> bool {
    true
}

impl fmt::Debug for OriginalRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginalRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("authority", &self.authority)
            .field("content_type", &self.content_type)
            .field("accept", &self.accept)
            .field("protocol_version", &self.protocol_version)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("body_len", &self.body.len())
            .field("body_complete", &self.body_complete)
            .finish()
    }
}

/// Body of `POST /v1/sessions/{id}/recover`. Unknown fields are ignored (newer filters
/// may send more).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecoverRequest {
    /// The generation of the pin that failed (the filter's view).
    pub failed_generation: u64,
    /// The upstream that failed, `ip:port`.
    pub failed_upstream: String,
    /// What failed.
    pub reason: Reason,
    /// The client's request.
    pub request: OriginalRequest,
    /// How the upstream says "session unknown" (`session_suspect` probes): the filter sends
    /// its plugin configuration's rules; absent → the defaults.
    #[serde(default)]
    pub session_errors: upstream::SessionErrors,
}

/// What the JSON-RPC body of the client's request holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct JsonRpcInfo {
    /// The `id` to echo (`null` when absent, a batch, or not JSON).
    pub(crate) id: Value,
    /// The methods of the message(s).
    pub(crate) methods: Vec<String>,
    /// `true` when at least one message is a request (has `method` and `id`).
    pub(crate) has_request: bool,
}

impl JsonRpcInfo {
    pub(crate) fn of(body: &str) -> JsonRpcInfo {
        let messages = match serde_json::from_str::<Value>(body) {
            Ok(Value::Array(items)) => items,
            Ok(v @ Value::Object(_)) => vec![v],
            _ => return JsonRpcInfo { id: Value::Null, methods: Vec::new(), has_request: false },
        };
        let single = messages.len() == 1;
        let mut info = JsonRpcInfo::default();
        for m in &messages {
            if let Some(method) = m.get("method").and_then(Value::as_str) {
                info.methods.push(method.to_string());
                if m.get("id").is_some() {
                    info.has_request = true;
                }
            }
            if single && let Some(id) = m.get("id") {
                info.id = id.clone();
            }
        }
        info
    }
}

/// The JSON-RPC `id` of a request body: the id of its single message, else `null` (a
/// batch, a notification, not JSON).
pub(crate) fn jsonrpc_id(body: &str) -> Value {
    JsonRpcInfo::of(body).id
}

impl Recovery {
    /// Checks a request before anything is done: method `POST` or `GET` (`DELETE` is never
    /// recovered), a path starting with `/`, header fields that are valid header values,
    /// and for reason `draining` a `failed_upstream` that is an `ip:port` (the body may be
    /// empty: the filter asks before the body arrives).
    ///
    /// # Errors
    /// 400 `invalid_request` naming the problem; 400 `invalid_upstream` for a `draining`
    /// request whose `failed_upstream` is not `ip:port`.
    pub fn validate(req: &RecoverRequest) -> Result<(), ApiError> {
        let r = &req.request;
        if req.reason == Reason::Draining
            && let Err(e) = req.failed_upstream.parse::<SocketAddr>()
        {
            return Err(ApiError::invalid_upstream(&req.failed_upstream, &e.to_string()));
        }
        if r.method.eq_ignore_ascii_case("DELETE") {
            return Err(ApiError::invalid_request("DELETE is never recovered: a failed DELETE just ends the session"));
        }
        if !(r.method.eq_ignore_ascii_case("POST") || r.method.eq_ignore_ascii_case("GET")) {
            return Err(ApiError::invalid_request("`request.method` must be POST or GET"));
        }
        if !r.path.starts_with('/') || !r.path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ApiError::invalid_request("`request.path` must start with / and be visible ASCII"));
        }
        for (name, v) in [
            ("authority", &r.authority),
            ("content_type", &r.content_type),
            ("accept", &r.accept),
            ("protocol_version", &r.protocol_version),
            ("authorization", &r.authorization),
        ] {
            if let Some(v) = v
                && reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(ApiError::invalid_request(format!("`request.{name}` is not a valid header value")));
            }
        }
        Ok(())
    }
}
