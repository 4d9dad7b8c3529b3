//! What the host keeps for one VM: configuration, the root context, and per-stream state
//! (headers, buffers, properties, local replies), plus the HTTP calls the guest made.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::abi::Headers;
use super::shared_data::SharedData;

/// A local reply requested with `proxy_send_local_response`. Envoy applies it after the
/// current callback returns (`source/extensions/common/wasm/context.cc`,
/// `Context::sendLocalResponse` defers to `FilterManager::sendLocalReply`).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// An HTTP call requested with `proxy_http_call` (Envoy `dispatch_http_call`), waiting
/// for the driver to perform it.
#[derive(Debug, Clone)]
pub struct HttpCall {
    /// The token the guest received.
    pub token: u32,
    /// The context that made the call (the response is delivered on its behalf).
    pub context_id: u32,
    /// Envoy cluster name.
    pub cluster: String,
    /// Headers including `:method`, `:path`, `:authority`.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// The answer to an [`HttpCall`]; `None` in [`super::Vm::on_http_call_response`] means
/// failure (reset, timeout, connect error), which Envoy delivers as a response with no
/// headers and no body (`Context::onHttpCallFailure`).
#[derive(Debug, Clone, Default)]
pub struct HttpCallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// Where a stream is in Envoy's filter callback sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Request headers are held by this filter: they may still be changed.
    #[default]
    RequestHeadersHeld,
    /// Request headers went upstream (a callback returned Continue): they are read-only.
    RequestHeadersSent,
}

/// Per-stream state (one HTTP context).
#[derive(Debug, Default)]
pub struct StreamState {
    pub request_headers: Headers,
    pub request_body: Vec<u8>,
    pub request_trailers: Headers,
    pub response_headers: Headers,
    pub response_body: Vec<u8>,
    pub response_trailers: Headers,
    /// Dotted property names (`upstream.address`) → bytes, as Envoy's attributes give them:
    /// strings as bytes, integers as 8 little-endian bytes.
    pub properties: HashMap<String, Vec<u8>>,
    pub phase: Phase,
    /// Set by `proxy_send_local_response`; taken by the driver.
    pub local_reply: Option<LocalReply>,
    /// Set by `proxy_continue_stream(HttpRequest)`; taken by the driver.
    pub resume_request: bool,
    /// Set by `proxy_continue_stream(HttpResponse)`; taken by the driver.
    pub resume_response: bool,
    /// Set by `proxy_close_stream`: the stream is reset.
    pub reset: bool,
    /// Set by the `clear_route_cache` foreign function.
    pub route_cache_cleared: bool,
}

/// A log line from the guest (`proxy_log`, or WASI `fd_write` to stdout/stderr).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// proxy-wasm log level: 0 trace … 5 critical; 3 for stdout, 4 for stderr.
    pub level: i32,
    pub message: String,
}

/// Counters and gauges defined by the guest, shared by every VM of one plugin (Envoy keeps
/// one stat per name in its stats store).
#[derive(Debug, Clone, Default)]
pub struct MetricsStore {
    inner: Arc<Mutex<Metrics>>,
}

/// Metric ids by name, and `(name, value)` by id − 1.
type Metrics = (HashMap<String, u32>, Vec<(String, i64)>);

impl MetricsStore {
    /// The id of `name`, defining it when new (ids start at 1).
    pub fn define(&self, name: &str) -> u32 {
        let mut g = self.inner.lock().unwrap();
        if let Some(id) = g.0.get(name) {
            return *id;
        }
        g.1.push((name.to_string(), 0));
        let id = g.1.len() as u32;
        g.0.insert(name.to_string(), id);
        id
    }

    /// Applies `f` to the value of metric `id`; false for an unknown id.
    pub fn update(&self, id: u32, f: impl FnOnce(&mut i64)) -> bool {
        let mut g = self.inner.lock().unwrap();
        match g.1.get_mut((id as usize).wrapping_sub(1)) {
            Some((_, v)) => {
                f(v);
                true
            }
            None => false,
        }
    }

    /// Value of metric `id`.
    pub fn get(&self, id: u32) -> Option<i64> {
        self.inner.lock().unwrap().1.get((id as usize).wrapping_sub(1)).map(|(_, v)| *v)
    }

    /// Value of the metric called `name` (0 if it was never defined).
    pub fn value(&self, name: &str) -> i64 {
        let g = self.inner.lock().unwrap();
        g.0.get(name).map_or(0, |id| g.1[*id as usize - 1].1)
    }

    /// Every metric, in definition order.
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        self.inner.lock().unwrap().1.clone()
    }
}

/// Everything the host functions of one VM can see.
pub struct HostState {
    pub vm_id: String,
    pub plugin_name: String,
    pub vm_configuration: Vec<u8>,
    pub plugin_configuration: Vec<u8>,
    /// Environment the VM sees through WASI `environ_get` (Envoy:
    /// `vm_config.environment_variables`).
    pub env: Vec<(String, String)>,
    pub shared: SharedData,
    pub metrics: MetricsStore,
    /// Cluster names `proxy_http_call` accepts.
    pub clusters: HashSet<String>,
    pub root_context_id: u32,
    /// The context host calls act on (`proxy_set_effective_context`).
    pub effective_context: u32,
    pub streams: HashMap<u32, StreamState>,
    pub tick_period: Option<Duration>,
    pub pending_calls: Vec<HttpCall>,
    pub next_token: u32,
    /// The response being delivered by `proxy_on_http_call_response`.
    pub call_response: Option<HttpCallResponse>,
    /// Added to the wall clock (`proxy_get_current_time_nanoseconds`), so tests can move
    /// time forward without sleeping.
    pub clock_offset: Duration,
    pub logs: Vec<LogLine>,
    /// Forward guest logs to `tracing` as they arrive.
    pub echo_logs: bool,
}

impl HostState {
    /// The stream the current host call acts on, if the effective context is a stream.
    pub fn stream(&mut self) -> Option<&mut StreamState> {
        let id = self.effective_context;
        self.streams.get_mut(&id)
    }
}
