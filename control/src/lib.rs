//! mcp-affinity control service: the durable, shared home of MCP session records.
//!
//! A proxy-wasm filter pins each MCP session (`Mcp-Session-Id`) to the upstream pod that
//! answered `initialize`; this service keeps those pins ([`record::SessionRecord`]) in an
//! embedded store or in Redis so that they survive proxy restarts and are shared by
//! several proxies.
//!
//! - [`config`]: flags and environment ([`config::Config`]).
//! - [`api`]: the HTTP routes; [`errors`]: the JSON error answers; [`auth`]: bearer tokens.
//! - [`record`]: the record and the request bodies; [`session_id`]: id validation.
//! - [`store`]: the [`store::SessionStore`] trait, [`store::memory`] and [`store::redis`].
//! - [`recover`]: session recovery (`POST /v1/sessions/{id}/recover`): re-initialize on a
//!   live pod once per session, replay when safe; move sessions off draining upstreams.
//! - [`replay_listener`]: the replay listener (`--replay-listen`): a request Envoy retried to
//!   control after its pinned pod failed; recovered and answered like the client's own.
//! - [`drain_api`]: the drain routes (drain, undrain, the draining list with each
//!   upstream's unfinished tasks and the serving endpoints); [`task_pins`]: MCP 2026-07-28
//!   task pins.
//! - [`drain_source`]: drains from the endpoint source (`--endpoints-dns`; EndpointSlices with the `kube` feature).
//! - [`status_page`]: the read-only status page (`GET /status`, `GET /v1/status`).
//! - [`metrics`]: Prometheus metrics; [`clock`]: injectable time.
//! - [`cli`]: the operator commands of the binary (`status`, `sessions get`, `drain`,
//!   `undrain`), clients of a running service.
//!
//! Run in-process with [`serve`] (tests do) or as the `mcp-affinity-control` binary.

pub mod api;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod drain_api;
pub mod drain_source;
pub mod errors;
pub mod metrics;
pub mod mtls;
pub mod record;
pub mod recover;
pub mod replay_listener;
pub mod task_pins;
pub mod session_id;
pub mod status_page;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::AppState;
use crate::auth::Auth;
use crate::config::{Config, StoreKind};
use crate::metrics::Metrics;
use crate::store::SessionStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisStore, RedisStoreConfig};

/// Serves the API described by `config` on `listener` until `shutdown` completes, then
/// finishes the requests in flight and returns. `config.listen` is not used (the caller
/// bound `listener`); with `--replay-listen ADDR`, the replay listener ([`replay`]) is
/// bound to `ADDR` and served next to the API.
///
/// # Errors
/// When the configuration is unusable (no token without `--insecure-no-auth`, unreadable
/// token file, invalid Redis URL, `rediss://` without the `tls` feature), the replay
/// address cannot be bound, or a server fails. An unreachable Redis is not an error: the
/// service starts and reports not ready.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let replay = match config.replay_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--replay-listen {addr}"))?),
        None => None,
    };
    serve_listeners(config, listener, replay, shutdown).await
}

/// [`serve`] on listeners the caller bound: the API on `listener`, the replay listener on
/// `replay` when given (`config.listen` and `config.replay_listen` are not used). Both
/// share the store, the metrics, the recovery engine and the `--max-in-flight` admission
/// limit, and stop together when `shutdown` completes.
///
/// # Errors
/// As [`serve`].
pub async fn serve_listeners(
    config: Config,
    listener: TcpListener,
    replay: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listeners = Listeners { api: listener, replay };
    let auth = config.auth()?;
    if matches!(auth, Auth::Disabled) {
        tracing::warn!("--insecure-no-auth: the /v1 API accepts requests without a token");
    }
    match &config.store {
        StoreKind::Memory => {
            let store = MemoryStore::new(config.session_ttl(), usize::try_from(config.max_sessions).unwrap_or(usize::MAX))
                .with_drain_ttl(config.drain_ttl());
            tracing::info!(ttl_secs = config.session_ttl_secs, max_sessions = config.max_sessions, "memory store");
            run(Arc::new(store), auth, "memory".to_string(), &config, listeners, shutdown).await
        }
        StoreKind::Redis(url) => {
            check_tls_support(url)?;
            let store = RedisStore::new(&RedisStoreConfig {
                url: url.clone(),
                key_prefix: config.redis_key_prefix.clone(),
                ttl: config.session_ttl(),
                timeout: config.redis_timeout(),
            })
            .and_then(|store| store.with_replication_wait(config.redis_wait()))
            .context("redis store")?
            .with_drain_ttl(config.drain_ttl());
            let topology = crate::store::redis::RedisTopology::parse(url).map(|t| t.kind()).unwrap_or("?");
            tracing::info!(
                topology,
                ttl_secs = config.session_ttl_secs,
                key_prefix = %config.redis_key_prefix,
                wait_replicas = config.redis_wait_replicas,
                "redis store"
            );
            run(Arc::new(store), auth, format!("redis ({topology})"), &config, listeners, shutdown).await
        }
    }
}

