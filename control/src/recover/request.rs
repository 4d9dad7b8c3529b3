//! The recover request (its shape is the contract crate's, `mcp_affinity_proto::recover`):
//! what its JSON-RPC body holds, and the checks made before anything is done.

use std::net::SocketAddr;

pub use mcp_affinity_proto::recover::{OriginalRequest, Reason, RecoverRequest};
use serde_json::Value;

use super::Recovery;
use crate::errors::ApiError;

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
