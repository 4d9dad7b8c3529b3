//! Session recovery: `POST /v1/sessions/{id}/recover`.
//!
//! When the pod a session is pinned to is gone (connection failure), has lost the session
//! (restart in place: "session unknown"), or reset the connection after the request was
//! sent, the filter asks control to recover. Control then
//!
//! 0. for `session_suspect` (the pod answered an error status whose body the filter could
//!    not read, e.g. HTTP 400 + JSON, which may or may not mean "session unknown"), first
//!    **probes** the pinned pod with a JSON-RPC `ping` in the backend session
//!    ([`upstream::probe`]) — unless the record's generation already moved past the
//!    failed one, in which case it goes on as for `session_unknown`. A pod that answers
//!    anything but a session-not-found answer still knows the session: the answer is
//!    [`Outcome::Alive`] with the unchanged pin and no `response`, and the filter lets the
//!    pod's original answer through (a genuine error is never replayed). A
//!    session-not-found answer or no answer at all continues exactly as `session_unknown`;
//! 1. settles the pin **once per session** — a per-session async mutex in this instance
//!    ([`locks::KeyedLocks`]) plus a lease in the store shared by every instance
//!    ([`SessionStore::try_acquire_lease`]). The lease holder re-reads the record: if its
//!    generation is already newer than the failed one, someone else recovered and the
//!    current pin is used; otherwise it re-initializes the session on a live endpoint
//!    ([`endpoints`]: stored `initialize`, then `notifications/initialized`) and stores the
//!    new upstream, backend session id and generation with a compare-and-set. Instances
//!    that do not get the lease poll the record every [`LEASE_POLL`] until the generation
//!    moves (or the lease frees up), within the recovery deadline;
//! 2. replays the client's request on the pin **only when that is safe**: the request
//!    provably did not run (`connect_failure`, `session_unknown`, `session_suspect` past the
//!    probe), or its JSON-RPC method is in the replay-safe list. Otherwise the client gets
//!    a JSON-RPC error ([`OUTCOME_UNKNOWN_CODE`]) and the session stays usable on its new
//!    pin. GET streams are never replayed: the client gets an SSE stream that ends at once
//!    and reopens it;
//! 3. when no endpoint accepts the session, deletes the record and gives the client the
//!    404 + JSON-RPC "Session not found" that makes a standard client start a new session.
//!
//! Reason `draining` is not a failure: the pinned pod is going away (its upstream is in the
//! store's draining list, [`crate::store::Drain`]) but still serves, and the filter asks
//! before sending the session's next request, which it then sends itself. Control
//! settles the pin exactly as in step 1 — re-initializing on an endpoint that is neither
//! draining nor the failed upstream — but **replays nothing** (`response` is `null`) and
//! **never deletes the record**: the outcome is [`Outcome::Moved`] (the new, or already
//! newer, pin) or [`Outcome::Stayed`] (the move could not be made; the current, unchanged
//! pin). Moves this call made or could not make are counted in the drain
//! ([`SessionStore::record_drain_move`]) and in `drain_moves_total`, not as recoveries.
//! Every other reason prefers non-draining endpoints too ([`endpoints::candidates`]).
//!
//! Every step shares one deadline (`--recovery-timeout-ms`); the probe gets at most half
//! of it ([`PROBE_SHARE`]) so that a pod that hangs leaves time to re-initialize elsewhere.
//! The client's `Authorization` is used for the calls to the pod and never stored or
//! logged.

pub mod endpoints;
pub mod locks;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use mcp_affinity_proto::recover::{ClientResponse, Outcome, Placement, Reason, RecoverAnswer};
use serde_json::{Value, json};
use tokio::time::Instant;

use self::endpoints::EndpointSource;
use self::locks::KeyedLocks;
use self::upstream::{CallError, Probe, Target};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::record::{PutCondition, PutSession, SessionRecord};
use crate::session_id::SessionId;
use crate::store::{Drain, PutOutcome, SessionStore};

/// JSON-RPC error code of the answer to a request that was not replayed because it may
/// already have run (`reset_after_send` with a method outside the replay-safe list), or
/// whose replay got no complete answer. In the implementation-defined server-error range
/// (-32000..-32099); -32000 / -32001 / -32002 are taken by SDK conventions and MCP.
pub const OUTCOME_UNKNOWN_CODE: i64 = -32003;

/// HTTP status of the answer to a request that provably did not run and was not replayed
/// because the filter did not hold its whole body (`body_complete: false`). Not a
/// JSON-RPC result: without the body there is no request id to answer, and an HTTP error
/// is what every client surfaces at once (a 200 with `id: null` would leave it waiting).
/// The body is a JSON-RPC error ([`OUTCOME_UNKNOWN_CODE`], `data.resend: true`).
pub const NOT_DELIVERED_STATUS: u16 = 503;

/// JSON-RPC error code of the "Session not found" answer after a failed recovery (the
/// TypeScript SDK's convention, also used by ToolHive).
pub const SESSION_NOT_FOUND_CODE: i64 = -32001;

/// The probe of `session_suspect` may use at most `timeout / PROBE_SHARE` of the
/// recovery deadline.
pub const PROBE_SHARE: u32 = 2;

/// How often a recovery that did not get the lease looks at the record again.
pub const LEASE_POLL: Duration = Duration::from_millis(20);

/// Body of the SSE answer to a GET that is not replayed: a stream that ends at once and
/// asks the client to reconnect after 1 s.
pub const GET_RETRY_BODY: &str = "retry: 1000\n\n";

/// `notifications/initialized` sent after re-initialization when the record has none.
pub const DEFAULT_INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// The client's request as the filter saw it.
#[derive(Clone, Serialize, Deserialize)]
pub struct OriginalRequest {
    /// `POST` or `GET` (`DELETE` is never recovered).
    pub method: String,
    /// Path and query, e.g. `/mcp?x=1`.
    pub path: String,
    /// `:authority` / `Host`, sent as `Host` to the pod.
    #[serde(default)]
    pub authority: Option<String>,
    /// `Content-Type`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `Accept`.
    #[serde(default)]
    pub accept: Option<String>,
    /// `MCP-Protocol-Version`.
    #[serde(default)]
    pub protocol_version: Option<String>,
    /// `Authorization` of this request: used for the calls to the pod, never stored or
    /// logged.
    #[serde(default)]
    pub authorization: Option<String>,
    /// The raw request body (JSON text; empty for GET).
    #[serde(default)]
    pub body: String,
    /// `body` is the whole body the client sent. `false` (the filter did not see the body
    /// end, or it was over the filter's replay limit; `body` is then empty): the session is
    /// recovered but the request is never replayed; the client is told it did not run
    /// ([`NOT_DELIVERED_STATUS`]). Absent: `true` (filters before this field).
    #[serde(default = "whole_by_default")]
    pub body_complete: bool,
}

