//! Draining upstream hosts (a pod about to stop in a rolling update): control's
//! `GET /v1/upstreams/draining` answer, which every filter polls, and its elements, which
//! `POST /v1/upstreams/{upstream}/drain` answers (`docs/draining.md`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Who started a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainSource {
    /// `POST /v1/upstreams/{upstream}/drain` (e.g. a pod's Kubernetes `preStop` hook).
    Admin,
    /// The `--endpoints-dns` watcher: the address stopped resolving (a terminating pod
    /// leaves its headless Service). Undone automatically when it resolves again.
    Dns,
    /// The EndpointSlice watcher (`--drain-from-endpointslices`, cargo feature `kube`):
    /// the endpoint is terminating or not ready. Undone automatically when it is ready.
    Endpointslice,
    /// A source this version does not know (written by a newer control version sharing
    /// the store). Treated like `admin`: never undone automatically.
    #[serde(other)]
    Other,
}

impl DrainSource {
    /// The serialised name: `admin`, `dns`, `endpointslice` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainSource::Admin => "admin",
            DrainSource::Dns => "dns",
            DrainSource::Endpointslice => "endpointslice",
            DrainSource::Other => "other",
        }
    }

    /// The source named `name` ([`DrainSource::Other`] for a name this version does not know).
    pub fn parse(name: &str) -> DrainSource {
        match name {
            "admin" => DrainSource::Admin,
            "dns" => DrainSource::Dns,
            "endpointslice" => DrainSource::Endpointslice,
            _ => DrainSource::Other,
        }
    }
}

/// The drain of one upstream host: its sessions are to be moved off it. JSON shape:
/// `{"upstream":"127.0.0.2:8080","since_ms":1700000000000,"source":"admin","moved":0,"failed":0,"last_move_ms":null}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The draining upstream host, `ip:port` in canonical form (`SocketAddr::to_string()`:
    /// `10.0.0.7:8080`, `[fd00::7]:8080`), as Envoy's `upstream.address` spells it.
    pub upstream: String,
    /// Unix milliseconds (control's store clock) when the drain began. Kept when the
    /// upstream is drained again while draining.
    pub since_ms: u64,
    /// Who started it.
    pub source: DrainSource,
    /// Sessions moved off this upstream by drain-moves (recoveries with reason
    /// `draining` that re-initialized the session elsewhere and stored the new pin).
    pub moved: u64,
    /// Drain-moves of this upstream that could not be made (no live non-draining endpoint
    /// accepted the session, deadline, lost race): the session stayed on the upstream.
    pub failed: u64,
    /// Unix milliseconds of the last successful drain-move (`null` before the first), so
    /// `last_move_ms - since_ms` is the time from the drain to its last moved session.
    pub last_move_ms: Option<u64>,
    /// Unfinished tasks (MCP 2026-07-28 tasks extension) pinned to this upstream: created,
    /// not seen in a terminal status (`completed`, `failed`, `cancelled`), not expired.
    /// They cannot move; the pod's `preStop` hook waits for this to reach 0
    /// (`docs/draining.md`). Filled in by the API; 0 when absent (older control).
    #[serde(default)]
    pub tasks: u64,
}

impl Drain {
    /// A drain of `upstream` by `source` beginning at `now_ms`, nothing moved yet.
    pub fn new(upstream: SocketAddr, source: DrainSource, now_ms: u64) -> Drain {
        Drain { upstream: upstream.to_string(), since_ms: now_ms, source, moved: 0, failed: 0, last_move_ms: None, tasks: 0 }
    }
}

/// Body of `GET /v1/upstreams/draining`: every unexpired drain, sorted by `upstream`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainingList {
    pub draining: Vec<Drain>,
    /// While something drains: control's endpoints that are not draining and accept a TCP
    /// connection (`ip:port`, sorted), where the filter sends new work — a 2025-era `initialize`, a 2026-era
    /// `tools/call` or `subscriptions/listen` — so that a draining pod gets none. Empty
    /// (and absent from the JSON) while nothing drains, or when no endpoint serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serving: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_round_trips_and_unknown_sources_read_as_other() {
        let list = DrainingList {
            draining: vec![Drain::new("10.0.0.7:8080".parse().unwrap(), DrainSource::Dns, 5), Drain { last_move_ms: Some(9), moved: 2, tasks: 3, ..Drain::new("[fd00::7]:80".parse().unwrap(), DrainSource::Admin, 1) }],
            serving: vec!["10.0.0.8:8080".into()],
        };
        let text = serde_json::to_string(&list).unwrap();
        assert_eq!(serde_json::from_str::<DrainingList>(&text).unwrap(), list);
        assert!(text.contains(r#""upstream":"[fd00::7]:80""#) && text.contains(r#""source":"dns""#), "{text}");
        let newer = r#"{"upstream":"1.1.1.1:1","since_ms":1,"source":"operator","moved":0,"failed":0,"last_move_ms":null}"#;
        assert_eq!(serde_json::from_str::<Drain>(newer).unwrap().source, DrainSource::Other);
        assert_eq!(serde_json::from_str::<Drain>(newer).unwrap().tasks, 0, "an older control's drain has no `tasks`");
        assert_eq!(serde_json::to_string(&DrainingList::default()).unwrap(), r#"{"draining":[]}"#);
        for s in [DrainSource::Admin, DrainSource::Dns, DrainSource::Endpointslice, DrainSource::Other] {
            assert_eq!(DrainSource::parse(s.as_str()), s);
        }
    }
}
