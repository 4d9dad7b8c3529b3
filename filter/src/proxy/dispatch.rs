//! Calls to the control service with `dispatch_http_call` (proxy-wasm `proxy_http_call`).
//! Envoy needs `:method`, `:path` and `:authority` and an existing cluster, else the call
//! is refused with BAD_ARGUMENT (Envoy `source/extensions/common/wasm/context.cc`,
//! `Context::httpCall`); a refused call is treated like an unreachable control service.

use std::time::Duration;

use super::abi::{self, Map};
use crate::config::ControlConfig;
use crate::headers::STATUS;
use mcp_affinity_proto::sessions::session_path;
use mcp_affinity_proto::tasks::task_path;
use crate::machine::{Call, Resource};

/// A resolved `control` configuration.
#[derive(Debug)]
pub struct ControlClient {
    cluster: String,
    authority: String,
    path_prefix: String,
    /// `Bearer <token>`, when a token is configured.
    authorization: Option<String>,
    timeout: Duration,
}

impl ControlClient {
    /// Resolves the token (`token`, or the environment variable named by `token_env`,
    /// which Envoy passes to the VM via `vm_config.environment_variables`). A named
    /// variable that is missing or empty is a configuration error.
    pub fn new(c: &ControlConfig) -> Result<ControlClient, String> {
        let token = match (&c.token, &c.token_env) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                _ => return Err(format!("control.token_env: environment variable {var} is not set in the VM (vm_config.environment_variables)")),
            },
            (None, None) => None,
        };
        Ok(ControlClient {
            cluster: c.cluster.clone(),
            authority: c.authority.clone(),
            path_prefix: c.path_prefix.clone(),
            authorization: token.map(|t| format!("Bearer {t}")),
            timeout: Duration::from_millis(c.timeout_ms),
        })
    }

    /// Sends `call` (`{prefix}/sessions/{id}{suffix}`, JSON body when given); returns the
    /// call's token. The answer arrives in the root context's `proxy_on_http_call_response`,
    /// which hands it to the calling stream ([`super::calls`]).
    ///
    /// # Errors
    /// The host's ABI status when it refuses the call (BAD_ARGUMENT: unknown cluster or
    /// missing pseudo-header; INTERNAL_FAILURE), logged here.
    pub fn call(&self, call: &Call) -> Result<u32, abi::Status> {
        let mut path = match call.resource {
            Resource::Session => session_path(&self.path_prefix, &call.id),
            Resource::Task => task_path(&self.path_prefix, &call.id),
        };
        path.push_str(call.suffix);
        if let Some(ms) = call.wait_ms {
            path.push_str("?wait_ms=");
            path.push_str(&ms.to_string());
        }
        self.dispatch(call.method, &path, call.body.as_deref(), call.timeout_ms)
    }

    /// Sends a batch of new sessions' records (`POST {prefix}/sessions`,
    /// [`crate::record_queue`]); returns the call's token, the answer arrives in the root
    /// context's `on_http_call_response`.
    ///
    /// # Errors
    /// As [`ControlClient::call`].
    pub fn write_records(&self, body: &[u8]) -> Result<u32, abi::Status> {
        let path = format!("{}/sessions", self.path_prefix);
        self.dispatch("POST", &path, Some(body), None)
    }

    /// Fetches the draining upstream hosts (`GET {prefix}/upstreams/draining`); returns
    /// the call's token, the answer arrives in the root context's `on_http_call_response`.
    ///
    /// # Errors
    /// As [`ControlClient::call`].
    pub fn fetch_draining(&self) -> Result<u32, abi::Status> {
        let path = format!("{}/upstreams/draining", self.path_prefix);
        self.dispatch("GET", &path, None, None)
    }

    fn dispatch(&self, method: &str, path: &str, body: Option<&[u8]>, timeout_ms: Option<u64>) -> Result<u32, abi::Status> {
        let mut headers = vec![(":method", method), (":path", path), (":authority", self.authority.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        if let Some(a) = &self.authorization {
            headers.push(("authorization", a.as_str()));
        }
        let timeout = timeout_ms.map_or(self.timeout, Duration::from_millis);
        let r = abi::http_call(&self.cluster, &headers, body, timeout);
        if let Err(status) = r {
            log::warn!("mcp-affinity: proxy_http_call to cluster {} refused: status {status:?}", self.cluster);
        }
        r
    }
}

/// The `:status` of a call's answer in `on_http_call_response`, `None` when the call
/// failed without an answer. Envoy's HTTP client turns a refused connection or a timeout
/// into a local reply (503, 504), but a reset reaches the filter with no headers and no
/// response map: reading the map then answers BAD_ARGUMENT (Envoy
/// `source/extensions/common/wasm/context.cc`, `onHttpCallFailure` / `getConstMap`). So the
/// map is read only when headers arrived.
pub fn answer_status(num_headers: usize) -> Option<u16> {
    if num_headers == 0 {
        return None;
    }
    abi::header(Map::HttpCallResponseHeaders, STATUS).and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
}