fn whole_by_default() -> bool {
    true
}

impl fmt::Debug for OriginalRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginalRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("authority", &self.authority)
            .field("content_type", &self.content_type)
            .field("accept", &self.accept)
            .field("protocol_version", &self.protocol_version)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("body_len", &self.body.len())
            .field("body_complete", &self.body_complete)
            .finish()
    }
}

/// Body of `POST /v1/sessions/{id}/recover`. Unknown fields are ignored (newer filters
/// may send more).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecoverRequest {
    /// The generation of the pin that failed (the filter's view).
    pub failed_generation: u64,
    /// The upstream that failed, `ip:port`.
    pub failed_upstream: String,
    /// What failed.
    pub reason: Reason,
    /// The client's request.
    pub request: OriginalRequest,
    /// How the upstream says "session unknown" (`session_suspect` probes): the filter sends
    /// its plugin configuration's rules; absent → the defaults.
    #[serde(default)]
    pub session_errors: upstream::SessionErrors,
}

/// Where `record` says its session lives.
fn placement(record: &SessionRecord) -> Placement {
    Placement { upstream: record.upstream.clone(), backend_session_id: record.backend_session_id.clone(), generation: record.generation }
}

/// Settings of recovery (from the flags, see [`crate::config::Config::recovery`]).
#[derive(Clone, Debug)]
pub struct RecoverySettings {
    /// Where sessions may be re-initialized.
    pub endpoints: EndpointSource,
    /// Methods replayed after `reset_after_send`.
    pub replay_safe_methods: BTreeSet<String>,
    /// Bound of one whole recovery.
    pub timeout: Duration,
    /// Largest answer read from a pod.
    pub max_response_bytes: usize,
}

/// What the JSON-RPC body of the client's request holds.
#[derive(Clone, Debug, Default, PartialEq)]
struct JsonRpcInfo {
    /// The `id` to echo (`null` when absent, a batch, or not JSON).
    id: Value,
    /// The methods of the message(s).
    methods: Vec<String>,
    /// `true` when at least one message is a request (has `method` and `id`).
    has_request: bool,
}

impl JsonRpcInfo {
    fn of(body: &str) -> JsonRpcInfo {
        let messages = match serde_json::from_str::<Value>(body) {
            Ok(Value::Array(items)) => items,
            Ok(v @ Value::Object(_)) => vec![v],
            _ => return JsonRpcInfo { id: Value::Null, methods: Vec::new(), has_request: false },
        };
        let single = messages.len() == 1;
        let mut info = JsonRpcInfo::default();
        for m in &messages {
            if let Some(method) = m.get("method").and_then(Value::as_str) {
                info.methods.push(method.to_string());
                if m.get("id").is_some() {
                    info.has_request = true;
                }
            }
            if single && let Some(id) = m.get("id") {
                info.id = id.clone();
            }
        }
        info
    }
}

/// The JSON-RPC `id` of a request body: the id of its single message, else `null` (a
/// batch, a notification, not JSON).
pub(crate) fn jsonrpc_id(body: &str) -> Value {
    JsonRpcInfo::of(body).id
}

/// How the pin question ended.
enum Settled {
    /// The session lives on this pin (re-initialized now or by someone else).
    Pinned(Placement),
    /// No pin: why (logged).
    Failed(String),
}

/// The recovery engine: settings, the HTTP client for pods, in-process single flight.
pub struct Recovery {
    settings: RecoverySettings,
    http: reqwest::Client,
    locks: Arc<KeyedLocks>,
    turn: AtomicUsize,
    instance: String,
    seq: AtomicU64,
}

impl Recovery {
    /// An engine with `settings`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: RecoverySettings) -> anyhow::Result<Recovery> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Ok(Recovery {
            settings,
            http,
            locks: Arc::new(KeyedLocks::default()),
            turn: AtomicUsize::new(0),
            instance: format!("{}-{nanos:x}", std::process::id()),
            seq: AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &RecoverySettings {
        &self.settings
    }

