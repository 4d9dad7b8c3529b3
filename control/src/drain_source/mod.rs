//! Where drains come from besides the admin API: the endpoint source tells control that a
//! pod is going away, and control drains its address (see `docs/draining.md`).
//!
//! - [`dns`]: `--endpoints-dns` (a headless Service): an address that stops resolving;
//! - [`endpointslices`] (cargo feature `kube`): `--drain-from-endpointslices`, the
//!   Service's EndpointSlices watched through the Kubernetes API: an endpoint that is
//!   terminating or not ready.
//!
//! Both decide with a pure function into [`DrainChanges`] and write them with [`apply`].
//! Each source undoes only its own drains.

pub mod dns;
#[cfg(feature = "kube")]
pub mod endpointslices;

use std::net::SocketAddr;

use crate::metrics::Metrics;
use crate::store::{DrainSource, SessionStore};

/// What one look at the endpoint source changes in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainChanges {
    /// Addresses to drain, sorted; none of them draining already.
    pub drain: Vec<SocketAddr>,
    /// Addresses whose drain (by this source) is to be undone, sorted.
    pub undrain: Vec<SocketAddr>,
}

impl DrainChanges {
    /// `true` when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.drain.is_empty() && self.undrain.is_empty()
    }
}

/// Writes `changes` to `store` with `source`, logging each, and sets the draining gauge
/// (`draining_before` = the number of drains the changes were computed against).
///
/// # Errors
/// A message naming the store operation that failed (changes made before it stay made).
pub async fn apply<S: SessionStore>(
    store: &S,
    metrics: &Metrics,
    draining_before: usize,
    changes: &DrainChanges,
    source: DrainSource,
) -> Result<(), String> {
    metrics.set_upstreams_draining(draining_before);
    for &upstream in &changes.drain {
        store.drain(upstream, source).await.map_err(|e| format!("draining {upstream}: {e}"))?;
        tracing::info!(%upstream, source = source.as_str(), "upstream draining: the endpoint source says it is going away");
    }
    for &upstream in &changes.undrain {
        store.undrain(upstream).await.map_err(|e| format!("undraining {upstream}: {e}"))?;
        tracing::info!(%upstream, source = source.as_str(), "upstream no longer draining: the endpoint source has it back");
    }
    // `drain` holds no draining upstream and `undrain` only draining ones.
    metrics.set_upstreams_draining(draining_before + changes.drain.len() - changes.undrain.len());
    Ok(())
}
