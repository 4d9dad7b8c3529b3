//! Command line and environment configuration (every flag has an
//! `MCP_AFFINITY_CONTROL_*` variable), and the checks that turn it into settings.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::auth::Auth;

/// Where records are kept.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// In process memory (`memory`).
    Memory,
    /// Redis at this URL: `redis://…` / `rediss://…` (one node), `redis+sentinel://…`
    /// (Sentinel) or `redis+cluster://…` (Cluster); checked by
    /// [`RedisTopology::parse`](crate::store::redis::RedisTopology::parse).
    Redis(String),
}

impl fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("memory"),
            // The URL may hold a password.
            StoreKind::Redis(_) => f.write_str("redis(<url redacted>)"),
        }
    }
}

fn parse_store(s: &str) -> Result<StoreKind, String> {
    if s == "memory" {
        return Ok(StoreKind::Memory);
    }
    if !s.starts_with("redis") {
        return Err("expected `memory`, `redis://host:port[/db]`, `rediss://host:port[/db]`, \
                    `redis+sentinel://host:port[,host:port...]/MASTERNAME[/db]` or \
                    `redis+cluster://host:port[,host:port...]`"
            .into());
    }
    crate::store::redis::RedisTopology::parse(s)?;
    Ok(StoreKind::Redis(s.to_string()))
}

/// `--store` parser whose errors never repeat the value (a Redis URL may hold a password;
/// clap's own message for a rejected value would quote it).
#[derive(Clone, Copy)]
struct StoreParser;

impl clap::builder::TypedValueParser for StoreParser {
    type Value = StoreKind;

