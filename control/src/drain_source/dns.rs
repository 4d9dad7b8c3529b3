//! Draining from the endpoint source: with `--endpoints-dns NAME:PORT` (a Kubernetes
//! headless Service), a background task resolves the name every
//! `--endpoints-refresh-secs` and turns what changed into drains.
//!
//! A terminating pod leaves its headless Service's DNS answer (its endpoint is no longer
//! ready) while it still runs its grace period, so:
//!
//! - an address that was in the previous resolution and is missing now is **drained**
//!   with source `dns` (unless it is draining already, e.g. from its `preStop` hook);
//! - a `dns` drain whose address resolves again is **undone** (the pod is back, or the
//!   address belongs to a new pod). Drains from other sources (`admin`) are never undone
//!   automatically;
//! - a failed resolution, or one that returns no address at all, changes nothing (and is
//!   logged): a DNS outage must not drain every pod. The first successful resolution only
//!   sets the baseline (nothing can have disappeared yet), though it may undo `dns`
//!   drains of addresses that resolve.
//!
//! Several control instances sharing a store each run the task; drains and undrains are
//! idempotent. An instance whose resolver still returns an address that another instance
//! already saw disappear may undo that `dns` drain, and drains it again itself at its own
//! next refresh once the address is gone for it too.
//!
//! The decision is [`dns_changes`], a pure function; [`DnsDrainer`] applies it to a store.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{DrainChanges, apply};
use crate::metrics::Metrics;
use crate::recover::endpoints::EndpointSource;
use crate::store::{Drain, DrainSource, SessionStore};

/// Longest wait for one DNS resolution of the watcher.
pub const MAX_RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The changes a resolution `current` calls for, given the `previous` successful one
/// (`None` before the first) and the drains in the store (`drains`):
/// `drain` = in `previous`, not in `current`, and not draining already (from any
/// source); `undrain` = drains with source `dns` whose upstream is in `current`.
/// `current` must come from a successful, non-empty resolution.
pub fn dns_changes(previous: Option<&BTreeSet<SocketAddr>>, current: &BTreeSet<SocketAddr>, drains: &[Drain]) -> DrainChanges {
    let draining: BTreeSet<SocketAddr> = drains.iter().filter_map(|d| d.upstream.parse().ok()).collect();
    let drain = previous
        .map(|prev| prev.difference(current).filter(|a| !draining.contains(a)).copied().collect())
        .unwrap_or_default();
    let mut undrain: Vec<SocketAddr> = drains
        .iter()
        .filter(|d| d.source == DrainSource::Dns)
        .filter_map(|d| d.upstream.parse::<SocketAddr>().ok())
        .filter(|a| current.contains(a))
        .collect();
    undrain.sort_unstable();
    DrainChanges { drain, undrain }
}

/// The watcher's memory: the last successful resolution.
#[derive(Debug, Default)]
pub struct DnsDrainer {
    previous: Option<BTreeSet<SocketAddr>>,
}

impl DnsDrainer {
    /// A watcher that has not resolved yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last resolution the watcher acted on completely (`None` before the first).
    pub fn previous(&self) -> Option<&BTreeSet<SocketAddr>> {
        self.previous.as_ref()
    }

    /// Applies one resolution result to `store`: drains and undrains per [`dns_changes`]
    /// and returns what it changed. A failed or empty resolution changes nothing. The
    /// resolution becomes the baseline of the next refresh only when every store
    /// operation succeeded, so a failed change is retried then.
    ///
    /// # Errors
    /// A message when the resolution failed or was empty, or when a store operation failed
    /// (changes made before it stay made).
    pub async fn apply<S: SessionStore>(
        &mut self,
        store: &S,
        metrics: &Metrics,
        resolved: Result<Vec<SocketAddr>, String>,
    ) -> Result<DrainChanges, String> {
        let current: BTreeSet<SocketAddr> = resolved?.into_iter().collect();
        if current.is_empty() {
            return Err("the name resolved to no address; changing nothing".into());
        }
        let drains = store.draining().await.map_err(|e| format!("reading the draining upstreams: {e}"))?;
        let changes = dns_changes(self.previous.as_ref(), &current, &drains);
        apply(store, metrics, drains.len(), &changes, DrainSource::Dns).await?;
        self.previous = Some(current);
        Ok(changes)
    }
}

