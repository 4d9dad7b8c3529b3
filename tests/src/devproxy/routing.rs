//! Upstream selection, as the `envoy/` configurations route: a request carrying the pin
//! header goes to the host it names; any other request is load-balanced round robin over
//! the service's upstream hosts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;

/// How the pin header is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PinRouting {
    /// `ORIGINAL_DST` cluster with `use_http_header: true`: the header holds `ip:port` and
    /// Envoy connects there, whatever it is (Envoy docs, "Original destination" cluster).
    /// An unparsable value leaves no host: 503 "no healthy upstream".
    OriginalDst,
    /// `envoy.http.stateful_session.header`, `strict: false`: base64(`ip:port`) overrides
    /// the load balancer when that host is a member of the cluster; else round robin.
    StatefulSession,
    /// The same with `strict: true`: a host that is not (or no longer) a member answers 503.
    StatefulSessionStrict,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Host(SocketAddr),
    /// No host could be selected (Envoy: 503 "no healthy upstream", flag UH).
    NoHealthyUpstream,
}

/// Round-robin load balancer over the service's hosts plus the pin-header rules.
pub struct Router {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
    mode: PinRouting,
}

impl Router {
    pub fn new(upstreams: Vec<SocketAddr>, mode: PinRouting) -> Self {
        Router { upstreams, next: AtomicUsize::new(0), mode }
    }

    /// Next host in round-robin order.
    pub fn round_robin(&self) -> Target {
        if self.upstreams.is_empty() {
            return Target::NoHealthyUpstream;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Target::Host(self.upstreams[i])
    }

    /// Chooses the host for a request whose pin header is `pin` (None: absent).
    pub fn route(&self, pin: Option<&[u8]>) -> Target {
        let Some(value) = pin else { return self.round_robin() };
        match self.mode {
            PinRouting::OriginalDst => parse(value).map_or(Target::NoHealthyUpstream, Target::Host),
            PinRouting::StatefulSession | PinRouting::StatefulSessionStrict => {
                let host = base64::engine::general_purpose::STANDARD.decode(value).ok().and_then(|v| parse(&v));
                match host {
                    Some(h) if self.upstreams.contains(&h) => Target::Host(h),
                    _ if self.mode == PinRouting::StatefulSessionStrict => Target::NoHealthyUpstream,
                    _ => self.round_robin(),
                }
            }
        }
    }
}

fn parse(v: &[u8]) -> Option<SocketAddr> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let r = Router::new(vec![a, b], PinRouting::OriginalDst);
        assert_eq!((r.route(None), r.route(None), r.route(None)), (Target::Host(a), Target::Host(b), Target::Host(a)));
        assert_eq!(r.route(Some(b"127.0.0.9:9")), Target::Host("127.0.0.9:9".parse().unwrap()));
        assert_eq!(r.route(Some(b"nonsense")), Target::NoHealthyUpstream);
        let s = Router::new(vec![a, b], PinRouting::StatefulSessionStrict);
        assert_eq!(s.route(Some(b"MTI3LjAuMC4xOjI=")), Target::Host(b));
        assert_eq!(s.route(Some(b"MTI3LjAuMC45Ojk=")), Target::NoHealthyUpstream);
        let l = Router::new(vec![a, b], PinRouting::StatefulSession);
        assert_eq!(l.route(Some(b"MTI3LjAuMC45Ojk=")), Target::Host(a));
    }
}
