//! The filter's plugin configuration (proxy-wasm buffer type 7, PLUGIN_CONFIGURATION; in
//! Envoy the `configuration` field of `envoy.extensions.wasm.v3.PluginConfig`).
//!
//! JSON object, every field optional; an empty configuration means all defaults. Unknown
//! fields are an error, so a typo is caught at `on_configure` rather than ignored. The
//! README's "Configuration reference" documents each field.

use serde::Deserialize;

use crate::pin::PinEncoding;
use crate::session_id::MAX_SESSION_ID_LEN;

/// Validated plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Request header that carries the pinned upstream host to Envoy's routing
    /// (default `x-session-pod`). Any client-sent value is always removed.
    pub pin_header: String,
    /// How the host is written into `pin_header`: `plain` (`ip:port`, ORIGINAL_DST) or
    /// `base64` (stateful-session header / Istio persistent sessions). Default `plain`.
    pub pin_encoding: PinEncoding,
    /// With `control`: largest POST body without session id (bytes) copied to find
    /// `initialize` and keep it in the session's record (default 1 MiB). Larger bodies
    /// pass through uninspected and are counted. Without control no such body is read.
    pub max_body_bytes: usize,
    /// Longest accepted `Mcp-Session-Id` in bytes (default 256, at most 256).
    pub max_session_id_len: usize,
    /// Number of shared-data keys the pins are spread over (default 65536, at most
    /// 1048576). Shared data has no delete, so the filter never writes other keys: with
    /// `shared_data_bucket_capacity` this is the ceiling of its shared data. N live
    /// sessions put N / buckets pins in a bucket on average (Poisson): with the default, a
    /// bucket overflows (evicting a live pin) in fewer than 1 of 20000 buckets at 100000
    /// sessions; plan at most 2 sessions per bucket.
    pub shared_data_buckets: u32,
    /// Most pins per bucket (default 8, at most 64); a full bucket evicts its least
    /// recently used pin (`pins_evicted`). Ceiling: buckets × capacity pins (524288 by
    /// default, about 75 MB with UUID session ids if every bucket fills).
    pub shared_data_bucket_capacity: usize,
    /// Most pins each worker VM keeps its own copy of (default 8192, at most 1048576; 0:
    /// none), so that a pinned request reads no shared data ([`crate::pin_cache`]). A
    /// copy is used only while no pin changed anywhere in Envoy (`pins_changed`); a full
    /// cache is emptied. About 150 bytes per pin with UUID session ids, per worker.
    pub local_pins: usize,
    /// Idle time (seconds) after which a pin expires from shared data (default 7200).
    pub session_ttl_secs: u64,
    /// A pin's last-seen time is rewritten at most this often (seconds, default 60), so
    /// steady traffic does not write shared data on every request.
    pub touch_interval_secs: u64,
    /// Period of the root context's tick (milliseconds, default 1000). Each tick sweeps
    /// the next 64 shared-data buckets (an incremental sweep: a tick's cost does not grow
    /// with the number of sessions) and sends queued touches to control.
    pub sweep_period_ms: u64,
    /// What to do with a request whose session id is unknown to shared data (and to the
    /// control service, when configured): `not_found` answers 404 with a JSON-RPC error so
    /// an MCP client re-initialises (MCP `basic/transports`, session management);
    /// `pass_through` forwards it unpinned. Default `not_found`.
    pub unknown_session: UnknownSession,
    /// The control service, reached with `dispatch_http_call`. Absent: shared data only.
    pub control: Option<ControlConfig>,
    /// Transparent recovery through the control service (needs `control`).
    pub recovery: RecoveryConfig,
    /// Task affinity for the MCP 2026-07-28 era (default true): the answer of a 2026-era
    /// `tools/call` that created a task (tasks extension) pins the task to the upstream
    /// host that answered, and `tasks/get`, `tasks/update`, `tasks/cancel` are routed by
    /// `Mcp-Name` to it ([`crate::tasks`]). Task pins live in shared data beside session
    /// pins and expire like them (`session_ttl_secs` idle).
    pub task_affinity: bool,
}

