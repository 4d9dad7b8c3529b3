//! What the in-process router tests share.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use mcp_affinity_control::api::{AppState, router};
use mcp_affinity_control::auth::Auth;
use mcp_affinity_control::metrics::Metrics;
use mcp_affinity_control::recover::endpoints::EndpointSource;
use mcp_affinity_control::recover::{Recovery, RecoverySettings};
use mcp_affinity_control::store::memory::MemoryStore;

/// The real router over `store`: bearer token `t`, 1 MiB bodies, 64 requests in flight, no
/// recovery endpoints.
pub fn router_over(store: MemoryStore) -> Router {
    let settings = RecoverySettings {
        endpoints: EndpointSource::Static(Vec::new()),
        replay_safe_methods: Default::default(),
        timeout: Duration::from_secs(1),
        max_response_bytes: 1024,
    };
    let state = AppState {
        store: Arc::new(store),
        metrics: Arc::new(Metrics::new()),
        recovery: Arc::new(Recovery::new(settings).unwrap()),
    };
    router(state, Auth::token("t"), 1 << 20, 64)
}