    fn parse_ref(&self, cmd: &clap::Command, _arg: Option<&clap::Arg>, value: &std::ffi::OsStr) -> Result<StoreKind, clap::Error> {
        let result = value.to_str().ok_or_else(|| "not UTF-8".to_string()).and_then(parse_store);
        result.map_err(|reason| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '--store' (not shown: it may hold a password): {reason}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

fn parse_key_prefix(s: &str) -> Result<String, String> {
    crate::store::redis::check_key_prefix(s)?;
    Ok(s.to_string())
}

/// Methods replayed after a connection reset that happened after the request was sent
/// (they have no side effects).
pub const DEFAULT_REPLAY_SAFE_METHODS: &str = "ping,initialize,notifications/initialized,tools/list,resources/list,\
resources/templates/list,resources/read,prompts/list,prompts/get,completion/complete";

/// The Service whose EndpointSlices drain pods (`--drain-from-endpointslices`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlices {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name (slices carry it in the label `kubernetes.io/service-name`).
    pub service: String,
    /// The slice port to use when the Service has several (`None`: the only one).
    pub port_name: Option<String>,
}

fn parse_endpointslices(s: &str) -> Result<EndpointSlices, String> {
    let (namespace, rest) = s.split_once('/').ok_or("expected NAMESPACE/SERVICE[:PORT_NAME]")?;
    let (service, port_name) = match rest.split_once(':') {
        Some((service, port)) => (service, Some(port)),
        None => (rest, None),
    };
    let dns_label = |x: &str| !x.is_empty() && x.len() <= 63 && x.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !dns_label(namespace) || !dns_label(service) || port_name.is_some_and(|p| !dns_label(p)) {
        return Err(format!("{s:?}: namespace, service and port name must be lowercase DNS labels"));
    }
    Ok(EndpointSlices { namespace: namespace.into(), service: service.into(), port_name: port_name.map(str::to_string) })
}

fn parse_dns_endpoint(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(s.to_string()),
        _ => Err("expected NAME:PORT, e.g. mcp-server-headless.default.svc.cluster.local:8080".into()),
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

const ABOUT: &str = "Control service of mcp-affinity: the durable, shared home of MCP session records (which \
upstream pod holds each Mcp-Session-Id), behind a small authenticated HTTP API.";

const LONG_ABOUT_TAIL: &str = "\
Routes: PUT/GET/PATCH/DELETE /v1/sessions/{id}, POST /v1/sessions/{id}/recover, POST/DELETE \
/v1/upstreams/{upstream}/drain and GET /v1/upstreams/draining (bearer token required), GET /healthz, GET /readyz, \
GET /metrics; the read-only status page GET /status (HTML) and GET /v1/status (JSON), with the API token or \
--status-token-file (docs/status-page.md).

Draining: POST /v1/upstreams/{ip:port}/drain (e.g. from a pod's preStop hook) marks an upstream as going away; \
filters poll GET /v1/upstreams/draining and ask control (recover, reason draining) to move each session off it \
before its next request. With --endpoints-dns, addresses that stop resolving are drained automatically.

Recovery: when the pod a session is pinned to is gone or has lost the session, the filter calls \
POST /v1/sessions/{id}/recover. Control picks a live MCP server endpoint (--endpoints or --endpoints-dns; the \
failed one is skipped after a connection failure and tried last otherwise), re-initializes the session there once (the stored initialize and notifications/initialized; \
single flight per session across every control instance sharing the store), stores the new pin with a \
compare-and-set, and replays the client's request only when it provably did not run (connection failure, \
session unknown) or its method is in --replay-safe-methods. See docs/recovery.md.

Replay listener (--replay-listen ADDR): Envoy retries a pinned request that failed to this second listener \
(any method, any path, no token), with the whole request; control recovers the session, probing its pod first, \
and answers the client's request with the headers mcp-session-id and x-mcp-affinity-pin. Keep it reachable only \
by Envoy. See docs/recovery.md, section Replay listener (Envoy retry).

Authentication: every /v1 request needs `Authorization: Bearer <token>`. Give the token with --token-file \
(preferred) or the MCP_AFFINITY_CONTROL_TOKEN environment variable. Without a token the service refuses to \
start unless --insecure-no-auth is given.";

/// Configuration of the control service.
#[derive(Parser, Clone)]
#[command(name = "mcp-affinity-control", version, about = ABOUT, long_about = None, after_long_help = LONG_ABOUT_TAIL)]
pub struct Config {
    /// Address to listen on (ip:port). Keep it on loopback or a pod-internal address.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_LISTEN", default_value = "127.0.0.1:9901", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Replay listener address (ip:port); absent (default) = no replay listener. Envoy retries a
    /// pinned request that failed (connect failure, 404, optionally 400) here, the whole request
    /// (`retry_priority` previous_priorities, this address at priority 1 of the pods cluster), and
    /// control recovers the session and answers it. No bearer token on it (Envoy forwards the
    /// client's request): keep it on loopback or reachable only by Envoy (NetworkPolicy). See
    /// docs/recovery.md, "Replay listener (Envoy retry)".
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REPLAY_LISTEN", value_name = "ADDR")]
    pub replay_listen: Option<SocketAddr>,

    /// The replay listener's certificate chain, PEM. With --replay-tls-key and --replay-client-ca the
    /// replay listener speaks TLS and completes a handshake only with a client whose certificate is
    /// signed by that CA — Envoy's, which pods never have (mutual TLS; scripts/replay-certs.sh makes
    /// the files). Without them it speaks plain HTTP to anybody who reaches it.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REPLAY_TLS_CERT", value_name = "FILE",
          requires_all = ["replay_tls_key", "replay_client_ca", "replay_listen"])]
    pub replay_tls_cert: Option<PathBuf>,

    /// The private key of --replay-tls-cert, PEM.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REPLAY_TLS_KEY", value_name = "FILE", requires = "replay_tls_cert")]
    pub replay_tls_key: Option<PathBuf>,

    /// The CA whose client certificates the replay listener accepts (Envoy's), PEM.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REPLAY_CLIENT_CA", value_name = "FILE", requires = "replay_tls_cert")]
    pub replay_client_ca: Option<PathBuf>,

    /// Session store: `memory` (embedded, lost on exit, bounded by --max-sessions) or Redis, shared by
    /// several control instances: one node `redis://[user:pass@]host:port[/db]`; Sentinel
    /// `redis+sentinel://[user:pass@]host:port[,host:port...]/MASTERNAME[/db][?sentinel_password=P]` (follows
    /// failovers); Cluster `redis+cluster://[user:pass@]host:port[,host:port...]`. `rediss` instead of `redis`
    /// for TLS (with the `tls` build feature). See docs/stores.md, "Redis topologies".
    #[arg(long, env = "MCP_AFFINITY_CONTROL_STORE", hide_env_values = true, default_value = "memory", value_name = "STORE",
          value_parser = StoreParser)]
    pub store: StoreKind,