    /// Checks a request before anything is done: method `POST` or `GET` (`DELETE` is never
    /// recovered), a path starting with `/`, header fields that are valid header values,
    /// and for reason `draining` a `failed_upstream` that is an `ip:port` (the body may be
    /// empty: the filter asks before the body arrives).
    ///
    /// # Errors
    /// 400 `invalid_request` naming the problem; 400 `invalid_upstream` for a `draining`
    /// request whose `failed_upstream` is not `ip:port`.
    pub fn validate(req: &RecoverRequest) -> Result<(), ApiError> {
        let r = &req.request;
        if req.reason == Reason::Draining
            && let Err(e) = req.failed_upstream.parse::<SocketAddr>()
        {
            return Err(ApiError::invalid_upstream(&req.failed_upstream, &e.to_string()));
        }
        if r.method.eq_ignore_ascii_case("DELETE") {
            return Err(ApiError::invalid_request("DELETE is never recovered: a failed DELETE just ends the session"));
        }
        if !(r.method.eq_ignore_ascii_case("POST") || r.method.eq_ignore_ascii_case("GET")) {
            return Err(ApiError::invalid_request("`request.method` must be POST or GET"));
        }
        if !r.path.starts_with('/') || !r.path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ApiError::invalid_request("`request.path` must start with / and be visible ASCII"));
        }
        for (name, v) in [
            ("authority", &r.authority),
            ("content_type", &r.content_type),
            ("accept", &r.accept),
            ("protocol_version", &r.protocol_version),
            ("authorization", &r.authorization),
        ] {
            if let Some(v) = v
                && reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(ApiError::invalid_request(format!("`request.{name}` is not a valid header value")));
            }
        }
        Ok(())
    }

    fn next_owner(&self) -> String {
        format!("{}-{}", self.instance, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Recovers session `id` as `req` asks. Answers 404 `session_not_found` when there is
    /// no record, 503 when the store fails; every decided outcome is `Ok`.
    ///
    /// # Errors
    /// [`ApiError`] as above (the request should have passed [`Recovery::validate`]).
    pub async fn recover<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
    ) -> Result<RecoverAnswer, ApiError> {
        let start = Instant::now();
        let deadline = start + self.settings.timeout;
        let Some(record) = store.get(id).await? else {
            return Err(ApiError::session_not_found(id.as_str()));
        };
        if req.reason == Reason::Draining {
            return self.move_off_draining(store, metrics, id, req, start, deadline).await;
        }
        let info = JsonRpcInfo::of(&req.request.body);
        let probed = if req.reason == Reason::SessionSuspect && record.generation <= req.failed_generation {
            let probe_deadline = deadline.min(start + self.settings.timeout / PROBE_SHARE);
            let probe = self.probe(&record, req, probe_deadline).await;
            metrics.count_probe(probe.as_str());
            tracing::info!(
                session = id.as_str(), upstream = record.upstream.as_str(), result = probe.as_str(),
                detail = match &probe { Probe::Unreachable(e) => e.as_str(), _ => "" },
                "session probe"
            );
            (probe == Probe::Alive).then(|| RecoverAnswer { outcome: Outcome::Alive, pin: Some(placement(&record)), response: None })
        } else {
            None
        };
        let answer = match probed {
            Some(alive) => alive,
            None => match self.settle(store, metrics, id, req, deadline).await? {
                Settled::Failed(why) => {
                    tracing::warn!(session = id.as_str(), reason = ?req.reason, why, "recovery failed");
                    RecoverAnswer { outcome: Outcome::Failed, pin: None, response: Some(session_not_found(&info.id)) }
                }
                Settled::Pinned(pin) => self.answer(req, &info, pin, metrics, deadline).await,
            },
        };
        metrics.observe_recovery(answer.outcome.as_str(), start.elapsed());
        tracing::info!(
            session = id.as_str(),
            reason = ?req.reason,
            outcome = answer.outcome.as_str(),
            upstream = answer.pin.as_ref().map(|p| p.upstream.as_str()),
            generation = answer.pin.as_ref().map(|p| p.generation),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "recovery"
        );
        Ok(answer)
    }

    /// Reason `draining`: settle the pin as a recovery does, reply `moved` with the pin or
    /// `stayed` with the current one. Nothing is replayed; the record is never deleted
    /// (the 404 answers a record deleted meanwhile, e.g. by the client's DELETE).
    async fn move_off_draining<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        start: Instant,
        deadline: Instant,
    ) -> Result<RecoverAnswer, ApiError> {
        let answer = match self.settle(store, metrics, id, req, deadline).await? {
            Settled::Pinned(pin) => RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin), response: None },
            Settled::Failed(why) => {
                let Some(current) = store.get(id).await? else {
                    return Err(ApiError::session_not_found(id.as_str()));
                };
                tracing::info!(session = id.as_str(), upstream = current.upstream.as_str(), why, "drain-move not made");
                RecoverAnswer { outcome: Outcome::Stayed, pin: Some(placement(&current)), response: None }
            }
        };
        tracing::info!(
            session = id.as_str(),
            reason = ?req.reason,
            outcome = answer.outcome.as_str(),
            draining = req.failed_upstream.as_str(),
            upstream = answer.pin.as_ref().map(|p| p.upstream.as_str()),
            generation = answer.pin.as_ref().map(|p| p.generation),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "drain-move"
        );
        Ok(answer)
    }

    /// The draining upstreams (by address), updating the `upstreams_draining` gauge.
    async fn draining<S: SessionStore>(&self, store: &S, metrics: &Metrics) -> Result<BTreeMap<SocketAddr, Drain>, ApiError> {
        let list = store.draining().await?;
        metrics.set_upstreams_draining(list.len());
        Ok(list.into_iter().filter_map(|d| Some((d.upstream.parse().ok()?, d))).collect())
    }

    /// Counts a drain-move of `upstream` decided by this call, in the store's drain and in
    /// the metrics (the delay of a move: `last_move_ms - since_ms` of the updated drain).
    async fn count_drain_move<S: SessionStore>(&self, store: &S, metrics: &Metrics, upstream: SocketAddr, moved: bool) {
        let delay = match store.record_drain_move(upstream, moved).await {
            Ok(Some(drain)) => drain.last_move_ms.map(|last| Duration::from_millis(last.saturating_sub(drain.since_ms))),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "counting a drain-move in the store failed");
                None
            }
        };
        metrics.observe_drain_move(moved, delay.filter(|_| moved));
    }

    /// Step 0 (`session_suspect`): does the pinned pod still know the session? A pin that
    /// cannot be resolved to an address counts as unreachable.
    async fn probe(&self, record: &SessionRecord, req: &RecoverRequest, deadline: Instant) -> Probe {
        let Some(endpoint) = resolve_upstream(&record.upstream, deadline).await else {
            return Probe::Unreachable(format!("cannot resolve {}", record.upstream));
        };
        if !endpoints::is_failed(endpoint, &req.failed_upstream) {
            tracing::debug!(
                pinned = record.upstream.as_str(), failed = req.failed_upstream.as_str(),
                "session_suspect: the failed upstream is not the pinned one; probing the pinned one"
            );
        }
        let r = &req.request;
        let target = Target { endpoint, path: &r.path, authority: r.authority.as_deref(), authorization: r.authorization.as_deref() };
        let protocol_version = record.protocol_version.as_deref().or(r.protocol_version.as_deref());
        upstream::probe(
            &self.http,
            &target,
            &record.backend_session_id,
            protocol_version,
            &req.session_errors,
            deadline,
            self.settings.max_response_bytes,
        )
        .await
    }

    /// Step 1: settle the pin, once per session across instances.
    async fn settle<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        deadline: Instant,
    ) -> Result<Settled, ApiError> {
        let Ok(_local) = tokio::time::timeout_at(deadline, self.locks.lock(id.as_str())).await else {
            return Ok(Settled::Failed("timed out waiting for another recovery of this session in this instance".into()));
        };
        let owner = self.next_owner();
        loop {
            let Some(record) = store.get(id).await? else {
                return Ok(Settled::Failed("the record was deleted meanwhile".into()));
            };
            if record.generation > req.failed_generation {
                return Ok(Settled::Pinned(placement(&record)));
            }
            if store.try_acquire_lease(id, &owner, self.settings.timeout).await? {
                let result = self.reinitialize(store, metrics, id, req, deadline).await;
                if let Err(e) = store.release_lease(id, &owner).await {
                    tracing::warn!(session = id.as_str(), error = %e, "releasing the recovery lease failed (it expires on its own)");
                }
                return result;
            }
            if Instant::now() + LEASE_POLL >= deadline {
                return Ok(Settled::Failed("timed out waiting for the recovery by another control instance".into()));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Under the lease: re-read, then re-initialize on the first endpoint that accepts.
    async fn reinitialize<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        deadline: Instant,
    ) -> Result<Settled, ApiError> {
        let Some(record) = store.get(id).await? else {
            return Ok(Settled::Failed("the record was deleted meanwhile".into()));
        };
        if record.generation > req.failed_generation {
            return Ok(Settled::Pinned(placement(&record)));
        }
        // Draining upstreams: excluded for a drain-move (whose failed upstream must still be
        // draining), tried last otherwise (a store error then only loses that preference).
        let drain_move = req.reason == Reason::Draining;
        let draining = match self.draining(store, metrics).await {
            Ok(d) => d,
            Err(e) if drain_move => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e.message, "reading the draining upstreams failed; not avoiding them");
                BTreeMap::new()
            }
        };
        let drained = req.failed_upstream.parse::<SocketAddr>().ok().filter(|a| draining.contains_key(a));
        if drain_move && drained.is_none() {
            return Ok(Settled::Failed(format!("{} is not draining (any more)", req.failed_upstream)));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let endpoints = self.settings.endpoints.resolve(remaining).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no recovery endpoints");
            Vec::new()
        });
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let draining_set: BTreeSet<SocketAddr> = draining.keys().copied().collect();
        let candidates = endpoints::candidates(&endpoints, &req.failed_upstream, req.reason, turn, &draining_set);
        let r = &req.request;
        let max = self.settings.max_response_bytes;
        let mut tried = Vec::new();
        for endpoint in candidates {
            if Instant::now() >= deadline {
                break;
            }
            let target = Target {
                endpoint,
                path: &r.path,
                authority: r.authority.as_deref(),
                authorization: r.authorization.as_deref(),
            };
            let init = match upstream::initialize(&self.http, &target, &record.initialize, deadline, max).await {
                Ok(init) => init,
                Err(e) => {
                    tracing::warn!(session = id.as_str(), %endpoint, error = %e, "re-initialization failed on this endpoint");
                    tried.push(format!("{endpoint}: {e}"));
                    continue;
                }
            };
            let protocol_version = record.protocol_version.clone().or(init.protocol_version.clone());
            let notification = record.initialized.as_deref().unwrap_or(DEFAULT_INITIALIZED);
            if let Err(e) = upstream::notify_initialized(
                &self.http,
                &target,
                notification,
                &init.session_id,
                protocol_version.as_deref(),
                deadline,
                max,
            )
            .await
            {
                tracing::warn!(session = id.as_str(), %endpoint, error = %e, "re-initialization failed on this endpoint");
                tried.push(format!("{endpoint}: {e}"));
                self.delete_orphan(&target, &init.session_id);
                continue;
            }
            // The pod now holds a new session: that is a re-initialization, whether or not
            // the pin below wins (a lost compare-and-set means single flight was bypassed,
            // e.g. an expired lease, and must show in the metric).
            metrics.count_reinitialization();
            let put = PutSession {
                backend_session_id: Some(init.session_id.clone()),
                upstream: endpoint.to_string(),
                generation: Some(record.generation.max(req.failed_generation) + 1),
                initialize: record.initialize.clone(),
                initialized: record.initialized.clone(),
                protocol_version,
            };
            return match store.put(id, &put, PutCondition::IfGeneration(record.generation)).await {
                Ok(PutOutcome::Created(new) | PutOutcome::Replaced(new)) => {
                    tracing::info!(
                        session = id.as_str(), %endpoint, generation = new.generation, "session re-initialized"
                    );
                    if let Some(upstream) = drained.filter(|_| drain_move) {
                        self.count_drain_move(store, metrics, upstream, true).await;
                    }
                    Ok(Settled::Pinned(placement(&new)))
                }
                Ok(PutOutcome::Conflict(current)) => {
                    self.delete_orphan(&target, &init.session_id);
                    match current {
                        // Someone else moved it: their move, not counted here.
                        Some(current) if current.generation > req.failed_generation => Ok(Settled::Pinned(placement(&current))),
                        Some(_) => {
                            if let Some(upstream) = drained.filter(|_| drain_move) {
                                self.count_drain_move(store, metrics, upstream, false).await;
                            }
                            Ok(Settled::Failed("the record changed during re-initialization".into()))
                        }
                        None => Ok(Settled::Failed("the record was deleted during re-initialization".into())),
                    }
                }
                Err(e) => {
                    self.delete_orphan(&target, &init.session_id);
                    Err(e.into())
                }
            };
        }
        let why = if tried.is_empty() {
            format!("no live endpoint (endpoints: {endpoints:?}, failed upstream {})", req.failed_upstream)
        } else {
            format!("no endpoint accepted the session: {}", tried.join("; "))
        };
        if let Some(upstream) = drained.filter(|_| drain_move) {
            // The session stays on its draining pod, which still serves: keep the record.
            self.count_drain_move(store, metrics, upstream, false).await;
            return Ok(Settled::Failed(why));
        }
        // No endpoint took the session: the client must start a new one.
        if let Err(e) = store.delete(id).await {
            tracing::warn!(session = id.as_str(), error = %e, "deleting the unrecoverable session failed");
        }
        Ok(Settled::Failed(why))
    }

    /// Best effort, in the background: ends a backend session control created but does not use.
    fn delete_orphan(&self, target: &Target<'_>, session_id: &str) {
        let http = self.http.clone();
        let (endpoint, path, authority, authorization) = (
            target.endpoint,
            target.path.to_string(),
            target.authority.map(str::to_string),
            target.authorization.map(str::to_string),
        );
        let session_id = session_id.to_string();
        tokio::spawn(async move {
            let target = Target { endpoint, path: &path, authority: authority.as_deref(), authorization: authorization.as_deref() };
            upstream::delete_session(&http, &target, &session_id, Duration::from_secs(2)).await;
        });
    }

    /// Sends `req` once more to `pin`, the session's current, unchanged pin, and answers
    /// with the pod's answer: the replay step of [`Recovery::recover`] under a deadline of
    /// its own (`--recovery-timeout-ms`). For the replay listener ([`crate::replay`]) after
    /// [`Outcome::Alive`]: the pod's first answer was genuine, but Envoy discarded it when
    /// it retried. Outcome `replayed` (`not_replayed` for a GET, or when the resend got no
    /// complete answer).
    pub(crate) async fn resend(&self, req: &RecoverRequest, pin: Placement, metrics: &Metrics) -> RecoverAnswer {
        let deadline = Instant::now() + self.settings.timeout;
        self.answer(req, &JsonRpcInfo::of(&req.request.body), pin, metrics, deadline).await
    }

    /// Steps 2 and 3: replay or explain, on `pin`.
    async fn answer(&self, req: &RecoverRequest, info: &JsonRpcInfo, pin: Placement, metrics: &Metrics, deadline: Instant) -> RecoverAnswer {
        let r = &req.request;
        let not_replayed = |response| RecoverAnswer { outcome: Outcome::NotReplayed, pin: Some(pin.clone()), response: Some(response) };
        if r.method.eq_ignore_ascii_case("GET") {
            return not_replayed(ClientResponse {
                status: 200,
                content_type: Some("text/event-stream".into()),
                body: GET_RETRY_BODY.into(),
            });
        }
        if !r.body_complete {
            return not_replayed(not_delivered(req.reason));
        }
        let safe = match req.reason {
            // `session_suspect` gets here only when the probe found the session unknown or
            // the pod unreachable (or the pin already moved): the pod answered the
            // original request with an error, so it did not run. Through `resend` the probe
            // found the session alive: the pod's error answer was genuine, an HTTP-level
            // refusal (404/400) of a request it did not run.
            Reason::ConnectFailure | Reason::SessionUnknown | Reason::SessionSuspect => true,
            Reason::ResetAfterSend => {
                !info.methods.is_empty() && info.methods.iter().all(|m| self.settings.replay_safe_methods.contains(m))
            }
            // Drain-moves never get here (see `move_off_draining`); never replay one.
            Reason::Draining => false,
        };
        if !safe {
            return not_replayed(outcome_unknown(
                info,
                "Outcome unknown: the connection to the MCP server was lost after the request was sent, and the \
                 request was not retried because it may already have taken effect. The session has been recovered; \
                 check the state before retrying.",
            ));
        }
        let Some(endpoint) = resolve_upstream(&pin.upstream, deadline).await else {
            return not_replayed(outcome_unknown(info, "The request could not be delivered to the MCP server after the session was recovered; it did not run."));
        };
        let target = Target { endpoint, path: &r.path, authority: r.authority.as_deref(), authorization: r.authorization.as_deref() };
        let headers = match upstream::replay_headers(
            &pin.backend_session_id,
            r.content_type.as_deref(),
            r.accept.as_deref(),
            r.protocol_version.as_deref(),
        ) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "replay headers");
                return not_replayed(outcome_unknown(info, "The request could not be replayed after the session was recovered; it did not run."));
            }
        };
        let wait_for = info.has_request.then_some(&info.id).filter(|id| !id.is_null());
        let sent = upstream::send(
            &self.http,
            &target,
            reqwest::Method::POST,
            headers,
            r.body.clone(),
            wait_for,
            deadline,
            self.settings.max_response_bytes,
        )
        .await;
        match sent {
            Ok(answer) => {
                metrics.count_replay();
                RecoverAnswer {
                    outcome: Outcome::Replayed,
                    pin: Some(pin.clone()),
                    response: Some(ClientResponse {
                        status: answer.status,
                        content_type: answer.content_type,
                        body: String::from_utf8_lossy(&answer.body).into_owned(),
                    }),
                }
            }
            Err(CallError::NotSent(e)) => {
                tracing::warn!(%endpoint, error = %e, "replay not sent");
                not_replayed(outcome_unknown(
                    info,
                    "The request could not be delivered to the MCP server after the session was recovered; it did not run.",
                ))
            }
            Err(CallError::MaybeSent(e)) => {
                tracing::warn!(%endpoint, error = %e, "replay without a complete answer");
                not_replayed(outcome_unknown(
                    info,
                    "Outcome unknown: the request was replayed after the session was recovered, but no complete answer \
                     came back. Check the state before retrying.",
                ))
            }
        }
    }
}

