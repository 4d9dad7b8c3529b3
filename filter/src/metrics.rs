//! The filter's counters. The stream machine counts through [`Counter`]; the proxy-wasm
//! layer defines one host metric per counter (`proxy_define_metric`) and Envoy shows them
//! as `wasmcustom.mcp_affinity.<name>` in its admin `/stats` (every worker VM increments
//! the same counter).

macro_rules! counters {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// A counter of the filter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $(#[doc = $doc] $variant,)* }

        impl Counter {
            /// Every counter, in declaration order (`Counter as usize` indexes it).
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Counted on the steady path of every request: added up in the VM and sent
            /// to the host once per tick (`sweep_period_ms`), so it lags by up to one tick.
            pub fn per_request(self) -> bool {
                matches!(self, Counter::RequestsPinned | Counter::RequestsUnpinned | Counter::ResponseHeadersSeen)
            }

            /// The host metric name, `mcp_affinity.<name>`.
            pub fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    RequestsPinned => "mcp_affinity.requests_pinned": "Requests routed to their session's pinned upstream host (sent to Envoy once per tick, `sweep_period_ms`).",
    RequestsUnpinned => "mcp_affinity.requests_unpinned": "Requests with a session id forwarded unpinned (`pass_through`, or control unavailable; sent to Envoy once per tick, `sweep_period_ms`).",
    ResponseHeadersSeen => "mcp_affinity.response_headers_seen": "Responses whose headers reached the filter. Shipped in its response matcher (`envoy/envoy.yaml`), Envoy does not call the filter for a 2xx answer it did not ask for (filter state `wasm.mcp_affinity.want_response`), such as the steady request's (sent to Envoy once per tick, `sweep_period_ms`).",
    UnknownSession => "mcp_affinity.unknown_session": "Requests with an unknown session id answered 404.",
    InitializeSeen => "mcp_affinity.initialize_seen": "POST bodies recognised as JSON-RPC `initialize` (with control: bodies are read for its record only).",
    SessionsPinned => "mcp_affinity.sessions_pinned": "Sessions recorded from an `initialize` response.",
    SessionsForgotten => "mcp_affinity.sessions_forgotten": "Sessions removed after DELETE.",
    SessionsExpired => "mcp_affinity.sessions_expired": "Idle pins removed by the sweep.",
    PinsChanged => "mcp_affinity.pins_changed": "Pins re-pinned (recovery, drain move) or forgotten (DELETE) by any worker VM. VMs use their own copies of pins only while this count is unchanged (`local_pins`).",
    PinsEvicted => "mcp_affinity.pins_evicted": "Pins evicted from a full shared-data bucket (least recently used first) to make room.",
    InvalidSessionId => "mcp_affinity.invalid_session_id": "Requests rejected with 400 for an invalid Mcp-Session-Id.",
    BodyTooLarge => "mcp_affinity.body_too_large": "POST bodies over max_body_bytes, passed through uninspected (with control only).",
    MalformedBody => "mcp_affinity.malformed_body": "POST bodies that are not JSON, passed through (with control only).",
    ClientPinHeaderRemoved => "mcp_affinity.client_pin_header_removed": "Client-sent pin headers removed.",
    NoUpstreamAddress => "mcp_affinity.no_upstream_address": "`initialize` responses without an `upstream.address` property (not pinned).",
    ControlLookups => "mcp_affinity.control_lookups": "Session lookups sent to the control service (pin missing from shared data).",
    ControlHits => "mcp_affinity.control_hits": "Lookups the control service answered with a record.",
    ControlWrites => "mcp_affinity.control_writes": "Session records written to control (initialize, initialized, delete).",
    RecoveriesReplayed => "mcp_affinity.recoveries_replayed": "Recoveries where control re-pinned the session and replayed the request.",
    RecoveriesNotReplayed => "mcp_affinity.recoveries_not_replayed": "Recoveries where control re-pinned the session but did not replay (unsafe to replay, or a GET stream).",
    RecoveriesFailed => "mcp_affinity.recoveries_failed": "Recoveries that failed (no live pod, initialize rejected): the client got 404.",
    SessionsVerified => "mcp_affinity.sessions_verified": "Suspect error responses (e.g. 400 JSON) on which control found the session alive: passed through unchanged.",
    RecoveredPins => "mcp_affinity.recovered_pins": "Sessions re-pinned from the answer of control's replay listener, after Envoy retried a failed request there (`recovery.replay_by: envoy_retry`).",
    RecoveredPinsRejected => "mcp_affinity.recovered_pins_rejected": "`x-mcp-affinity-pin` answers ignored (and removed): malformed, or on a first attempt, which a pod answered, not control.",
    RecoveryBodyTooLarge => "mcp_affinity.recovery_body_too_large": "Requests that needed recovery but whose body was over the replay limit: the session is recovered, the request not replayed (the client is told it did not run).",
    RecoveryBodyIncomplete => "mcp_affinity.recovery_body_incomplete": "Requests that needed recovery but whose body is not replayable as the client sent it (its length differs from `content-length`, or it is not UTF-8 JSON text): the session is recovered, the request never replayed.",
    SessionsMovedByDrain => "mcp_affinity.sessions_moved_by_drain": "Sessions moved off a draining upstream before their next request was sent.",
    DrainMovesFailed => "mcp_affinity.drain_moves_failed": "Drain moves that could not be made (control down, no live pod): the request went to the draining upstream.",
    StreamsEndedByDrain => "mcp_affinity.streams_ended_by_drain": "Open GET (SSE) and 2026-era `subscriptions/listen` streams ended because their upstream started draining; the client reopens them (re-listens), on a serving upstream.",
    RequestsSteeredByDrain => "mcp_affinity.requests_steered_by_drain": "New work sent to a serving upstream named by control because something drains: an `initialize` without session id, a 2026-era `tools/call` or `subscriptions/listen` (a draining pod gets none).",
    DrainListUpdates => "mcp_affinity.drain_list_updates": "Changes of the draining list adopted by a VM (each worker VM counts its own).",
    DrainPollErrors => "mcp_affinity.drain_poll_errors": "Fetches of the draining list from control that failed; the last list stays in force.",
    ControlErrors => "mcp_affinity.control_errors": "Calls to control that failed, timed out or were refused; the request went on without control.",
    TasksPinned => "mcp_affinity.tasks_pinned": "Tasks (MCP tasks extension) pinned to the upstream host whose `tools/call` answer created them.",
    TasksRouted => "mcp_affinity.tasks_routed": "`tasks/get`, `tasks/update` and `tasks/cancel` requests routed to their task's pinned upstream host by `Mcp-Name`.",
    TasksUnpinned => "mcp_affinity.tasks_unpinned": "Task requests whose task this Envoy holds no pin for (created before a restart of this Envoy, or through another one): load-balanced.",
    TasksTerminal => "mcp_affinity.tasks_terminal": "Tasks seen in a terminal status (`completed`, `failed`, `cancelled`) or unknown to their pod in a task request's answer: written to control (with control) so that a drain of their pod stops waiting for them.",
    TasksLost => "mcp_affinity.tasks_lost": "Task requests whose pinned upstream host is gone: answered at once with JSON-RPC -32602 (unknown task), the pin forgotten.",
    ControlWriteRetries => "mcp_affinity.control_write_retries": "Batches of new sessions' records, and task pins, control did not take (down, timeout, 5xx), queued to be sent again on the next `sweep_period_ms` tick.",
}