    /// Start of every Redis key: a session's record is `<prefix>{<session id>}:record` and its recovery
    /// lease `<prefix>{<session id>}:lease` (one hash tag, so one Redis Cluster slot). No `{` or `}`.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REDIS_KEY_PREFIX", default_value = "mcp-affinity:", value_name = "PREFIX",
          value_parser = parse_key_prefix)]
    pub redis_key_prefix: String,

    /// Upper bound of one Redis operation, connecting included, in milliseconds. When Redis does not
    /// answer within it, /v1 answers 503 store_unavailable and /readyz 503.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REDIS_TIMEOUT_MS", default_value_t = 2000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// Replicas that must acknowledge every record write (PUT, PATCH, DELETE) before control acknowledges
    /// it: Redis `WAIT N --redis-wait-timeout-ms` after the write. 0 (default) = do not wait (Redis
    /// replication is asynchronous). When fewer replicas acknowledge in time the request answers 503
    /// store_unavailable, although the primary holds the write.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REDIS_WAIT_REPLICAS", default_value_t = 0, value_name = "N")]
    pub redis_wait_replicas: u32,

    /// How long a write waits for --redis-wait-replicas acknowledgements, in milliseconds; must be below
    /// --redis-timeout-ms.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REDIS_WAIT_TIMEOUT_MS", default_value_t = 500, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_wait_timeout_ms: u64,

    /// Idle TTL of a session record, in seconds: a record not written or touched (PUT/PATCH) for this
    /// long expires. GET does not refresh it.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_SESSION_TTL_SECS", default_value_t = 7200, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub session_ttl_secs: u64,

    /// Most records the memory store holds. Creating one more evicts the least-recently-seen record
    /// (counted in mcp_affinity_control_store_evictions_total). Not used with Redis (size Redis itself).
    #[arg(long, env = "MCP_AFFINITY_CONTROL_MAX_SESSIONS", default_value_t = 100_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions: u64,

    /// Most /v1 requests served at once; one more is answered 503 overloaded at once (no queue), so an
    /// overloaded control answers fast and its memory stays bounded.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_MAX_IN_FLIGHT", default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight: u64,

    /// Largest accepted request body, in bytes; larger bodies get 413 body_too_large.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_MAX_BODY_BYTES", default_value_t = 1024 * 1024, value_name = "BYTES")]
    pub max_body_bytes: usize,

    /// Log format: `text` or `json` (one object per line). Verbosity comes from RUST_LOG (default info).
    #[arg(long, env = "MCP_AFFINITY_CONTROL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// File holding the bearer token of the /v1 API (surrounding whitespace is ignored). Preferred way
    /// to pass the token.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_TOKEN_FILE", value_name = "PATH", conflicts_with = "token", global = true)]
    pub token_file: Option<PathBuf>,

    /// The bearer token itself. Prefer the MCP_AFFINITY_CONTROL_TOKEN environment variable or
    /// --token-file: a value given on the command line is visible to every user in `ps`.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_TOKEN", hide_env_values = true, value_name = "TOKEN", global = true)]
    pub token: Option<String>,

    /// File holding a read-only token of the status page (`GET /status`, `GET /v1/status`; surrounding
    /// whitespace is ignored). It authorises nothing else; the API token works there too. See
    /// docs/status-page.md.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_STATUS_TOKEN_FILE", value_name = "PATH", conflicts_with = "status_token")]
    pub status_token_file: Option<PathBuf>,

    /// The read-only status page token itself (prefer --status-token-file or the environment).
    #[arg(long, env = "MCP_AFFINITY_CONTROL_STATUS_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub status_token: Option<String>,

    /// Recovery: the MCP server endpoints (pods) a session may be re-initialized on, as a comma-separated
    /// list of ip:port. Alternative to --endpoints-dns. Without either, every recovery fails (the client
    /// gets 404 and starts a new session).
    #[arg(long, env = "MCP_AFFINITY_CONTROL_ENDPOINTS", value_name = "IP:PORT,...", value_delimiter = ',',
          conflicts_with = "endpoints_dns")]
    pub endpoints: Vec<SocketAddr>,

    /// Recovery: a DNS name and port resolved at every recovery to all its addresses, e.g. a Kubernetes
    /// headless Service `mcp-server-headless.ns.svc.cluster.local:8080`. Also resolved every
    /// --endpoints-refresh-secs: addresses that leave it (terminating pods) are drained.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_ENDPOINTS_DNS", value_name = "NAME:PORT", value_parser = parse_dns_endpoint)]
    pub endpoints_dns: Option<String>,

    /// How often, in seconds, the --endpoints-dns name is resolved in the background to drain pods
    /// that left it: an address that resolved before and is missing now is drained (source `dns`),
    /// and a `dns` drain whose address resolves again is undone. Not used with --endpoints.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_ENDPOINTS_REFRESH_SECS", default_value_t = 5, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub endpoints_refresh_secs: u64,

    /// Drain pods from a Kubernetes Service's EndpointSlices, `NAMESPACE/SERVICE[:PORT_NAME]`: an
    /// endpoint that is terminating or not ready is drained (source `endpointslice`), and undrained
    /// when it is ready again. Control watches the slices with its service account (list/watch
    /// endpointslices in that namespace). Needs a control built with the cargo feature `kube`;
    /// without it, control refuses to start with this flag. PORT_NAME picks the slice port when the
    /// Service has several.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_DRAIN_FROM_ENDPOINTSLICES", value_name = "NAMESPACE/SERVICE[:PORT]",
          value_parser = parse_endpointslices)]
    pub drain_from_endpointslices: Option<EndpointSlices>,

    /// Lifetime of an upstream drain, in seconds from when it began: a drain nobody undoes (the pod is
    /// gone; its IP may be reused much later) ends on its own after this long.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_DRAIN_TTL_SECS", default_value_t = 3600, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub drain_ttl_secs: u64,

    /// Recovery: JSON-RPC methods replayed even when the connection reset after the request was sent
    /// (comma-separated; they must be free of side effects). Requests that provably did not run
    /// (connection failure, session unknown) are replayed whatever their method.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_REPLAY_SAFE_METHODS", value_name = "METHODS", value_delimiter = ',',
          default_value = DEFAULT_REPLAY_SAFE_METHODS)]
    pub replay_safe_methods: Vec<String>,

    /// Recovery: upper bound of one recovery in milliseconds (waiting for another recovery of the same
    /// session, DNS, re-initialization and replay, every outbound HTTP call included).
    #[arg(long, env = "MCP_AFFINITY_CONTROL_RECOVERY_TIMEOUT_MS", default_value_t = 10_000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recovery_timeout_ms: u64,

    /// Recovery: largest replayed answer (JSON or a whole SSE stream) control buffers, in bytes.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_RECOVERY_MAX_RESPONSE_BYTES", default_value_t = 4 * 1024 * 1024,
          value_name = "BYTES")]
    pub recovery_max_response_bytes: usize,

    /// Serve /v1 without authentication. For local development only; without it the service refuses
    /// to start when no token is configured.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// An operator command run against a running control service (see `docs/control-flags.md`,
    /// "Operator commands"); without one, the binary serves.
    #[command(subcommand)]
    pub command: Option<crate::cli::Command>,
}

