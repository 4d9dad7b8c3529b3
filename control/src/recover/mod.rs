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
pub mod recent;
pub mod upstream;

mod answer;
mod reinit;
mod request;

pub(crate) use self::request::jsonrpc_id;
pub use self::request::{OriginalRequest, RecoverRequest};
pub(crate) use self::answer::session_not_found;
use self::answer::resolve_upstream;
use self::request::JsonRpcInfo;


use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;


pub use mcp_affinity_proto::recover::{ClientResponse, Outcome, Placement, Reason, RecoverAnswer};
use tokio::time::Instant;

use self::endpoints::EndpointSource;
use self::locks::KeyedLocks;
use self::recent::{RecentRecoveries, RecentRecovery};
use crate::clock::{Clock as _, SystemClock};
use self::upstream::{Probe, Target};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::record::SessionRecord;
use crate::session_id::SessionId;
use crate::store::SessionStore;


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

/// Where `record` says its session lives.
pub(super) fn placement(record: &SessionRecord) -> Placement {
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

/// What settling the pin did ([`Recovery::settle`]).
pub(super) enum Settled {
    /// This call re-initialized the session on this pin.
    Reinitialized(Placement),
    /// Someone else did (the record's generation is past the failed one): its pin.
    Already(Placement),
    /// No new pin.
    Failed(Failure),
}

impl Settled {
    /// The pin the session lives on now, if it moved.
    fn placement(self) -> Result<Placement, Failure> {
        match self {
            Settled::Reinitialized(p) | Settled::Already(p) => Ok(p),
            Settled::Failed(f) => Err(f),
        }
    }
}

/// Why no new pin; each carries the reason for the log.
#[derive(Debug)]
pub(super) enum Failure {
    /// Nothing was tried on a pod: the deadline passed waiting for another recovery of the
    /// session, or the record was deleted meanwhile.
    NotTried(String),
    /// A pod took the session, but the record changed under the compare-and-set.
    Conflict(String),
    /// No endpoint accepted the session.
    NoEndpoint(String),
}

impl Failure {
    fn why(&self) -> &str {
        match self {
            Failure::NotTried(why) | Failure::Conflict(why) | Failure::NoEndpoint(why) => why,
        }
    }
}

/// The recovery engine: settings, the HTTP client for pods, in-process single flight.
pub struct Recovery {
    settings: RecoverySettings,
    http: reqwest::Client,
    locks: Arc<KeyedLocks>,
    turn: AtomicUsize,
    instance: String,
    seq: AtomicU64,
    recent: RecentRecoveries,
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
            recent: RecentRecoveries::default(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &RecoverySettings {
        &self.settings
    }


    /// The last recover calls this instance decided (recoveries and drain-moves).
    pub fn recent(&self) -> &RecentRecoveries {
        &self.recent
    }

    /// Keeps the decided `answer` of `req` for session `id` in [`Self::recent`].
    fn remember(&self, id: &SessionId, req: &RecoverRequest, answer: &RecoverAnswer, start: Instant) {
        self.recent.push(RecentRecovery {
            at_ms: SystemClock.unix_ms(),
            session: recent::truncate_session(id.as_str()),
            reason: req.reason,
            failed_upstream: req.failed_upstream.clone(),
            new_upstream: answer.pin.as_ref().map(|p| p.upstream.clone()),
            outcome: answer.outcome,
            elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
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
            None => match self.settle(store, metrics, id, req, deadline).await?.placement() {
                Ok(pin) => self.answer(req, &info, pin, metrics, deadline).await,
                Err(failure) => {
                    tracing::warn!(session = id.as_str(), reason = ?req.reason, why = failure.why(), "recovery failed");
                    if let Failure::NoEndpoint(_) = failure
                        && let Err(e) = store.delete(id).await
                    {
                        // No endpoint took the session: the client must start a new one.
                        tracing::warn!(session = id.as_str(), error = %e, "deleting the unrecoverable session failed");
                    }
                    RecoverAnswer { outcome: Outcome::Failed, pin: None, response: Some(session_not_found(&info.id)) }
                }
            },
        };
        metrics.observe_recovery(answer.outcome.as_str(), start.elapsed());
        self.remember(id, req, &answer, start);
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
    /// (the 404 answers a record deleted meanwhile, e.g. by the client's DELETE). A
    /// failed upstream that is not draining (any more) stays; a move this call made, or
    /// tried and could not make, is counted in the drain.
    async fn move_off_draining<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        start: Instant,
        deadline: Instant,
    ) -> Result<RecoverAnswer, ApiError> {
        let draining = self.draining(store, metrics).await?;
        let drained = req.failed_upstream.parse::<SocketAddr>().ok().filter(|a| draining.contains(a));
        let settled = match drained {
            Some(_) => self.settle(store, metrics, id, req, deadline).await?,
            None => Settled::Failed(Failure::NotTried(format!("{} is not draining (any more)", req.failed_upstream))),
        };
        if let Some(upstream) = drained {
            match &settled {
                Settled::Reinitialized(_) => self.count_drain_move(store, metrics, upstream, true).await,
                Settled::Failed(Failure::Conflict(_) | Failure::NoEndpoint(_)) => self.count_drain_move(store, metrics, upstream, false).await,
                // Someone else's move, or none tried: not this call's to count.
                Settled::Already(_) | Settled::Failed(Failure::NotTried(_)) => {}
            }
        }
        let answer = match settled.placement() {
            Ok(pin) => RecoverAnswer { outcome: Outcome::Moved, pin: Some(pin), response: None },
            Err(failure) => {
                let Some(current) = store.get(id).await? else {
                    return Err(ApiError::session_not_found(id.as_str()));
                };
                tracing::info!(session = id.as_str(), upstream = current.upstream.as_str(), why = failure.why(), "drain-move not made");
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
        self.remember(id, req, &answer, start);
        Ok(answer)
    }

    /// The draining upstreams' addresses, updating the `upstreams_draining` gauge.
    async fn draining<S: SessionStore>(&self, store: &S, metrics: &Metrics) -> Result<BTreeSet<SocketAddr>, ApiError> {
        let list = store.draining().await?;
        metrics.set_upstreams_draining(list.len());
        Ok(list.into_iter().filter_map(|d| d.upstream.parse().ok()).collect())
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

}

#[cfg(test)]
mod tests;
