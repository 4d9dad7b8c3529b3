//! Prometheus metrics, served as text at `GET /metrics`:
//!
//! - `mcp_affinity_control_http_requests_total{route,method,status}` — counter; `route`
//!   is the route template (`/v1/sessions/{id}`), never a session id.
//! - `mcp_affinity_control_store_operation_duration_seconds{op,outcome}` — histogram of
//!   store operations (`op` = get|put|patch|delete|ping|drain|undrain|draining,
//!   `outcome` = ok|error) made by the API handlers.
//! - `mcp_affinity_control_store_records` — gauge, live records (memory store only;
//!   counting Redis keys is not cheap).
//! - `mcp_affinity_control_store_evictions_total` — counter, records evicted at
//!   `--max-sessions` (memory store).
//! - `mcp_affinity_control_recoveries_total{outcome}` — counter of decided recoveries
//!   (`outcome` = replayed|not_replayed|failed|alive; `alive` = a `session_suspect`
//!   whose probe found the session on its pod). Recover calls with reason `draining` are
//!   not recoveries of a failure and are not counted here (nor in
//!   `recovery_duration_seconds`): see `drain_moves_total`.
//! - `mcp_affinity_control_probes_total{result}` — counter of `session_suspect` probes of
//!   the pinned pod (`result` = alive|session_unknown|unreachable).
//! - `mcp_affinity_control_reinitializations_total` — counter, sessions a pod accepted
//!   (`initialize` + `notifications/initialized` succeeded), counted before the new pin is
//!   stored: with working single flight, one per recovered failure whatever the number
//!   of concurrent recoveries.
//! - `mcp_affinity_control_replays_total` — counter, requests replayed on a new pin (and
//!   requests the replay listener sent again to a pod that still knew the session).
//! - `mcp_affinity_control_recovery_duration_seconds` — histogram of decided recoveries.
//! - `mcp_affinity_control_drain_moves_total{outcome}` — counter of drain-moves decided by
//!   this instance (`outcome` = moved|stayed): `moved` = a session this instance
//!   re-initialized off a draining upstream and re-pinned; `stayed` = a move this
//!   instance attempted under the session's lease and could not make. Answers that only
//!   found the session already moved (another call moved it) or its upstream no longer
//!   draining are not counted; the same rule feeds the drains' `moved` / `failed` in the
//!   store, summed over every instance.
//! - `mcp_affinity_control_drain_move_delay_seconds` — histogram, for every `moved`: the
//!   time from the drain's `since_ms` to the move (its maximum bucket shows the time from
//!   a drain to its last moved session; exact per-drain numbers are in the API,
//!   `last_move_ms - since_ms`).
//! - `mcp_affinity_control_upstreams_draining` — gauge, drains in the store when this
//!   instance last read or changed the list (`GET /v1/upstreams/draining`, which filters
//!   poll, drain/undrain, recoveries, the DNS watcher).
//! - `mcp_affinity_control_replay_listener_requests_total{result}` — counter of the
//!   requests Envoy retried to the replay listener ([`crate::replay_listener`]), by how they ended
//!   (`result` = replayed|not_replayed|failed|alive|deleted|session_not_found|
//!   bad_request|store_unavailable|overloaded|internal; `alive` = sent again to the pod
//!   that still knew the session). Recoveries they started are also in `recoveries_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The service's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    store_ops: Family<OpLabels, Histogram, fn() -> Histogram>,
    records: Gauge,
    evictions: Counter,
    evictions_seen: AtomicU64,
    recoveries: Family<OutcomeLabels, Counter>,
    probes: Family<ResultLabels, Counter>,
    reinitializations: Counter,
    replays: Counter,
    recovery_duration: Histogram,
    drain_moves: Family<OutcomeLabels, Counter>,
    drain_move_delay: Histogram,
    upstreams_draining: Gauge,
    replay_requests: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mcp_affinity_control");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by route template, method and status", requests.clone());
        let store_ops = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "store_operation_duration_seconds",
            "Latency of store operations in seconds, by operation and outcome",
            store_ops.clone(),
        );
        let records = Gauge::default();
        registry.register("store_records", "Live session records (memory store only)", records.clone());
        let evictions = Counter::default();
        registry.register("store_evictions", "Records evicted because the store was full", evictions.clone());
        let recoveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "recoveries",
            "Session recoveries by outcome (replayed, not_replayed, failed, alive)",
            recoveries.clone(),
        );
        let probes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "probes",
            "Probes (ping) of the pinned pod for session_suspect, by result (alive, session_unknown, unreachable)",
            probes.clone(),
        );
        let reinitializations = Counter::default();
        registry.register(
            "reinitializations",
            "Sessions re-initialized on a new pod by recovery (stored initialize + initialized, new pin stored)",
            reinitializations.clone(),
        );
        let replays = Counter::default();
        registry.register("replays", "Client requests replayed on the new pin by recovery", replays.clone());
        // 1 ms … ~33 s.
        let recovery_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "recovery_duration_seconds",
            "Latency of decided recoveries in seconds (waiting, re-initialization and replay)",
            recovery_duration.clone(),
        );
        let drain_moves = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "drain_moves",
            "Sessions moved off a draining upstream by this instance (moved), and drain-moves it could not make (stayed)",
            drain_moves.clone(),
        );
        // 50 ms … ~27 min.
        let drain_move_delay = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        registry.register(
            "drain_move_delay_seconds",
            "Time from the start of a drain to each session moved off the drained upstream, in seconds",
            drain_move_delay.clone(),
        );
        let upstreams_draining = Gauge::default();
        registry.register(
            "upstreams_draining",
            "Draining upstreams in the store, as last read or changed by this instance",
            upstreams_draining.clone(),
        );
        let replay_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "replay_listener_requests",
            "Requests Envoy retried to the replay listener, by result (replayed, not_replayed, failed, alive, deleted, \
             session_not_found, bad_request, store_unavailable, overloaded, internal)",
            replay_requests.clone(),
        );
        Metrics {
            registry,
            requests,
            store_ops,
            records,
            evictions,
            evictions_seen: AtomicU64::new(0),
            recoveries,
            probes,
            reinitializations,
            replays,
            recovery_duration,
            drain_moves,
            drain_move_delay,
            upstreams_draining,
            replay_requests,
        }
    }

    /// Counts one answered request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16) {
        let labels = RequestLabels { route: route.to_string(), method: method.to_string(), status };
        self.requests.get_or_create(&labels).inc();
    }

    /// Records the duration of one store operation.
    pub fn observe_store(&self, op: &'static str, ok: bool, elapsed: Duration) {
        let labels = OpLabels { op, outcome: if ok { "ok" } else { "error" } };
        self.store_ops.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// Records one decided recovery (`outcome` = replayed|not_replayed|failed|alive).
    pub fn observe_recovery(&self, outcome: &'static str, elapsed: Duration) {
        self.recoveries.get_or_create(&OutcomeLabels { outcome }).inc();
        self.recovery_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one probe of a pinned pod (`result` = alive|session_unknown|unreachable).
    pub fn count_probe(&self, result: &'static str) {
        self.probes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one successful re-initialization.
    pub fn count_reinitialization(&self) {
        self.reinitializations.inc();
    }

    /// Counts one replayed request.
    pub fn count_replay(&self) {
        self.replays.inc();
    }

    /// Counts one drain-move decided by this instance: `moved` (with `delay` = time from the
    /// drain's start to the move, when known) or stayed.
    pub fn observe_drain_move(&self, moved: bool, delay: Option<Duration>) {
        let outcome = if moved { "moved" } else { "stayed" };
        self.drain_moves.get_or_create(&OutcomeLabels { outcome }).inc();
        if let (true, Some(delay)) = (moved, delay) {
            self.drain_move_delay.observe(delay.as_secs_f64());
        }
    }

    /// Counts one request of the replay listener, by `result` (see the module docs).
    pub fn count_replay_request(&self, result: &'static str) {
        self.replay_requests.get_or_create(&ResultLabels { result }).inc();
    }

    /// Sets the number of draining upstreams (after reading or changing the list).
    pub fn set_upstreams_draining(&self, n: usize) {
        self.upstreams_draining.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The text exposition (OpenMetrics text, which Prometheus reads), after updating the
    /// store gauges from `stats`.
    pub fn render(&self, stats: StoreStats) -> String {
        if let Some(n) = stats.records {
            self.records.set(n as i64);
        }
        let before = self.evictions_seen.swap(stats.evictions, Ordering::Relaxed);
        self.evictions.inc_by(stats.evictions.saturating_sub(before));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_latency_and_store_stats() {
        let m = Metrics::new();
        m.observe_request("/v1/sessions/{id}", "GET", 404);
        m.observe_store("get", true, Duration::from_micros(250));
        let text = m.render(StoreStats { records: Some(3), evictions: 2 });
        assert!(text.contains(
            r#"mcp_affinity_control_http_requests_total{route="/v1/sessions/{id}",method="GET",status="404"} 1"#
        ), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_store_operation_duration_seconds_count{op="get",outcome="ok"} 1"#));
        assert!(text.contains("mcp_affinity_control_store_records 3"));
        assert!(text.contains("mcp_affinity_control_store_evictions_total 2"));
        m.observe_recovery("replayed", Duration::from_millis(30));
        m.count_reinitialization();
        m.count_replay();
        m.observe_recovery("alive", Duration::from_millis(2));
        m.count_probe("alive");
        m.count_probe("unreachable");
        m.count_probe("unreachable");
        let text = m.render(StoreStats { records: Some(3), evictions: 2 });
        assert!(text.contains(r#"mcp_affinity_control_recoveries_total{outcome="replayed"} 1"#), "{text}");
        assert!(text.contains("mcp_affinity_control_reinitializations_total 1"));
        assert!(text.contains("mcp_affinity_control_replays_total 1"));
        assert!(text.contains(r#"mcp_affinity_control_recoveries_total{outcome="alive"} 1"#), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_probes_total{result="alive"} 1"#), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_probes_total{result="unreachable"} 2"#), "{text}");
        assert!(text.contains("mcp_affinity_control_recovery_duration_seconds_count 2"));
        m.observe_drain_move(true, Some(Duration::from_millis(1500)));
        m.observe_drain_move(false, None);
        m.observe_drain_move(false, None);
        m.set_upstreams_draining(2);
        let text = m.render(StoreStats { records: Some(3), evictions: 2 });
        assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="moved"} 1"#), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="stayed"} 2"#), "{text}");
        assert!(text.contains("mcp_affinity_control_drain_move_delay_seconds_count 1"), "{text}");
        assert!(text.contains("mcp_affinity_control_drain_move_delay_seconds_sum 1.5"), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_drain_move_delay_seconds_bucket{le="1.6"} 1"#), "{text}");
        assert!(text.contains("mcp_affinity_control_upstreams_draining 2"), "{text}");
        m.count_replay_request("replayed");
        m.count_replay_request("deleted");
        m.count_replay_request("deleted");
        let text = m.render(StoreStats { records: Some(3), evictions: 2 });
        assert!(text.contains(r#"mcp_affinity_control_replay_listener_requests_total{result="replayed"} 1"#), "{text}");
        assert!(text.contains(r#"mcp_affinity_control_replay_listener_requests_total{result="deleted"} 2"#), "{text}");
        // Evictions are a running total: rendering again with the same total adds nothing.
        let text = m.render(StoreStats { records: Some(3), evictions: 2 });
        assert!(text.contains("mcp_affinity_control_store_evictions_total 2"));
    }
}
