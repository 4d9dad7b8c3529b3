//! Draining from a Kubernetes Service's EndpointSlices (cargo feature `kube`;
//! `--drain-from-endpointslices NAMESPACE/SERVICE[:PORT_NAME]`).
//!
//! Control watches the slices labelled `kubernetes.io/service-name=SERVICE` in the
//! namespace through the API server (the `kube` crate: in-cluster service account, or
//! `KUBECONFIG`; RBAC: `list` and `watch` on `endpointslices.discovery.k8s.io`). Whenever
//! the complete set of slices changes:
//!
//! - an endpoint that is terminating (`conditions.terminating: true`) or not ready
//!   (`conditions.ready: false`) is **drained** with source `endpointslice`, unless it is
//!   draining already. Kubernetes marks a pod terminating the moment its deletion begins,
//!   while it still runs its `preStop` hook and grace period: its sessions move before it
//!   stops;
//! - an `endpointslice` drain whose address is ready again is **undone**; other sources'
//!   drains never are.
//!
//! An address is `ip:port` with the slice's port (named `PORT_NAME`, or the slice's only
//! port). Watch errors are logged and the watch resumes with backoff; a store failure is
//! logged and retried at the next change. The decision is the pure function
//! [`endpointslice_changes`] of [`slice_state`].

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};

use super::{DrainChanges, apply};
use crate::config::EndpointSlices;
use crate::metrics::Metrics;
use crate::store::{Drain, DrainSource, SessionStore};

/// The Service's endpoint addresses as its slices describe them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceState {
    /// Terminating or not ready: going away.
    pub going: BTreeSet<SocketAddr>,
    /// Ready and not terminating.
    pub ready: BTreeSet<SocketAddr>,
}

/// Reads `slices`: every endpoint address with the slice's port (the one named
/// `port_name`, or the only port; a slice without such a port is skipped). A missing
/// `ready` condition counts as ready (Kubernetes API: "nil should be interpreted as
/// ready"). An address going away in one slice is not ready, whatever another slice says.
pub fn slice_state(slices: &[&EndpointSlice], port_name: Option<&str>) -> SliceState {
    let mut state = SliceState::default();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = match port_name {
            Some(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
            None if ports.len() == 1 => ports.first(),
            None => None,
        };
        let Some(port) = port.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()) else {
            tracing::debug!(slice = ?slice.metadata.name, "EndpointSlice without the port to drain by; skipped");
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let terminating = conditions.and_then(|c| c.terminating) == Some(true);
            let ready = conditions.and_then(|c| c.ready) != Some(false);
            for address in endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let address = SocketAddr::new(address, port);
                if terminating || !ready {
                    state.going.insert(address);
                } else {
                    state.ready.insert(address);
                }
            }
        }
    }
    let going = state.going.clone();
    state.ready.retain(|a| !going.contains(a));
    state
}

/// The changes `state` calls for, given the drains in the store: `drain` = going away
/// and not draining already (from any source); `undrain` = `endpointslice` drains whose
/// address is ready. Both sorted.
pub fn endpointslice_changes(state: &SliceState, drains: &[Drain]) -> DrainChanges {
    let draining: BTreeSet<SocketAddr> = drains.iter().filter_map(|d| d.upstream.parse().ok()).collect();
    let drain = state.going.difference(&draining).copied().collect();
    let undrain: BTreeSet<SocketAddr> = drains
        .iter()
        .filter(|d| d.source == DrainSource::Endpointslice)
        .filter_map(|d| d.upstream.parse().ok())
        .filter(|a| state.ready.contains(a))
        .collect();
    DrainChanges { drain, undrain: undrain.into_iter().collect() }
}