/// `ip:port` of a stored upstream (a name is resolved, first address).
async fn resolve_upstream(upstream: &str, deadline: Instant) -> Option<SocketAddr> {
    if let Ok(a) = upstream.parse() {
        return Some(a);
    }
    let lookup = tokio::time::timeout_at(deadline, tokio::net::lookup_host(upstream)).await;
    lookup.ok()?.ok()?.next()
}

/// The 200 JSON-RPC error (or, for a notification or a client's response, the 202 the
/// server would have sent) for a request that was not replayed.
fn outcome_unknown(info: &JsonRpcInfo, message: &str) -> ClientResponse {
    let no_answer_expected = !info.has_request && (!info.methods.is_empty() || !info.id.is_null());
    if no_answer_expected {
        // Notifications and JSON-RPC responses get no body.
        return ClientResponse { status: 202, content_type: None, body: String::new() };
    }
    let body = json!({
        "jsonrpc": "2.0",
        "id": info.id,
        "error": {"code": OUTCOME_UNKNOWN_CODE, "message": message, "data": {"recovered": true}},
    });
    ClientResponse { status: 200, content_type: Some("application/json".into()), body: body.to_string() }
}

/// The answer to a request whose whole body control does not have ([`NOT_DELIVERED_STATUS`],
/// `id: null`). After `reset_after_send` the request may have run: the message says so and
/// `data.resend` is false.
fn not_delivered(reason: Reason) -> ClientResponse {
    let (message, resend) = if reason == Reason::ResetAfterSend {
        ("Outcome unknown: the connection to the MCP server was lost after the request was sent, and the request \
          could not be replayed (its body was not held whole). The session has been recovered; check the state \
          before retrying.", false)
    } else {
        ("The request did not run: the MCP server's pod was gone before the request reached it, and its body was not \
          held whole to replay it. The session has been recovered; send the request again.", true)
    };
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": OUTCOME_UNKNOWN_CODE, "message": message, "data": {"recovered": true, "resend": resend}},
    });
    ClientResponse { status: NOT_DELIVERED_STATUS, content_type: Some("application/json".into()), body: body.to_string() }
}