/// When and how a pinned session is recovered (re-initialised on a live pod by control).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Recover at all (default true; effective only with `control`).
    pub enabled: bool,
    /// Who carries a failed request to control for its replay (default `filter`).
    pub replay_by: ReplayBy,
    /// Largest request body (bytes) copied for a replay (default 1 MiB). Larger requests
    /// are not recoverable: the client gets the upstream's answer as it was (counted).
    /// With `replay_by: envoy_retry` nothing is copied; Envoy's retry buffer limit
    /// (`per_connection_buffer_limit_bytes`) plays this part.
    pub max_replay_body_bytes: usize,
    /// Statuses that by themselves mean "session unknown" (default `[404]`).
    pub session_unknown_statuses: Vec<u16>,
    /// Statuses whose JSON answer may mean "session unknown" (default `[400]`). Envoy does
    /// not let the filter read that body before the headers are decided, so the answer is
    /// held while control probes the pinned upstream with these rules
    /// (`session_suspect`): alive → the answer goes through unchanged. With
    /// `replay_by: envoy_retry` the filter does not hold them: list them in the route's
    /// `retriable_status_codes` instead, and control probes the pod the same way.
    pub error_body_statuses: Vec<u16>,
    /// JSON-RPC error codes that mean "session unknown" (default `[-32001]`).
    pub session_unknown_codes: Vec<i64>,
    /// JSON-RPC error codes whose message is matched against `message_patterns`
    /// (default `[-32000]`).
    pub message_codes: Vec<i64>,
    /// Case-insensitive substrings of such a message that mean "session unknown"
    /// (default `["session"]`).
    pub message_patterns: Vec<String>,
    /// Timeout of the recover call (milliseconds, default 15000): re-initialisation and
    /// replay happen inside it.
    pub timeout_ms: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            replay_by: ReplayBy::Filter,
            max_replay_body_bytes: 1024 * 1024,
            session_unknown_statuses: vec![404],
            error_body_statuses: vec![400],
            session_unknown_codes: vec![-32001],
            message_codes: vec![-32000],
            message_patterns: vec!["session".to_string()],
            timeout_ms: 15_000,
        }
    }
}

/// How a request whose pinned upstream failed reaches control for its replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayBy {
    /// The filter copies the body of every pinned request (up to `max_replay_body_bytes`)
    /// and, on a failure its response headers show, sends it to control's
    /// `POST {prefix}/sessions/{id}/recover`; control's answer becomes a local reply. Works
    /// with every bootstrap (ORIGINAL_DST, stateful session, Istio).
    #[default]
    Filter,
    /// Envoy's own retry carries the failed request, body included, to control's replay
    /// listener (`mcp-affinity-control --replay-listen`): the route of requests with a
    /// session id retries `connect-failure` and `retriable-status-codes` (404) once,
    /// `envoy.retry_priorities.previous_priorities`, to the cluster's priority-1 endpoint,
    /// control (`envoy/envoy-stateful-session.yaml`). The router ignores the
    /// stateful-session override host on a retry (Envoy `source/common/router/router.h`,
    /// `overrideHostToSelect`), so the retry never goes back to the failed pod. The filter
    /// copies no request body; it learns the new pin from control's answer (header
    /// `x-mcp-affinity-pin`, trusted only on a retried attempt: Envoy attribute
    /// `upstream.request_attempt_count` ≥ 2) and names the client's session id in
    /// `x-mcp-affinity-session` when it sends a request under the backend's id. Not with
    /// ORIGINAL_DST: it has no priorities and the retry would follow the pin header.
    EnvoyRetry,
}

/// Policy for requests carrying a session id nobody knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSession {
    /// Local reply 404 with JSON-RPC error -32001 "Session not found".
    #[default]
    NotFound,
    /// Forward unpinned; the upstream decides.
    PassThrough,
}