impl Config {
    /// The replay listener's mutual TLS files, when all three are given.
    pub fn replay_tls(&self) -> Option<crate::mtls::TlsFiles> {
        Some(crate::mtls::TlsFiles {
            cert: self.replay_tls_cert.clone()?,
            key: self.replay_tls_key.clone()?,
            client_ca: self.replay_client_ca.clone()?,
        })
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("replay_listen", &self.replay_listen)
            .field("replay_tls_cert", &self.replay_tls_cert)
            .field("replay_tls_key", &self.replay_tls_key)
            .field("replay_client_ca", &self.replay_client_ca)
            .field("store", &self.store)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_wait_replicas", &self.redis_wait_replicas)
            .field("redis_wait_timeout_ms", &self.redis_wait_timeout_ms)
            .field("session_ttl_secs", &self.session_ttl_secs)
            .field("max_sessions", &self.max_sessions)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("log_format", &self.log_format)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("status_token_file", &self.status_token_file)
            .field("status_token", &self.status_token.as_ref().map(|_| "<redacted>"))
            .field("insecure_no_auth", &self.insecure_no_auth)
            .field("endpoints", &self.endpoints)
            .field("endpoints_dns", &self.endpoints_dns)
            .field("endpoints_refresh_secs", &self.endpoints_refresh_secs)
            .field("drain_from_endpointslices", &self.drain_from_endpointslices)
            .field("drain_ttl_secs", &self.drain_ttl_secs)
            .field("replay_safe_methods", &self.replay_safe_methods)
            .field("recovery_timeout_ms", &self.recovery_timeout_ms)
            .field("recovery_max_response_bytes", &self.recovery_max_response_bytes)
            .field("command", &self.command)
            .finish()
    }
}

