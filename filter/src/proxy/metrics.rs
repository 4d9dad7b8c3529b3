//! Counters exported through proxy-wasm metrics (`proxy_define_metric`,
//! `proxy_increment_metric`). Envoy shows them with the `wasmcustom.` prefix.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

macro_rules! counters {
    ($($field:ident => $name:literal: $doc:literal,)*) => {
        /// Metric ids of this VM's counters (0 = not defined yet).
        #[derive(Debug, Default, Clone, Copy)]
        pub struct Metrics { $(#[doc = $doc] pub $field: u32,)* }

        impl Metrics {
            /// Defines every counter (the SDK panics if the host refuses).
            pub fn define() -> Metrics {
                Metrics { $($field: hostcalls::define_metric(MetricType::Counter, $name).unwrap_or(0),)* }
            }
        }
    };
}

counters! {
    requests_pinned => "mcp_affinity.requests_pinned": "Requests routed to their session's pinned upstream host.",
    requests_unpinned => "mcp_affinity.requests_unpinned": "Requests with an unknown session id forwarded unpinned (`pass_through`).",
    unknown_session => "mcp_affinity.unknown_session": "Requests with an unknown session id answered 404.",
    initialize_seen => "mcp_affinity.initialize_seen": "POST bodies recognised as JSON-RPC `initialize`.",
    sessions_pinned => "mcp_affinity.sessions_pinned": "Sessions recorded from an `initialize` response.",
    sessions_forgotten => "mcp_affinity.sessions_forgotten": "Sessions removed after DELETE.",
    sessions_expired => "mcp_affinity.sessions_expired": "Idle pins removed by the sweep.",
    invalid_session_id => "mcp_affinity.invalid_session_id": "Requests rejected with 400 for an invalid Mcp-Session-Id.",
    body_too_large => "mcp_affinity.body_too_large": "POST bodies over max_body_bytes, passed through uninspected.",
    malformed_body => "mcp_affinity.malformed_body": "POST bodies that are not JSON, passed through.",
    client_pin_header_removed => "mcp_affinity.client_pin_header_removed": "Client-sent pin headers removed.",
    no_upstream_address => "mcp_affinity.no_upstream_address": "`initialize` responses without an `upstream.address` property (not pinned).",
    control_lookups => "mcp_affinity.control_lookups": "Session lookups sent to the control service (pin missing from shared data).",
    control_hits => "mcp_affinity.control_hits": "Lookups the control service answered with a record.",
    control_writes => "mcp_affinity.control_writes": "Session records written to control (initialize, initialized, delete).",
    recoveries_replayed => "mcp_affinity.recoveries_replayed": "Recoveries where control re-pinned the session and replayed the request.",
    recoveries_not_replayed => "mcp_affinity.recoveries_not_replayed": "Recoveries where control re-pinned the session but did not replay (unsafe to replay, or a GET stream).",
    recoveries_failed => "mcp_affinity.recoveries_failed": "Recoveries that failed (no live pod, initialize rejected): the client got 404.",
    recovery_body_too_large => "mcp_affinity.recovery_body_too_large": "Requests that needed recovery but whose body was over the replay limit.",
    control_errors => "mcp_affinity.control_errors": "Calls to control that failed, timed out or were refused; the request went on without control.",
}

/// Adds one to a counter.
pub fn inc(id: u32) {
    add(id, 1);
}

/// Adds `n` to a counter; a no-op for id 0 or when the host refuses.
pub fn add(id: u32, n: u64) {
    if id != 0 {
        let _ = hostcalls::increment_metric(id, n as i64);
    }
}
