//! Where re-initialized sessions may go: a static list of MCP server endpoints
//! (`--endpoints`) or a DNS name resolved at every recovery to all its addresses
//! (`--endpoints-dns`, e.g. a Kubernetes headless Service), and the order in which a
//! recovery tries them (draining endpoints last, or not at all for a drain-move).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::Reason;

/// The configured source of MCP server endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    /// `--endpoints ip:port,...` (possibly empty: no endpoint, every recovery fails).
    Static(Vec<SocketAddr>),
    /// `--endpoints-dns NAME:PORT`, resolved with the system resolver at recovery time.
    Dns(String),
}

impl EndpointSource {
    /// The current endpoints, deduplicated and sorted (so that rotation is stable).
    ///
    /// # Errors
    /// A message when the DNS name cannot be resolved within `timeout`.
    pub async fn resolve(&self, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
        let mut out = match self {
            EndpointSource::Static(list) => list.clone(),
            EndpointSource::Dns(name) => match tokio::time::timeout(timeout, tokio::net::lookup_host(name.as_str())).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(format!("resolve {name}: {e}")),
                Err(_) => return Err(format!("resolve {name}: no answer within {timeout:?}")),
            },
        };
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// `true` when `endpoint` is the upstream the filter reported as failed (`failed` is
/// compared as an address when it parses as one, else as text).
pub fn is_failed(endpoint: SocketAddr, failed: &str) -> bool {
    match failed.parse::<SocketAddr>() {
        Ok(addr) => addr == endpoint,
        Err(_) => endpoint.to_string() == failed,
    }
}

/// The order in which a recovery tries `endpoints`, given the upstreams currently
/// `draining`:
///
/// 1. every endpoint that is neither the failed upstream nor draining, rotated by `turn`
///    (so that the sessions of a dead or draining pod spread over the live ones);
/// 2. the failed upstream, if it is not draining — except after `connect_failure` (the
///    pod is gone). After `session_unknown`, `session_suspect` or `reset_after_send` the
///    pod may be alive again (restarted in place), so it comes late rather than never;
/// 3. the draining endpoints (rotated by `turn` too): a draining pod still serves for
///    its grace period, which beats failing the session, but is never preferred;
/// 4. the failed upstream if it is draining (same `connect_failure` rule).
///
/// For reason `draining` (moving a session off the failed, draining upstream) only the
/// first group is returned: neither the failed upstream nor any draining endpoint.
pub fn candidates(
    endpoints: &[SocketAddr],
    failed: &str,
    reason: Reason,
    turn: usize,
    draining: &BTreeSet<SocketAddr>,
) -> Vec<SocketAddr> {
    let (failed_ones, others): (Vec<SocketAddr>, Vec<SocketAddr>) =
        endpoints.iter().copied().partition(|e| is_failed(*e, failed));
    let (mut live, mut drained): (Vec<SocketAddr>, Vec<SocketAddr>) = others.into_iter().partition(|e| !draining.contains(e));
    rotate(&mut live, turn);
    if reason == Reason::Draining {
        return live;
    }
    rotate(&mut drained, turn);
    let (failed_live, failed_drained): (Vec<SocketAddr>, Vec<SocketAddr>) =
        failed_ones.into_iter().partition(|e| !draining.contains(e));
    let failed_allowed = reason != Reason::ConnectFailure;
    let mut out = live;
    if failed_allowed {
        out.extend(failed_live);
    }
    out.extend(drained);
    if failed_allowed {
        out.extend(failed_drained);
    }
    out
}

fn rotate(list: &mut [SocketAddr], turn: usize) {
    if !list.is_empty() {
        let n = turn % list.len();
        list.rotate_left(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn none() -> BTreeSet<SocketAddr> {
        BTreeSet::new()
    }

    fn set(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|s| a(s)).collect()
    }

    /// `candidates` without drains.
    fn plain(endpoints: &[SocketAddr], failed: &str, reason: Reason, turn: usize) -> Vec<SocketAddr> {
        candidates(endpoints, failed, reason, turn, &none())
    }

    #[test]
    fn skips_or_demotes_the_failed_upstream_and_rotates() {
        let candidates = plain;
        let eps = [a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")];
        assert_eq!(candidates(&eps, "10.0.0.2:80", Reason::ConnectFailure, 0), [a("10.0.0.1:80"), a("10.0.0.3:80")]);
        assert_eq!(candidates(&eps, "10.0.0.2:80", Reason::ConnectFailure, 1), [a("10.0.0.3:80"), a("10.0.0.1:80")]);
        assert_eq!(
            candidates(&eps, "10.0.0.2:80", Reason::SessionUnknown, 0),
            [a("10.0.0.1:80"), a("10.0.0.3:80"), a("10.0.0.2:80")]
        );
        assert_eq!(candidates(&[a("10.0.0.2:80")], "10.0.0.2:80", Reason::ConnectFailure, 5), []);
        assert_eq!(candidates(&[a("10.0.0.2:80")], "10.0.0.2:80", Reason::ResetAfterSend, 5), [a("10.0.0.2:80")]);
        assert_eq!(candidates(&[a("10.0.0.2:80")], "10.0.0.2:80", Reason::SessionSuspect, 5), [a("10.0.0.2:80")]);
        // An unparsable failed upstream (e.g. a name) skips nothing.
        assert_eq!(candidates(&eps, "pod-a:80", Reason::ConnectFailure, 0).len(), 3);
    }

    #[test]
    fn draining_endpoints_come_last_and_never_for_a_drain_move() {
        let eps = [a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80"), a("10.0.0.4:80"), a("10.0.0.5:80")];
        let draining = set(&["10.0.0.2:80", "10.0.0.4:80"]);
        // Live endpoints rotated first, the draining ones (rotated too) after them.
        assert_eq!(
            candidates(&eps, "10.0.0.1:80", Reason::ConnectFailure, 0, &draining),
            [a("10.0.0.3:80"), a("10.0.0.5:80"), a("10.0.0.2:80"), a("10.0.0.4:80")]
        );
        assert_eq!(
            candidates(&eps, "10.0.0.1:80", Reason::ConnectFailure, 1, &draining),
            [a("10.0.0.5:80"), a("10.0.0.3:80"), a("10.0.0.4:80"), a("10.0.0.2:80")]
        );
        // The failed upstream (not draining, may be restarted in place) before the draining ones.
        assert_eq!(
            candidates(&eps, "10.0.0.1:80", Reason::SessionUnknown, 0, &draining),
            [a("10.0.0.3:80"), a("10.0.0.5:80"), a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.4:80")]
        );
        // A failed upstream that is draining comes after everything, and never after a
        // connection failure.
        assert_eq!(
            candidates(&eps, "10.0.0.2:80", Reason::ResetAfterSend, 0, &draining),
            [a("10.0.0.1:80"), a("10.0.0.3:80"), a("10.0.0.5:80"), a("10.0.0.4:80"), a("10.0.0.2:80")]
        );
        assert_eq!(
            candidates(&eps, "10.0.0.2:80", Reason::ConnectFailure, 0, &draining),
            [a("10.0.0.1:80"), a("10.0.0.3:80"), a("10.0.0.5:80"), a("10.0.0.4:80")]
        );
        // Every endpoint draining: they are still candidates for a failure recovery.
        let all = set(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80"]);
        assert_eq!(candidates(&eps, "10.0.0.1:80", Reason::SessionSuspect, 0, &all).len(), 5);
        // Reason draining: only live, non-draining endpoints other than the failed one.
        assert_eq!(
            candidates(&eps, "10.0.0.2:80", Reason::Draining, 0, &draining),
            [a("10.0.0.1:80"), a("10.0.0.3:80"), a("10.0.0.5:80")]
        );
        assert_eq!(
            candidates(&eps, "10.0.0.2:80", Reason::Draining, 2, &draining),
            [a("10.0.0.5:80"), a("10.0.0.1:80"), a("10.0.0.3:80")]
        );
        // The failed upstream is excluded even when it is (no longer) in the draining list.
        assert_eq!(
            candidates(&eps, "10.0.0.1:80", Reason::Draining, 0, &draining),
            [a("10.0.0.3:80"), a("10.0.0.5:80")]
        );
        assert_eq!(candidates(&eps, "10.0.0.1:80", Reason::Draining, 0, &all), []);
        assert_eq!(candidates(&[a("10.0.0.2:80")], "10.0.0.2:80", Reason::Draining, 0, &none()), []);
        // Drains of addresses that are not endpoints change nothing.
        assert_eq!(
            candidates(&eps[..2], "10.0.0.1:80", Reason::ConnectFailure, 0, &set(&["10.9.9.9:80"])),
            [a("10.0.0.2:80")]
        );
    }

    #[tokio::test]
    async fn resolves_static_and_dns() {
        let s = EndpointSource::Static(vec![a("10.0.0.2:80"), a("10.0.0.1:80"), a("10.0.0.2:80")]);
        assert_eq!(s.resolve(Duration::from_secs(1)).await.unwrap(), [a("10.0.0.1:80"), a("10.0.0.2:80")]);
        let d = EndpointSource::Dns("localhost:8080".into());
        let got = d.resolve(Duration::from_secs(5)).await.unwrap();
        assert!(got.iter().all(|e| e.ip().is_loopback() && e.port() == 8080), "{got:?}");
        assert!(!got.is_empty());
    }
}