/// Connects to the API server and returns the watch, which runs until dropped.
///
/// # Errors
/// When no Kubernetes client configuration is found (not in a pod with a service
/// account, no `KUBECONFIG`).
pub async fn watch<S: SessionStore>(
    store: Arc<S>,
    metrics: Arc<Metrics>,
    service: EndpointSlices,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let client = Client::try_default().await.context("Kubernetes client (in-cluster service account or KUBECONFIG)")?;
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let config = watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", service.service));
    Ok(async move {
        let (reader, writer) = reflector::store();
        let mut events = reflector(writer, watcher(api, config)).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Err(e) => {
                    tracing::warn!(error = %e, "EndpointSlice watch failed; retrying");
                    continue;
                }
                // Wait for the complete list before deciding anything.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => {}
            }
            let slices = reader.state();
            let slices: Vec<&EndpointSlice> = slices.iter().map(AsRef::as_ref).collect();
            let state = slice_state(&slices, service.port_name.as_deref());
            let result = match store.draining().await {
                Ok(drains) => apply(store.as_ref(), &metrics, drains.len(), &endpointslice_changes(&state, &drains), DrainSource::Endpointslice).await,
                Err(e) => Err(format!("reading the draining upstreams: {e}")),
            };
            if let Err(e) = result {
                tracing::warn!(error = e.as_str(), "EndpointSlice change not applied; retried at the next change");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(ports: &[(&str, i32)], endpoints: &[(&str, Option<bool>, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(ports.iter().map(|(n, p)| EndpointPort { name: Some((*n).into()), port: Some(*p), ..Default::default() }).collect()),
            endpoints: endpoints
                .iter()
                .map(|(a, ready, terminating)| Endpoint {
                    addresses: vec![(*a).into()],
                    conditions: Some(EndpointConditions { ready: *ready, serving: None, terminating: *terminating }),
                    ..Default::default()
                })
                .collect(),
            metadata: Default::default(),
        }
    }

    fn set(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn terminating_or_not_ready_endpoints_are_going_and_ready_ones_stay() {
        let s = slice(&[("http", 8080)], &[("10.0.0.1", Some(true), Some(false)), ("10.0.0.2", Some(false), Some(true)), ("10.0.0.3", None, None), ("10.0.0.4", Some(false), None), ("not-an-ip", None, None)]);
        let state = slice_state(&[&s], None);
        assert_eq!(state.going, set(&["10.0.0.2:8080", "10.0.0.4:8080"]));
        assert_eq!(state.ready, set(&["10.0.0.1:8080", "10.0.0.3:8080"]), "a missing condition counts as ready");
        // Several ports: the named one, or none.
        let two = slice(&[("metrics", 9090), ("http", 8080)], &[("10.0.0.5", Some(true), None)]);
        assert_eq!(slice_state(&[&two], Some("http")).ready, set(&["10.0.0.5:8080"]));
        assert_eq!(slice_state(&[&two], None), SliceState::default(), "ambiguous port: skipped");
        // Two slices disagreeing during an update: going away wins.
        let other = slice(&[("http", 8080)], &[("10.0.0.2", Some(true), Some(false))]);
        let state = slice_state(&[&s, &other], Some("http"));
        assert!(state.going.contains(&"10.0.0.2:8080".parse().unwrap()) && !state.ready.contains(&"10.0.0.2:8080".parse().unwrap()));
    }

    #[test]
    fn changes_drain_what_goes_and_undo_only_their_own_drains() {
        let state = SliceState { going: set(&["10.0.0.2:80", "10.0.0.3:80"]), ready: set(&["10.0.0.1:80", "10.0.0.4:80", "10.0.0.5:80"]) };
        let drains = [
            Drain::new("10.0.0.3:80".parse().unwrap(), DrainSource::Admin, 1),
            Drain::new("10.0.0.1:80".parse().unwrap(), DrainSource::Endpointslice, 1),
            Drain::new("10.0.0.4:80".parse().unwrap(), DrainSource::Admin, 1),
            Drain::new("10.0.0.5:80".parse().unwrap(), DrainSource::Dns, 1),
        ];
        let changes = endpointslice_changes(&state, &drains);
        assert_eq!(changes.drain, vec!["10.0.0.2:80".parse::<SocketAddr>().unwrap()], "10.0.0.3 drains already");
        assert_eq!(changes.undrain, vec!["10.0.0.1:80".parse::<SocketAddr>().unwrap()], "only its own drains, when ready");
        assert!(endpointslice_changes(&SliceState::default(), &drains).is_empty());
    }
}