/// Where and how to reach the control service.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Envoy cluster name of the control service (default `mcp_affinity_control`).
    pub cluster: String,
    /// `:authority` sent to it (default `mcp-affinity-control`).
    pub authority: String,
    /// Path prefix of its API (default `/v1`).
    pub path_prefix: String,
    /// Bearer token, inline. Prefer `token_env`.
    pub token: Option<String>,
    /// Name of an environment variable holding the token. Envoy exposes host variables to
    /// the VM with `vm_config.environment_variables.host_env_keys`.
    pub token_env: Option<String>,
    /// Timeout of each call to control (milliseconds, default 1000). On timeout the filter
    /// carries on without control; no request waits longer than this for it.
    pub timeout_ms: u64,
    /// How often one VM of this Envoy fetches the draining upstreams from control
    /// (`GET {prefix}/upstreams/draining`, milliseconds, default 1000; 0 turns drain moves
    /// off). Checked on the root context's tick, so the effective period is at least
    /// `sweep_period_ms`. Requests never wait for it.
    pub drain_poll_ms: u64,
    /// How a new session's record is written to control (default `async`).
    pub initialize_write: InitializeWrite,
    /// With `async` writes: how often the root context sends the VM's queued records to
    /// control, in one `POST {prefix}/sessions` per batch (milliseconds, default 10, in
    /// 1..=1000). The root context ticks this often only while records wait (else every
    /// `sweep_period_ms`); the tick's other work still runs every `sweep_period_ms`.
    /// Keep it well below `lookup_wait_ms`, which covers a record still in flight.
    pub record_flush_ms: u64,
    /// How long control waits for a record that is not there yet before a lookup (or the
    /// `notifications/initialized` update) gets 404 (`?wait_ms=`, milliseconds, default
    /// 250, at most 5000; 0 = no wait). Covers a request that overtook an `async` write:
    /// the client's second request reaching another proxy before the first proxy's write
    /// reached control.
    pub lookup_wait_ms: u64,
}

/// How the record of a new session reaches control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitializeWrite {
    /// The `initialize` answer goes on at once; the record waits in the VM and is sent
    /// with the others of the last `record_flush_ms` in one call from the root context
    /// ([`crate::record_queue`]). Other proxies' lookups wait up to `lookup_wait_ms` for it.
    #[default]
    Async,
    /// The `initialize` answer is held until control stored the record (or
    /// `timeout_ms`): no other proxy can miss it, at the cost of a control round trip on
    /// every `initialize`.
    Sync,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            pin_header: "x-session-pod".to_string(),
            pin_encoding: PinEncoding::Plain,
            max_body_bytes: 1024 * 1024,
            max_session_id_len: MAX_SESSION_ID_LEN,
            shared_data_buckets: 65_536,
            shared_data_bucket_capacity: 8,
            local_pins: 8192,
            session_ttl_secs: 7200,
            touch_interval_secs: 60,
            sweep_period_ms: 1_000,
            unknown_session: UnknownSession::NotFound,
            control: None,
            recovery: RecoveryConfig::default(),
            task_affinity: true,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            cluster: "mcp_affinity_control".to_string(),
            authority: "mcp-affinity-control".to_string(),
            path_prefix: "/v1".to_string(),
            token: None,
            token_env: None,
            timeout_ms: 1000,
            drain_poll_ms: 1000,
            initialize_write: InitializeWrite::Async,
            record_flush_ms: 10,
            lookup_wait_ms: 250,
        }
    }
}

/// Largest `max_body_bytes` accepted (64 MiB): above Envoy's usual buffer limits.
pub const MAX_BODY_LIMIT: usize = 64 * 1024 * 1024;