/// The 404 + JSON-RPC "Session not found" that makes a standard client re-initialize.
/// `id` is the request's JSON-RPC id ([`jsonrpc_id`]).
pub(crate) fn session_not_found(id: &Value) -> ClientResponse {
    let body = json!({"jsonrpc": "2.0", "error": {"code": SESSION_NOT_FOUND_CODE, "message": "Session not found"}, "id": id});
    ClientResponse { status: 404, content_type: Some("application/json".into()), body: body.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonrpc_info() {
        let i = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}"#);
        assert_eq!((i.id.clone(), i.methods.clone(), i.has_request), (json!(7), vec!["tools/call".to_string()], true));
        let n = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#);
        assert_eq!((n.id.clone(), n.has_request), (Value::Null, false));
        let b = JsonRpcInfo::of(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#);
        assert_eq!((b.id.clone(), b.methods.len(), b.has_request), (Value::Null, 2, true));
        assert_eq!(JsonRpcInfo::of(""), JsonRpcInfo::default());
        assert_eq!(JsonRpcInfo::of("not json").methods.len(), 0);
    }

    #[test]
    fn client_answers() {
        let req = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":"a","method":"tools/call"}"#);
        let r = outcome_unknown(&req, "m");
        assert_eq!((r.status, r.content_type.as_deref()), (200, Some("application/json")));
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!("a"), json!(OUTCOME_UNKNOWN_CODE)));
        let note = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#);
        assert_eq!(outcome_unknown(&note, "m").status, 202);
        let resp = JsonRpcInfo::of(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#);
        assert_eq!(outcome_unknown(&resp, "m").status, 202);
        let empty = outcome_unknown(&JsonRpcInfo::default(), "m");
        assert_eq!(empty.status, 200);
        let nf = session_not_found(&json!(5));
        assert_eq!(nf.status, 404);
        assert_eq!(
            serde_json::from_str::<Value>(&nf.body).unwrap(),
            json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":5})
        );
    }

    #[test]
    fn validation_and_redaction() {
        let mut req: RecoverRequest = serde_json::from_value(json!({
            "failed_generation": 1, "failed_upstream": "127.0.0.1:1", "reason": "connect_failure",
            "request": {"method": "POST", "path": "/mcp", "authority": "mcp.local", "content_type": null,
                        "accept": null, "protocol_version": null, "authorization": "Bearer secret", "body": ""},
            "future_field": true
        }))
        .unwrap();
        assert!(Recovery::validate(&req).is_ok());
        assert!(!format!("{req:?}").contains("secret"));
        req.request.method = "DELETE".into();
        assert!(Recovery::validate(&req).unwrap_err().message.contains("DELETE"));
        req.request.method = "PUT".into();
        assert!(Recovery::validate(&req).is_err());
        req.request.method = "GET".into();
        req.request.path = "mcp".into();
        assert!(Recovery::validate(&req).is_err());
        req.request.path = "/mcp".into();
        req.request.accept = Some("bad\nvalue".into());
        assert!(Recovery::validate(&req).is_err());
        assert!(serde_json::from_value::<RecoverRequest>(json!({"failed_generation": 1, "failed_upstream": "x",
            "reason": "other", "request": {"method": "POST", "path": "/"}})).is_err());
    }

    #[test]
    fn session_suspect_and_alive_serde() {
        let req: RecoverRequest = serde_json::from_value(json!({
            "failed_generation": 3, "failed_upstream": "10.0.0.1:80", "reason": "session_suspect",
            "request": {"method": "POST", "path": "/mcp", "body": "{}"}
        }))
        .unwrap();
        assert_eq!(req.reason, Reason::SessionSuspect);
        assert_eq!(serde_json::to_value(Reason::SessionSuspect).unwrap(), json!("session_suspect"));
        assert_eq!(serde_json::to_value(Outcome::Alive).unwrap(), json!("alive"));
        assert_eq!(serde_json::from_value::<Outcome>(json!("alive")).unwrap(), Outcome::Alive);
        assert_eq!(Outcome::Alive.as_str(), "alive");
        let alive = RecoverAnswer {
            outcome: Outcome::Alive,
            pin: Some(Placement { upstream: "10.0.0.1:80".into(), backend_session_id: "b-1".into(), generation: 3 }),
            response: None,
        };
        let v = serde_json::to_value(&alive).unwrap();
        assert_eq!(
            v,
            json!({"outcome": "alive", "pin": {"upstream": "10.0.0.1:80", "backend_session_id": "b-1", "generation": 3},
                   "response": null})
        );
        assert_eq!(serde_json::from_value::<RecoverAnswer>(v).unwrap(), alive);
        // The other outcomes keep a response object.
        let replayed = RecoverAnswer {
            outcome: Outcome::Replayed,
            pin: alive.pin.clone(),
            response: Some(ClientResponse { status: 202, content_type: None, body: String::new() }),
        };
        assert_eq!(serde_json::to_value(&replayed).unwrap()["response"], json!({"status": 202, "content_type": null, "body": ""}));
    }

    /// A fake MCP pod for the probe: `initialize` creates session `new-id`; a request in a
    /// session it knows (`known` or `new-id`) gets a JSON result (202 for notifications);
    /// any other session gets the TypeScript SDK's 400 / -32000. Every request is logged
    /// as `method session protocol-version host authorization`.
    mod pod {
        use std::net::SocketAddr;
        use std::sync::{Arc, Mutex};

        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use serde_json::{Value, json};

        pub const TS_SDK_BODY: &str =
            r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#;

        pub async fn start(known: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
            let log = Arc::new(Mutex::new(Vec::new()));
            let seen = log.clone();
            let handler = move |headers: HeaderMap, body: String| {
                let seen = seen.clone();
                async move {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let method = v["method"].as_str().unwrap_or("").to_string();
                    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    let sid = h("mcp-session-id");
                    seen.lock().unwrap().push(format!(
                        "{method} {sid} {} {} {}",
                        h("mcp-protocol-version"),
                        h("host"),
                        h("authorization")
                    ));
                    let json_ct = [("content-type", "application/json")];
                    if method == "initialize" {
                        let result = json!({"jsonrpc":"2.0","id":v["id"],"result":{"protocolVersion":"2025-06-18"}});
                        return (json_ct, [("mcp-session-id", "new-id")], result.to_string()).into_response();
                    }
                    if sid != known && sid != "new-id" {
                        return (StatusCode::BAD_REQUEST, json_ct, TS_SDK_BODY).into_response();
                    }
                    if method.starts_with("notifications/") {
                        return StatusCode::ACCEPTED.into_response();
                    }
                    let result = json!({"jsonrpc":"2.0","id":v["id"],"result":{"session":sid}});
                    (json_ct, result.to_string()).into_response()
                }
            };
            let app = axum::Router::new().route("/mcp", axum::routing::post(handler));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (addr, log)
        }
    }

    fn recovery_with(endpoints: Vec<SocketAddr>) -> Recovery {
        Recovery::new(RecoverySettings {
            endpoints: EndpointSource::Static(endpoints),
            replay_safe_methods: BTreeSet::new(),
            timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
        })
        .unwrap()
    }

    /// A memory store holding session `client-1`, pinned to `upstream` as backend `b-1`
    /// at generation 1.
    async fn store_with(upstream: SocketAddr, protocol_version: Option<&str>) -> (crate::store::memory::MemoryStore, SessionId) {
        let store = crate::store::memory::MemoryStore::new(Duration::from_secs(60), 10);
        let id = SessionId::parse("client-1").unwrap();
        let put = PutSession {
            backend_session_id: Some("b-1".into()),
            upstream: upstream.to_string(),
            generation: Some(1),
            initialize: r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#.into(),
            initialized: None,
            protocol_version: protocol_version.map(str::to_string),
        };
        store.put(&id, &put, PutCondition::Always).await.unwrap();
        (store, id)
    }

    async fn suspect_setup(
        known: &'static str,
    ) -> (Recovery, crate::store::memory::MemoryStore, SessionId, SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let (addr, log) = pod::start(known).await;
        let (store, id) = store_with(addr, Some("2025-06-18")).await;
        (recovery_with(vec![addr]), store, id, addr, log)
    }

    fn suspect(addr: SocketAddr, failed_generation: u64) -> RecoverRequest {
        serde_json::from_value(json!({
            "failed_generation": failed_generation, "failed_upstream": addr.to_string(), "reason": "session_suspect",
            "request": {"method": "POST", "path": "/mcp", "authority": "mcp.local", "content_type": "application/json",
                        "accept": "application/json, text/event-stream", "protocol_version": "2025-03-26",
                        "authorization": "Bearer c", "body": r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{}}"#}
        }))
        .unwrap()
    }

    fn probes(metrics: &Metrics) -> String {
        let text = metrics.render(crate::store::StoreStats { records: None, evictions: 0 });
        text.lines().filter(|l| l.starts_with("mcp_affinity_control_probes_total{")).collect::<Vec<_>>().join("\n")
    }

    /// A drain-move request of session `client-1` pinned to `from` at `generation`, with
    /// `body` (the filter sends an empty one).
    fn draining_request(from: SocketAddr, generation: u64, method: &str, body: &str) -> RecoverRequest {
        serde_json::from_value(json!({
            "failed_generation": generation, "failed_upstream": from.to_string(), "reason": "draining",
            "request": {"method": method, "path": "/mcp", "authority": "mcp.local", "accept": "application/json, text/event-stream",
                        "protocol_version": "2025-06-18", "authorization": "Bearer c", "body": body}
        }))
        .unwrap()
    }

    fn rendered(metrics: &Metrics) -> String {
        metrics.render(crate::store::StoreStats { records: None, evictions: 0 })
    }

    #[tokio::test]
    async fn draining_moves_to_a_live_endpoint_and_replays_nothing() {
        let (from, from_log) = pod::start("b-1").await;
        let (to, to_log) = pod::start("none").await;
        let (store, id) = store_with(from, Some("2025-06-18")).await;
        store.drain(from, crate::store::DrainSource::Admin).await.unwrap();
        let recovery = recovery_with(vec![from, to]);
        let metrics = Metrics::new();
        // Even a request body (a filter never sends one here) is not replayed.
        let body = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{}}"#;
        let answer = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "POST", body)).await.unwrap();
        let pin = Placement { upstream: to.to_string(), backend_session_id: "new-id".into(), generation: 2 };
        assert_eq!(answer, RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin.clone()), response: None });
        let methods: Vec<String> = to_log.lock().unwrap().iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(methods, ["initialize -", "notifications/initialized new-id"], "re-initialization only");
        assert!(from_log.lock().unwrap().is_empty(), "the draining pod is not called");
        let record = store.get(&id).await.unwrap().unwrap();
        assert_eq!((record.upstream.as_str(), record.generation), (to.to_string().as_str(), 2));
        let drain = store.draining().await.unwrap().remove(0);
        assert_eq!((drain.moved, drain.failed), (1, 0));
        assert!(drain.last_move_ms.is_some_and(|last| last >= drain.since_ms), "{drain:?}");
        let text = rendered(&metrics);
        assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="moved"} 1"#), "{text}");
        assert!(text.contains("mcp_affinity_control_drain_move_delay_seconds_count 1"), "{text}");
        assert!(text.contains("mcp_affinity_control_reinitializations_total 1"), "{text}");
        assert!(!text.contains("mcp_affinity_control_recoveries_total{"), "drain-moves are not recoveries: {text}");
        assert!(text.contains("mcp_affinity_control_upstreams_draining 1"), "{text}");

        // A filter still holding generation 1 (a GET, say): already moved, same pin,
        // nothing sent anywhere, nothing counted again.
        to_log.lock().unwrap().clear();
        let again = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "GET", "")).await.unwrap();
        assert_eq!(again, RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin), response: None });
        assert!(to_log.lock().unwrap().is_empty());
        assert_eq!(store.draining().await.unwrap()[0].moved, 1);
        assert!(rendered(&metrics).contains(r#"mcp_affinity_control_drain_moves_total{outcome="moved"} 1"#));
    }

    #[tokio::test]
    async fn draining_without_a_live_endpoint_stays_and_keeps_the_record() {
        // The only other endpoint is draining too, and a third one is dead.
        let (from, _) = pod::start("b-1").await;
        let (other, other_log) = pod::start("none").await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (store, id) = store_with(from, None).await;
        for a in [from, other] {
            store.drain(a, crate::store::DrainSource::Admin).await.unwrap();
        }
        let metrics = Metrics::new();
        let recovery = recovery_with(vec![from, other, dead]);
        let answer = recovery.recover(&store, &metrics, &id, &draining_request(from, 1, "POST", "")).await.unwrap();
        let pin = Placement { upstream: from.to_string(), backend_session_id: "b-1".into(), generation: 1 };
        assert_eq!(answer, RecoverAnswer { outcome: Outcome::Stayed, pin: Some(pin), response: None });
        assert!(other_log.lock().unwrap().is_empty(), "a draining endpoint is never a drain-move target");
        let record = store.get(&id).await.unwrap().expect("the record is kept");
        assert_eq!((record.upstream, record.generation), (from.to_string(), 1));
        let drains = store.draining().await.unwrap();
        let drain = drains.iter().find(|d| d.upstream == from.to_string()).unwrap();
        assert_eq!((drain.moved, drain.failed, drain.last_move_ms), (0, 1, None));
        let text = rendered(&metrics);
        assert!(text.contains(r#"mcp_affinity_control_drain_moves_total{outcome="stayed"} 1"#), "{text}");
        assert!(text.contains("mcp_affinity_control_reinitializations_total 0"), "{text}");
    }

    #[tokio::test]
    async fn draining_an_upstream_that_is_not_draining_stays_uncounted() {
        let (from, _) = pod::start("b-1").await;
        let (to, to_log) = pod::start("none").await;
        let (store, id) = store_with(from, None).await;
        let metrics = Metrics::new();
        let answer = recovery_with(vec![from, to]).recover(&store, &metrics, &id, &draining_request(from, 1, "POST", "")).await.unwrap();
        assert_eq!(answer.outcome, Outcome::Stayed);
        assert_eq!(answer.pin.unwrap().upstream, from.to_string());
        assert!(to_log.lock().unwrap().is_empty());
        assert!(!rendered(&metrics).contains("mcp_affinity_control_drain_moves_total{"));
        // No record: 404 as for every recovery.
        let other = SessionId::parse("nobody").unwrap();
        let err = recovery_with(vec![to]).recover(&store, &metrics, &other, &draining_request(from, 1, "POST", "")).await.unwrap_err();
        assert_eq!(err.code, "session_not_found");
    }

    #[tokio::test]
    async fn other_reasons_avoid_draining_endpoints() {
        // Pinned to a dead address; two live pods, one draining: every recovery goes to the
        // other one, whatever the rotation.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (draining, draining_log) = pod::start("none").await;
        let (live, _) = pod::start("none").await;
        let store = crate::store::memory::MemoryStore::new(Duration::from_secs(60), 10);
        store.drain(draining, crate::store::DrainSource::Dns).await.unwrap();
        let recovery = recovery_with(vec![dead, draining, live]);
        for n in 0..4 {
            let id = SessionId::parse(&format!("s-{n}")).unwrap();
            let put = PutSession {
                backend_session_id: None,
                upstream: dead.to_string(),
                generation: None,
                initialize: r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#.into(),
                initialized: None,
                protocol_version: None,
            };
            store.put(&id, &put, PutCondition::Always).await.unwrap();
            let req: RecoverRequest = serde_json::from_value(json!({
                "failed_generation": 1, "failed_upstream": dead.to_string(), "reason": "connect_failure",
                "request": {"method": "GET", "path": "/mcp"}
            }))
            .unwrap();
            let answer = recovery.recover(&store, &Metrics::new(), &id, &req).await.unwrap();
            assert_eq!(answer.pin.unwrap().upstream, live.to_string(), "turn {n}");
        }
        assert!(draining_log.lock().unwrap().is_empty());
    }

    #[test]
    fn draining_validation_and_serde() {
        let from: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut req = draining_request(from, 1, "GET", "");
        assert_eq!(req.reason, Reason::Draining);
        assert!(Recovery::validate(&req).is_ok(), "GET with an empty body");
        req.request.method = "POST".into();
        assert!(Recovery::validate(&req).is_ok(), "POST with an empty body");
        req.failed_upstream = "[fd00::1]:8080".into();
        assert!(Recovery::validate(&req).is_ok());
        req.failed_upstream = "pod-a:80".into();
        assert_eq!(Recovery::validate(&req).unwrap_err().code, "invalid_upstream");
        req.failed_upstream = from.to_string();
        req.request.method = "DELETE".into();
        assert!(Recovery::validate(&req).is_err());
        assert_eq!(serde_json::to_value(Reason::Draining).unwrap(), json!("draining"));
        let moved = RecoverAnswer {
            outcome: Outcome::Moved,
            pin: Some(Placement { upstream: "10.0.0.2:80".into(), backend_session_id: "b-2".into(), generation: 2 }),
            response: None,
        };
        assert_eq!(
            serde_json::to_value(&moved).unwrap(),
            json!({"outcome": "moved", "pin": {"upstream": "10.0.0.2:80", "backend_session_id": "b-2", "generation": 2}, "response": null})
        );
        assert_eq!(serde_json::to_value(Outcome::Stayed).unwrap(), json!("stayed"));
    }

    #[tokio::test]
    async fn session_suspect_on_a_live_session_is_alive_and_changes_nothing() {
        let (recovery, store, id, addr, log) = suspect_setup("b-1").await;
        let metrics = Metrics::new();
        let answer = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
        let pin = Placement { upstream: addr.to_string(), backend_session_id: "b-1".into(), generation: 1 };
        assert_eq!(answer, RecoverAnswer { outcome: Outcome::Alive, pin: Some(pin), response: None });
        // One ping in the backend session, with the record's protocol version and the
        // client's Host and Authorization; the request itself was not replayed.
        assert_eq!(*log.lock().unwrap(), ["ping b-1 2025-06-18 mcp.local Bearer c"]);
        assert_eq!(store.get(&id).await.unwrap().unwrap().generation, 1);
        assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="alive"} 1"#);
        let text = metrics.render(crate::store::StoreStats { records: None, evictions: 0 });
        assert!(text.contains(r#"mcp_affinity_control_recoveries_total{outcome="alive"} 1"#), "{text}");
        assert!(text.contains("mcp_affinity_control_reinitializations_total 0"), "{text}");
    }

    #[tokio::test]
    async fn session_suspect_on_a_lost_session_reinitializes_and_replays() {
        let (recovery, store, id, addr, log) = suspect_setup("other").await;
        let metrics = Metrics::new();
        let answer = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
        assert_eq!(answer.outcome, Outcome::Replayed, "{answer:?}");
        assert_eq!(answer.pin, Some(Placement { upstream: addr.to_string(), backend_session_id: "new-id".into(), generation: 2 }));
        let response = answer.response.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(serde_json::from_str::<Value>(&response.body).unwrap()["id"], 9);
        let methods: Vec<String> = log.lock().unwrap().iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(methods, ["ping b-1", "initialize -", "notifications/initialized new-id", "tools/call new-id"]);
        assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="session_unknown"} 1"#);

        // A filter still holding generation 1: the pin already moved, no probe, no
        // re-initialization, replayed on the current pin.
        log.lock().unwrap().clear();
        let again = recovery.recover(&store, &metrics, &id, &suspect(addr, 1)).await.unwrap();
        assert_eq!((again.outcome, again.pin.unwrap().generation), (Outcome::Replayed, 2));
        let lines = log.lock().unwrap().clone();
        assert_eq!(lines, ["tools/call new-id 2025-03-26 mcp.local Bearer c"], "only the replay");
        assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="session_unknown"} 1"#);
    }

    #[tokio::test]
    async fn session_suspect_on_an_unreachable_pod_goes_on_as_session_unknown() {
        // Pinned to a closed port, no endpoint to move to: the probe finds the pod
        // unreachable and the session_unknown path ends in `failed`.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (store, id) = store_with(closed, None).await;
        let metrics = Metrics::new();
        let answer = recovery_with(Vec::new()).recover(&store, &metrics, &id, &suspect(closed, 1)).await.unwrap();
        assert_eq!((answer.outcome, answer.pin), (Outcome::Failed, None));
        assert_eq!(answer.response.unwrap().status, 404);
        assert_eq!(probes(&metrics), r#"mcp_affinity_control_probes_total{result="unreachable"} 1"#);
        assert!(store.get(&id).await.unwrap().is_none(), "record deleted");
    }
}