/// The token of `file` (preferred) or `value`, trimmed; `None` when neither is given.
fn read_token(file: Option<&PathBuf>, value: Option<&str>) -> Result<Option<String>, ConfigError> {
    match (file, value) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|source| ConfigError::TokenFile { path: path.clone(), source }),
        (None, Some(t)) => Ok(Some(t.trim().to_string())),
        (None, None) => Ok(None),
    }
}

/// [`Auth::token`] of `t` when it is non-empty visible ASCII, else [`ConfigError::BadToken`].
fn checked_token(t: &str) -> Result<Auth, ConfigError> {
    if t.is_empty() || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ConfigError::BadToken);
    }
    Ok(Auth::token(t))
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither a token nor `--insecure-no-auth`.
    #[error(
        "no API token configured: pass --token-file PATH or set MCP_AFFINITY_CONTROL_TOKEN \
         (or --insecure-no-auth for local development)"
    )]
    NoToken,
    /// The token is empty or holds characters a header cannot carry.
    #[error("the API token must be non-empty visible ASCII (0x21-0x7E)")]
    BadToken,
    /// Both a token and `--insecure-no-auth`.
    #[error("--insecure-no-auth cannot be combined with a token")]
    TokenAndNoAuth,
    /// The token file cannot be read.
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Config {
    /// The authentication the configuration asks for.
    ///
    /// # Errors
    /// [`ConfigError`] when no token is configured without `--insecure-no-auth`, when the
    /// token file cannot be read, or when the token is empty or not visible ASCII.
    pub fn auth(&self) -> Result<Auth, ConfigError> {
        match (read_token(self.token_file.as_ref(), self.token.as_deref())?, self.insecure_no_auth) {
            (None, true) => Ok(Auth::Disabled),
            (None, false) => Err(ConfigError::NoToken),
            (Some(_), true) => Err(ConfigError::TokenAndNoAuth),
            (Some(t), false) => checked_token(&t),
        }
    }

    /// The read-only token of the status page (`--status-token-file`, `--status-token`), if
    /// one is configured.
    ///
    /// # Errors
    /// [`ConfigError`] when the token file cannot be read or the token is empty or not
    /// visible ASCII.
    pub fn status_auth(&self) -> Result<Option<Auth>, ConfigError> {
        read_token(self.status_token_file.as_ref(), self.status_token.as_deref())?.map(|t| checked_token(&t)).transpose()
    }

    /// `--session-ttl-secs` as a duration.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }

    /// `--drain-ttl-secs` as a duration.
    pub fn drain_ttl(&self) -> Duration {
        Duration::from_secs(self.drain_ttl_secs)
    }

    /// `--endpoints-refresh-secs` as a duration.
    pub fn endpoints_refresh(&self) -> Duration {
        Duration::from_secs(self.endpoints_refresh_secs)
    }

    /// `--redis-timeout-ms` as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// `--redis-wait-replicas` / `--redis-wait-timeout-ms`: `None` when writes do not wait.
    pub fn redis_wait(&self) -> Option<crate::store::redis::ReplicationWait> {
        (self.redis_wait_replicas > 0).then(|| crate::store::redis::ReplicationWait {
            replicas: self.redis_wait_replicas,
            timeout: Duration::from_millis(self.redis_wait_timeout_ms),
        })
    }

    /// The recovery settings of `--endpoints`/`--endpoints-dns`, `--replay-safe-methods`,
    /// `--recovery-timeout-ms` and `--recovery-max-response-bytes`.
    pub fn recovery(&self) -> crate::recover::RecoverySettings {
        use crate::recover::endpoints::EndpointSource;
        let endpoints = match &self.endpoints_dns {
            Some(name) => EndpointSource::Dns(name.clone()),
            None => EndpointSource::Static(self.endpoints.clone()),
        };
        crate::recover::RecoverySettings {
            endpoints,
            replay_safe_methods: self
                .replay_safe_methods
                .iter()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect(),
            timeout: Duration::from_millis(self.recovery_timeout_ms),
            max_response_bytes: self.recovery_max_response_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("mcp-affinity-control").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--insecure-no-auth"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.replay_listen, None);
        assert_eq!(c.store, StoreKind::Memory);
        assert_eq!(c.redis_key_prefix, "mcp-affinity:");
        assert_eq!(c.redis_wait(), None);
        assert_eq!((c.session_ttl_secs, c.max_sessions, c.max_body_bytes), (7200, 100_000, 1 << 20));
        assert!(matches!(c.auth(), Ok(Auth::Disabled)));
        let r = c.recovery();
        assert_eq!(r.endpoints, crate::recover::endpoints::EndpointSource::Static(vec![]));
        assert_eq!(r.timeout, Duration::from_secs(10));
        assert_eq!(r.max_response_bytes, 4 << 20);
        assert_eq!(r.replay_safe_methods.len(), 10);
        assert!(r.replay_safe_methods.contains("resources/templates/list"));
        assert!(!r.replay_safe_methods.contains("tools/call"));
        assert_eq!((c.drain_ttl(), c.endpoints_refresh()), (Duration::from_secs(3600), Duration::from_secs(5)));
    }

    #[test]
    fn replay_listen_flag() {
        let c = parse(&["--replay-listen", "127.0.0.1:9902"]).unwrap();
        assert_eq!(c.replay_listen, Some("127.0.0.1:9902".parse().unwrap()));
        assert!(parse(&["--replay-listen", "localhost"]).is_err());
    }

    #[test]
    fn drain_flags() {
        let c = parse(&["--drain-ttl-secs", "60", "--endpoints-refresh-secs", "2"]).unwrap();
        assert_eq!((c.drain_ttl(), c.endpoints_refresh()), (Duration::from_secs(60), Duration::from_secs(2)));
        assert!(parse(&["--drain-ttl-secs", "0"]).is_err());
        assert!(parse(&["--endpoints-refresh-secs", "0"]).is_err());
    }

    #[test]
    fn recovery_flags() {
        let c = parse(&["--endpoints", "127.0.0.1:1,127.0.0.1:2", "--replay-safe-methods", "ping, tools/list"]).unwrap();
        let r = c.recovery();
        assert_eq!(
            r.endpoints,
            crate::recover::endpoints::EndpointSource::Static(vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()])
        );
        assert_eq!(r.replay_safe_methods, ["ping", "tools/list"].iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>());
        let c = parse(&["--endpoints-dns", "mcp.ns.svc.cluster.local:8080"]).unwrap();
        assert_eq!(c.recovery().endpoints, crate::recover::endpoints::EndpointSource::Dns("mcp.ns.svc.cluster.local:8080".into()));
        let e = parse(&["--drain-from-endpointslices", "mcp/mcp-server-headless:http"]).unwrap().drain_from_endpointslices.unwrap();
        assert_eq!((e.namespace.as_str(), e.service.as_str(), e.port_name.as_deref()), ("mcp", "mcp-server-headless", Some("http")));
        assert_eq!(parse(&["--drain-from-endpointslices", "mcp/svc"]).unwrap().drain_from_endpointslices.unwrap().port_name, None);
        for bad in ["svc", "mcp/", "/svc", "MCP/svc", "mcp/svc:", "mcp/s_c"] {
            assert!(parse(&["--drain-from-endpointslices", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["--endpoints-dns", "nameonly"]).is_err());
        assert!(parse(&["--endpoints-dns", "x:1", "--endpoints", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--endpoints", "not-an-address"]).is_err());
        assert!(parse(&["--recovery-timeout-ms", "0"]).is_err());
    }

    #[test]
    fn store_values() {
        assert_eq!(parse(&["--store", "redis://127.0.0.1:6379/0"]).unwrap().store, StoreKind::Redis("redis://127.0.0.1:6379/0".into()));
        for url in ["redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/2", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"] {
            assert_eq!(parse(&["--store", url]).unwrap().store, StoreKind::Redis(url.into()));
        }
        for (url, needle) in [
            ("postgres://x", "redis+sentinel://"),
            ("redis+sentinel://h1:26379", "master name is missing"),
            ("redis+cluster://a:1/5", "only database 0"),
            ("redis+sentinel://h/m?foo=1", "unknown parameter `foo`"),
        ] {
            let err = parse(&["--store", url]).err().unwrap().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
        let err = parse(&["--store", "redis+sentinel://user:hunter2@h1:26379"]).err().unwrap().to_string();
        assert!(err.contains("invalid value for '--store'") && !err.contains("hunter2"), "{err}");
        assert!(parse(&["--redis-key-prefix", "a{b}"]).err().unwrap().to_string().contains("may not contain"));
        let c = parse(&["--redis-wait-replicas", "1", "--redis-wait-timeout-ms", "250"]).unwrap();
        assert_eq!(c.redis_wait(), Some(crate::store::redis::ReplicationWait { replicas: 1, timeout: Duration::from_millis(250) }));
        assert!(parse(&["--redis-wait-timeout-ms", "0"]).is_err());
        assert!(parse(&["--session-ttl-secs", "0"]).is_err());
        assert!(parse(&["--max-sessions", "0"]).is_err());
    }

    #[test]
    fn token_rules() {
        assert!(matches!(parse(&[]).unwrap().auth(), Err(ConfigError::NoToken)));
        assert!(matches!(parse(&["--token", "abc"]).unwrap().auth(), Ok(Auth::Token(_))));
        assert!(matches!(parse(&["--token", " "]).unwrap().auth(), Err(ConfigError::BadToken)));
        assert!(matches!(parse(&["--token", "abc", "--insecure-no-auth"]).unwrap().auth(), Err(ConfigError::TokenAndNoAuth)));
        assert!(parse(&["--token", "abc", "--token-file", "/x"]).is_err());
        let dir = std::env::temp_dir().join(format!("mcp-affinity-control-token-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let auth = parse(&["--token-file", dir.to_str().unwrap()]).unwrap().auth().unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", "Bearer from-file".parse().unwrap());
        assert!(auth.allows(&h));
        assert!(matches!(parse(&["--token-file", "/nonexistent/token"]).unwrap().auth(), Err(ConfigError::TokenFile { .. })));
        // The status page's read-only token: optional, same rules.
        assert!(parse(&[]).unwrap().status_auth().unwrap().is_none());
        assert!(matches!(parse(&["--status-token", "ro"]).unwrap().status_auth(), Ok(Some(Auth::Token(_)))));
        assert!(matches!(parse(&["--status-token", " "]).unwrap().status_auth(), Err(ConfigError::BadToken)));
        assert!(parse(&["--status-token", "a", "--status-token-file", "/x"]).is_err());
    }
}