/// Resolves `source` every `period` and applies each result with a [`DnsDrainer`], until
/// the task is dropped or aborted. Every failure is logged and retried at the next period.
pub async fn watch<S: SessionStore>(store: Arc<S>, metrics: Arc<Metrics>, source: EndpointSource, period: Duration) {
    let mut drainer = DnsDrainer::new();
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let resolved = source.resolve(period.min(MAX_RESOLVE_TIMEOUT)).await;
        if let Err(e) = drainer.apply(store.as_ref(), &metrics, resolved).await {
            tracing::warn!(source = ?source, error = e.as_str(), "endpoint refresh changed nothing");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::memory::MemoryStore;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn set(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|s| a(s)).collect()
    }

    fn drain(upstream: &str, source: DrainSource) -> Drain {
        Drain::new(a(upstream), source, 1)
    }

    #[test]
    fn diff_drains_what_disappeared_and_undoes_dns_drains_that_resolve() {
        let prev = set(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        // First resolution: a baseline, nothing can have disappeared.
        assert_eq!(dns_changes(None, &prev, &[]), DrainChanges::default());
        // Unchanged: nothing.
        assert!(dns_changes(Some(&prev), &prev, &[]).is_empty());
        // 10.0.0.2 left, 10.0.0.4 is new.
        let cur = set(&["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"]);
        assert_eq!(dns_changes(Some(&prev), &cur, &[]), DrainChanges { drain: vec![a("10.0.0.2:80")], undrain: vec![] });
        // Already draining (its preStop hook ran first, or an earlier refresh): not again.
        for source in [DrainSource::Admin, DrainSource::Dns] {
            assert!(dns_changes(Some(&prev), &cur, &[drain("10.0.0.2:80", source)]).is_empty(), "{source:?}");
        }
        // Several disappear at once (sorted).
        let cur2 = set(&["10.0.0.2:80"]);
        assert_eq!(dns_changes(Some(&prev), &cur2, &[]).drain, [a("10.0.0.1:80"), a("10.0.0.3:80")]);
        // A dns drain whose address resolves again is undone; an admin drain never is;
        // a dns drain of an address still missing stays.
        let drains = [
            drain("10.0.0.1:80", DrainSource::Dns),
            drain("10.0.0.3:80", DrainSource::Admin),
            drain("10.0.0.9:80", DrainSource::Dns),
            drain("10.0.0.4:80", DrainSource::Other),
        ];
        assert_eq!(dns_changes(Some(&cur), &cur, &drains), DrainChanges { drain: vec![], undrain: vec![a("10.0.0.1:80")] });
        // Even on the first resolution (control restarted meanwhile).
        assert_eq!(dns_changes(None, &cur, &drains).undrain, [a("10.0.0.1:80")]);
        // IPv6 works the same way.
        let v6 = set(&["[fd00::1]:8080", "[fd00::2]:8080"]);
        assert_eq!(dns_changes(Some(&v6), &set(&["[fd00::2]:8080"]), &[]).drain, [a("[fd00::1]:8080")]);
    }

    #[tokio::test]
    async fn drainer_applies_changes_and_ignores_failures() {
        let store = MemoryStore::with_clock(Duration::from_secs(60), 10, Arc::new(ManualClock::new(1_000)));
        let metrics = Metrics::new();
        let mut w = DnsDrainer::new();
        let ok = |list: &[&str]| Ok(list.iter().map(|s| a(s)).collect::<Vec<_>>());
        assert_eq!(w.apply(&store, &metrics, ok(&["10.0.0.1:80", "10.0.0.2:80"])).await.unwrap(), DrainChanges::default());
        // A failed or empty resolution changes nothing and keeps the baseline.
        assert!(w.apply(&store, &metrics, Err("SERVFAIL".into())).await.is_err());
        assert!(w.apply(&store, &metrics, ok(&[])).await.is_err());
        assert_eq!(w.previous(), Some(&set(&["10.0.0.1:80", "10.0.0.2:80"])));
        assert!(store.draining().await.unwrap().is_empty());
        // 10.0.0.2 leaves: drained with source dns.
        let changes = w.apply(&store, &metrics, ok(&["10.0.0.1:80"])).await.unwrap();
        assert_eq!(changes.drain, [a("10.0.0.2:80")]);
        let drains = store.draining().await.unwrap();
        assert_eq!((drains.len(), drains[0].upstream.as_str(), drains[0].source), (1, "10.0.0.2:80", DrainSource::Dns));
        // An admin drain of 10.0.0.1 (still resolving) is left alone.
        store.drain(a("10.0.0.1:80"), DrainSource::Admin).await.unwrap();
        assert!(w.apply(&store, &metrics, ok(&["10.0.0.1:80"])).await.unwrap().is_empty());
        // 10.0.0.2 resolves again: its dns drain is undone; the admin drain stays.
        let changes = w.apply(&store, &metrics, ok(&["10.0.0.1:80", "10.0.0.2:80"])).await.unwrap();
        assert_eq!(changes.undrain, [a("10.0.0.2:80")]);
        let left: Vec<String> = store.draining().await.unwrap().into_iter().map(|d| d.upstream).collect();
        assert_eq!(left, ["10.0.0.1:80"]);
        let text = metrics.render(crate::store::StoreStats::default());
        assert!(text.contains("mcp_affinity_control_upstreams_draining 1"), "{text}");
    }
}
