//! The dev proxy: a small tokio/hyper HTTP/1.1 proxy that runs the filter `.wasm` per
//! stream the way Envoy's HTTP connection manager does, and routes like `envoy/envoy.yaml`.
//! A development and test tool; production is Envoy.
//!
//! - Worker VMs: `concurrency` VMs (Envoy: one per worker thread) share one shared-data
//!   space and one metrics store; each downstream connection is served by one worker,
//!   round robin (Envoy assigns connections to workers).
//! - Per stream, the filter sees Envoy's callback sequence (see [`stream`]).
//! - Restarting the process loses shared data, exactly as an Envoy restart does.
//!
//! Simplification, documented: the request body is read whole before the filter's body
//! callback (MCP requests are single JSON-RPC messages); responses stream chunk by chunk
//! (SSE is never buffered unless the filter asks for it by pausing).

pub mod admin;
pub mod routing;
mod stream;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::host::{MetricsStore, SharedData, Vm, VmConfig};
use routing::{PinRouting, Router};

/// Everything the dev proxy needs; the binary maps its flags onto this.
#[derive(Clone)]
pub struct DevProxyConfig {
    /// The filter module; `None` runs without filter (plain round robin, the problem).
    pub wasm: Option<PathBuf>,
    /// Plugin configuration (JSON) handed to `on_configure`; empty = the filter's defaults.
    pub filter_config: Vec<u8>,
    /// The service's upstream hosts (round robin for unpinned requests).
    pub upstreams: Vec<SocketAddr>,
    /// Named clusters for `dispatch_http_call`.
    pub clusters: HashMap<String, SocketAddr>,
    /// Worker VMs (Envoy `--concurrency`).
    pub concurrency: usize,
    /// How the pin header selects a host.
    pub routing: PinRouting,
    /// The routing header (must match the filter's `pin_header`).
    pub pin_header: String,
    /// Environment variables visible to the VM (Envoy `vm_config.environment_variables`).
    pub vm_env: Vec<(String, String)>,
}

pub(crate) struct Inner {
    workers: Vec<Mutex<Vm>>,
    /// Per worker: woken after each delivered call response (see `stream::wait`).
    wakeups: Vec<tokio::sync::Notify>,
    router: Router,
    clusters: HashMap<String, SocketAddr>,
    client: upstream::HttpClient,
    pin_header: String,
    metrics: MetricsStore,
    next_worker: AtomicUsize,
}

/// A configured dev proxy, ready to serve.
#[derive(Clone)]
pub struct DevProxy {
    inner: Arc<Inner>,
}

impl DevProxy {
    /// Loads and starts the filter VMs. Fails (like Envoy rejecting the listener) when the
    /// module cannot be loaded or rejects its configuration.
    pub fn new(config: DevProxyConfig) -> Result<DevProxy> {
        let metrics = MetricsStore::default();
        let shared = SharedData::default();
        let mut workers = Vec::new();
        if let Some(path) = &config.wasm {
            let wasm = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let (engine, module) = crate::host::compile(&wasm)?;
            for _ in 0..config.concurrency.max(1) {
                let vm = Vm::start(
                    &engine,
                    &module,
                    VmConfig {
                        vm_id: "mcp-affinity".into(),
                        plugin_name: "mcp-affinity".into(),
                        plugin_configuration: config.filter_config.clone(),
                        env: config.vm_env.clone(),
                        clusters: config.clusters.keys().cloned().collect::<HashSet<_>>(),
                        shared: shared.clone(),
                        metrics: metrics.clone(),
                        echo_logs: true,
                        ..VmConfig::default()
                    },
                )?;
                workers.push(Mutex::new(vm));
            }
        }
        Ok(DevProxy {
            inner: Arc::new(Inner {
                wakeups: workers.iter().map(|_| tokio::sync::Notify::new()).collect(),
                workers,
                router: Router::new(config.upstreams, config.routing),
                clusters: config.clusters,
                client: upstream::client(),
                pin_header: config.pin_header,
                metrics,
                next_worker: AtomicUsize::new(0),
            }),
        })
    }

    /// The filter's metrics (Envoy shows them as `wasmcustom.<name>`).
    pub fn metrics(&self) -> &MetricsStore {
        &self.inner.metrics
    }

    /// Serves HTTP/1.1 on `listener` until the task is dropped. Also runs each VM's tick.
    pub async fn serve(self, listener: TcpListener) -> Result<()> {
        for w in 0..self.inner.workers.len() {
            tokio::spawn(stream::tick_loop(self.inner.clone(), w));
        }
        loop {
            let (tcp, peer) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let inner = self.inner.clone();
            let worker = match inner.workers.len() {
                0 => None,
                n => Some(inner.next_worker.fetch_add(1, Ordering::Relaxed) % n),
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let inner = inner.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(stream::handle(inner, worker, req, peer, local).await)
                    }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await {
                    tracing::debug!("downstream connection from {peer}: {e}");
                }
            });
        }
    }
}