impl FilterConfig {
    /// Whether new sessions' records wait in the VM's queue for the tick (control with
    /// `initialize_write: async`, [`crate::record_queue`]).
    pub fn queues_records(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.initialize_write == InitializeWrite::Async)
    }

    /// How pins are spread over shared data.
    pub fn layout(&self) -> crate::store::Layout {
        crate::store::Layout { buckets: self.shared_data_buckets, capacity: self.shared_data_bucket_capacity }
    }

    /// Parses and validates a plugin configuration. Empty input (or only whitespace)
    /// gives the defaults.
    ///
    /// Errors name the offending field: malformed JSON, unknown fields, wrong types, an
    /// invalid header name, zero or out-of-range limits.
    pub fn parse(bytes: &[u8]) -> Result<FilterConfig, String> {
        let config: FilterConfig = if bytes.iter().all(u8::is_ascii_whitespace) {
            FilterConfig::default()
        } else {
            serde_json::from_slice(bytes).map_err(|e| format!("invalid plugin configuration: {e}"))?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let h = &self.pin_header;
        if h.is_empty()
            || !h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!("pin_header {h:?} must be a lowercase HTTP header name (a-z, 0-9, '-', '_')"));
        }
        if h == "mcp-session-id" {
            return Err("pin_header must not be mcp-session-id".to_string());
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_LIMIT {
            return Err(format!("max_body_bytes must be in 1..={MAX_BODY_LIMIT}, got {}", self.max_body_bytes));
        }
        if self.max_session_id_len == 0 || self.max_session_id_len > MAX_SESSION_ID_LEN {
            return Err(format!(
                "max_session_id_len must be in 1..={MAX_SESSION_ID_LEN}, got {}",
                self.max_session_id_len
            ));
        }
        for (name, v) in [
            ("session_ttl_secs", self.session_ttl_secs),
            ("touch_interval_secs", self.touch_interval_secs),
            ("sweep_period_ms", self.sweep_period_ms),
        ] {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.touch_interval_secs >= self.session_ttl_secs {
            return Err("touch_interval_secs must be smaller than session_ttl_secs".to_string());
        }
        let r = &self.recovery;
        if self.shared_data_buckets == 0 || self.shared_data_buckets > 1 << 20 {
            return Err(format!("shared_data_buckets must be in 1..=1048576, got {}", self.shared_data_buckets));
        }
        if self.shared_data_bucket_capacity == 0 || self.shared_data_bucket_capacity > 64 {
            return Err(format!("shared_data_bucket_capacity must be in 1..=64, got {}", self.shared_data_bucket_capacity));
        }
        if self.local_pins > 1 << 20 {
            return Err(format!("local_pins must be at most 1048576, got {}", self.local_pins));
        }
        if r.max_replay_body_bytes > MAX_BODY_LIMIT {
            return Err(format!("recovery body limits must be at most {MAX_BODY_LIMIT}"));
        }
        if r.timeout_ms == 0 || r.timeout_ms > 300_000 {
            return Err(format!("recovery.timeout_ms must be in 1..=300000, got {}", r.timeout_ms));
        }
        if let Some(s) = r.session_unknown_statuses.iter().chain(&r.error_body_statuses).find(|s| !(400..=599).contains(*s)) {
            return Err(format!("recovery statuses must be 4xx or 5xx, got {s}"));
        }
        if let Some(c) = &self.control {
            if c.cluster.is_empty() || c.authority.is_empty() {
                return Err("control.cluster and control.authority must not be empty".to_string());
            }
            if !c.path_prefix.starts_with('/') || c.path_prefix.ends_with('/') {
                return Err(format!("control.path_prefix {:?} must start with '/' and not end with '/'", c.path_prefix));
            }
            if c.timeout_ms == 0 || c.timeout_ms > 60_000 {
                return Err(format!("control.timeout_ms must be in 1..=60000, got {}", c.timeout_ms));
            }
            if c.lookup_wait_ms > 5_000 {
                return Err(format!("control.lookup_wait_ms must be in 0..=5000, got {}", c.lookup_wait_ms));
            }
            if c.record_flush_ms == 0 || c.record_flush_ms > 1_000 {
                return Err(format!("control.record_flush_ms must be in 1..=1000, got {}", c.record_flush_ms));
            }
            if c.drain_poll_ms > 3_600_000 {
                return Err(format!("control.drain_poll_ms must be in 0..=3600000, got {}", c.drain_poll_ms));
            }
            if c.token.is_some() && c.token_env.is_some() {
                return Err("control.token and control.token_env are exclusive".to_string());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_configuration_gives_defaults() {
        assert_eq!(FilterConfig::parse(b"").unwrap(), FilterConfig::default());
        assert_eq!(FilterConfig::parse(b" {} ").unwrap(), FilterConfig::default());
        let d = FilterConfig::default();
        assert_eq!((d.pin_header.as_str(), d.max_body_bytes, d.pin_encoding), ("x-session-pod", 1 << 20, PinEncoding::Plain));
    }

    #[test]
    fn full_configuration() {
        let c = FilterConfig::parse(
            br#"{"pin_header":"x-pod","pin_encoding":"base64","max_body_bytes":100,"unknown_session":"pass_through",
                 "control":{"cluster":"ctl","token_env":"TOKEN","timeout_ms":250}}"#,
        )
        .unwrap();
        assert_eq!(c.pin_encoding, PinEncoding::Base64);
        assert_eq!(c.unknown_session, UnknownSession::PassThrough);
        let ctl = c.control.unwrap();
        assert_eq!((ctl.cluster.as_str(), ctl.path_prefix.as_str(), ctl.timeout_ms), ("ctl", "/v1", 250));
    }

    /// Every field of the plugin configuration, each set to something other than its
    /// default, lands where it belongs (a field the parser dropped or swapped fails here).
    #[test]
    fn every_field_is_parsed_into_its_place() {
        let c = FilterConfig::parse(
            br#"{"pin_header":"x-pod","pin_encoding":"base64","max_body_bytes":100,"max_session_id_len":64,
                 "shared_data_buckets":128,"shared_data_bucket_capacity":4,"local_pins":16,"session_ttl_secs":600,
                 "touch_interval_secs":30,"sweep_period_ms":250,"unknown_session":"pass_through",
                 "control":{"cluster":"ctl","authority":"ctl.local","path_prefix":"/api","token_env":"TOKEN","timeout_ms":250,
                            "drain_poll_ms":0,"initialize_write":"sync","record_flush_ms":20,"lookup_wait_ms":100},
                 "recovery":{"enabled":false,"replay_by":"envoy_retry","max_replay_body_bytes":2048,
                             "session_unknown_statuses":[404,410],"error_body_statuses":[400,422],"session_unknown_codes":[-32001,-32099],
                             "message_codes":[-32000,-32098],"message_patterns":["session","expired"],"timeout_ms":5000},
                 "task_affinity":false}"#,
        )
        .unwrap();
        let want = FilterConfig {
            pin_header: "x-pod".into(),
            pin_encoding: PinEncoding::Base64,
            max_body_bytes: 100,
            max_session_id_len: 64,
            shared_data_buckets: 128,
            shared_data_bucket_capacity: 4,
            local_pins: 16,
            session_ttl_secs: 600,
            touch_interval_secs: 30,
            sweep_period_ms: 250,
            unknown_session: UnknownSession::PassThrough,
            task_affinity: false,
            control: Some(ControlConfig {
                cluster: "ctl".into(),
                authority: "ctl.local".into(),
                path_prefix: "/api".into(),
                token: None,
                token_env: Some("TOKEN".into()),
                timeout_ms: 250,
                drain_poll_ms: 0,
                initialize_write: InitializeWrite::Sync,
                record_flush_ms: 20,
                lookup_wait_ms: 100,
            }),
            recovery: RecoveryConfig {
                enabled: false,
                replay_by: ReplayBy::EnvoyRetry,
                max_replay_body_bytes: 2048,
                session_unknown_statuses: vec![404, 410],
                error_body_statuses: vec![400, 422],
                session_unknown_codes: vec![-32001, -32099],
                message_codes: vec![-32000, -32098],
                message_patterns: vec!["session".into(), "expired".into()],
                timeout_ms: 5000,
            },
        };
        assert_eq!(c, want);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "invalid plugin configuration"),
            (br#"{"pin_hedaer":"x"}"#, "unknown field `pin_hedaer`"),
            (br#"{"pin_encoding":"hex"}"#, "unknown variant `hex`"),
            (br#"{"pin_header":"X Pod"}"#, "lowercase HTTP header name"),
            (br#"{"pin_header":"mcp-session-id"}"#, "must not be mcp-session-id"),
            (br#"{"max_body_bytes":0}"#, "max_body_bytes"),
            (br#"{"max_session_id_len":1000}"#, "max_session_id_len"),
            (br#"{"session_ttl_secs":10,"touch_interval_secs":10}"#, "touch_interval_secs"),
            (br#"{"control":{"path_prefix":"v1"}}"#, "path_prefix"),
            (br#"{"control":{"drain_poll_ms":3600001}}"#, "drain_poll_ms"),
            (br#"{"control":{"lookup_wait_ms":5001}}"#, "lookup_wait_ms"),
            (br#"{"control":{"record_flush_ms":0}}"#, "record_flush_ms"),
            (br#"{"control":{"record_flush_ms":1001}}"#, "record_flush_ms"),
            (br#"{"control":{"initialize_write":"later"}}"#, "expected `async` or `sync`"),
            (br#"{"control":{"token":"a","token_env":"B"}}"#, "exclusive"),
            (br#"{"recovery":{"session_unknown_statuses":[200]}}"#, "4xx or 5xx"),
            (br#"{"recovery":{"timeout_ms":0}}"#, "recovery.timeout_ms"),
            (br#"{"recovery":{"retries":3}}"#, "unknown field `retries`"),
        ];
        for (input, needle) in cases {
            let err = FilterConfig::parse(input).unwrap_err();
            assert!(err.contains(needle), "{}: {err}", String::from_utf8_lossy(input));
        }
    }
}
