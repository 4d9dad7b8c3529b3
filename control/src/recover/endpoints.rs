//! Where re-initialized sessions may go: a static list of MCP server endpoints
//! (`--endpoints`) or a DNS name resolved at every recovery to all its addresses
//! (`--endpoints-dns`, e.g. a Kubernetes headless Service), and the order in which a
//! recovery tries them.

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

/// The order in which a recovery tries `endpoints`: every endpoint but the failed one,
/// rotated by `turn` (so that the sessions of a dead pod spread over the live ones). The
/// failed upstream is left out after a connection failure; after `session_unknown`,
/// `session_suspect` or `reset_after_send` the pod may be alive again (restarted in
/// place), so it comes last.
pub fn candidates(endpoints: &[SocketAddr], failed: &str, reason: Reason, turn: usize) -> Vec<SocketAddr> {
    let (failed_ones, mut others): (Vec<SocketAddr>, Vec<SocketAddr>) =
        endpoints.iter().copied().partition(|e| is_failed(*e, failed));
    if !others.is_empty() {
        let n = turn % others.len();
        others.rotate_left(n);
    }
    if reason != Reason::ConnectFailure {
        others.extend(failed_ones);
    }
    others
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn skips_or_demotes_the_failed_upstream_and_rotates() {
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