/// The bound listeners: the API's and, with `--replay-listen`, the replay listener's.
struct Listeners {
    api: TcpListener,
    replay: Option<TcpListener>,
}

/// Serves `store` (a `backend` store, as the status page names it) with the router of
/// [`api::router_with_permits`] and the status page's ([`status_page::router`]), and the
/// replay listener's ([`replay_listener::router`]) when bound.
async fn run<S: SessionStore>(
    store: Arc<S>,
    auth: Auth,
    backend: String,
    config: &Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let settings = config.recovery();
    if settings.endpoints == crate::recover::endpoints::EndpointSource::Static(Vec::new()) {
        tracing::warn!("no --endpoints / --endpoints-dns: every session recovery fails (clients start new sessions)");
    }
    tracing::info!(endpoints = ?settings.endpoints, timeout_ms = config.recovery_timeout_ms, "recovery");
    let metrics = Arc::new(Metrics::new());
    // With a DNS endpoint source, pods leaving the name are drained in the background.
    let watcher = matches!(settings.endpoints, crate::recover::endpoints::EndpointSource::Dns(_)).then(|| {
        tracing::info!(refresh_secs = config.endpoints_refresh_secs, "draining upstreams that leave --endpoints-dns");
        let task = drain_source::dns::watch(store.clone(), metrics.clone(), settings.endpoints.clone(), config.endpoints_refresh());
        AbortOnDrop(tokio::spawn(task))
    });
    let slices: Option<AbortOnDrop> = match &config.drain_from_endpointslices {
        None => None,
        #[cfg(feature = "kube")]
        Some(service) => {
            tracing::info!(?service, "draining upstreams from the Service's EndpointSlices");
            let task = drain_source::endpointslices::watch(store.clone(), metrics.clone(), service.clone()).await?;
            Some(AbortOnDrop(tokio::spawn(task)))
        }
        #[cfg(not(feature = "kube"))]
        Some(_) => anyhow::bail!("--drain-from-endpointslices needs control built with the cargo feature `kube`"),
    };
    tracing::info!(drain_ttl_secs = config.drain_ttl_secs, "drains");
    let recovery = Arc::new(crate::recover::Recovery::new(settings).context("recovery")?);
    let state = AppState { store, metrics, recovery };
    let permits = Arc::new(Semaphore::new(usize::try_from(config.max_in_flight).unwrap_or(usize::MAX)));
    let status_auth = status_page::auth::StatusAuth::new(auth.clone(), config.status_auth()?);
    let page = status_page::StatusPage::new(state.clone(), backend);
    let app = api::router_with_permits(state.clone(), auth, config.max_body_bytes, permits.clone())
        .merge(status_page::router(page, status_auth, permits.clone()));
    // One shutdown for both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let _signal = AbortOnDrop(tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    }));
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    tracing::info!(addr = %listeners.api.local_addr()?, "listening");
    let api = async { axum::serve(listeners.api, app).with_graceful_shutdown(until_stopped()).await.context("http server") };
    let replay_tls = config.replay_tls().map(|files| mtls::server_config(&files)).transpose()?;
    let replay = async {
        let Some(listener) = listeners.replay else { return Ok(()) };
        let app = replay_listener::router(state, permits, config.max_body_bytes);
        let addr = listener.local_addr()?;
        match replay_tls {
            Some(tls) => {
                tracing::info!(%addr, "replay listener (mutual TLS: clients with a certificate of --replay-client-ca only)");
                mtls::serve(listener, tls, app, until_stopped.clone()).await.context("replay listener")
            }
            None => {
                tracing::warn!(%addr, "replay listener without --replay-tls-*: plain HTTP, no credential; keep it reachable by Envoy only");
                axum::serve(listener, app).with_graceful_shutdown(until_stopped()).await.context("replay listener")
            }
        }
    };
    tokio::try_join!(api, replay)?;
    drop(watcher);
    drop(slices);
    tracing::info!("stopped");
    Ok(())
}

/// Aborts a background task when dropped (also when `run` returns early with an error).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(feature = "tls")]
fn check_tls_support(_url: &str) -> anyhow::Result<()> {
    // Installing fails only when a provider is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn check_tls_support(url: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !url.starts_with("rediss://"),
        "rediss:// needs TLS support: build mcp-affinity-control with `--features tls`"
    );
    Ok(())
}
