//! Step 1 of a recovery or a drain-move: settle where the session lives — once per session
//! across every control instance (the record's lease, the in-process lock) —
//! re-initializing it on a live endpoint (the stored `initialize` and
//! `notifications/initialized`), and deleting what a lost race left behind on a pod.
//! Returns what happened ([`Settled`]); what that means for the record, the client and the
//! drain's counts is the caller's.


use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;


use tokio::time::Instant;

use super::endpoints::{self};
use super::upstream::{self, Target};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::record::{PutCondition, PutSession};
use crate::session_id::SessionId;
use crate::store::{PutOutcome, SessionStore};

use super::request::RecoverRequest;
use super::{Failure, Recovery, Settled, placement};
use super::{DEFAULT_INITIALIZED, LEASE_POLL};

impl Recovery {
    /// Step 1: settle the pin, once per session across instances.
    pub(super) async fn settle<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        deadline: Instant,
    ) -> Result<Settled, ApiError> {
        let Ok(_local) = tokio::time::timeout_at(deadline, self.locks.lock(id.as_str())).await else {
            return Ok(Settled::Failed(Failure::NotTried("timed out waiting for another recovery of this session in this instance".into())));
        };
        let owner = self.next_owner();
        loop {
            let Some(record) = store.get(id).await? else {
                return Ok(Settled::Failed(Failure::NotTried("the record was deleted meanwhile".into())));
            };
            if record.generation > req.failed_generation {
                return Ok(Settled::Already(placement(&record)));
            }
            if store.try_acquire_lease(id, &owner, self.settings.timeout).await? {
                let result = self.reinitialize(store, metrics, id, req, deadline).await;
                if let Err(e) = store.release_lease(id, &owner).await {
                    tracing::warn!(session = id.as_str(), error = %e, "releasing the recovery lease failed (it expires on its own)");
                }
                return result;
            }
            if Instant::now() + LEASE_POLL >= deadline {
                return Ok(Settled::Failed(Failure::NotTried("timed out waiting for the recovery by another control instance".into())));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Under the lease: re-read, then re-initialize on the first endpoint that accepts.
    pub(super) async fn reinitialize<S: SessionStore>(
        &self,
        store: &S,
        metrics: &Metrics,
        id: &SessionId,
        req: &RecoverRequest,
        deadline: Instant,
    ) -> Result<Settled, ApiError> {
        let Some(record) = store.get(id).await? else {
            return Ok(Settled::Failed(Failure::NotTried("the record was deleted meanwhile".into())));
        };
        if record.generation > req.failed_generation {
            return Ok(Settled::Already(placement(&record)));
        }
        // Draining upstreams are tried last, or not at all for a drain-move
        // ([`endpoints::candidates`]); a store error only loses that preference.
        let draining = self.draining(store, metrics).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e.message, "reading the draining upstreams failed; not avoiding them");
            BTreeSet::new()
        });
        let remaining = deadline.saturating_duration_since(Instant::now());
        let endpoints = self.settings.endpoints.resolve(remaining).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no recovery endpoints");
            Vec::new()
        });
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let candidates = endpoints::candidates(&endpoints, &req.failed_upstream, req.reason, turn, &draining);
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
                    Ok(Settled::Reinitialized(placement(&new)))
                }
                Ok(PutOutcome::Conflict(current)) => {
                    self.delete_orphan(&target, &init.session_id);
                    match current {
                        // Someone else moved it.
                        Some(current) if current.generation > req.failed_generation => Ok(Settled::Already(placement(&current))),
                        Some(_) => Ok(Settled::Failed(Failure::Conflict("the record changed during re-initialization".into()))),
                        None => Ok(Settled::Failed(Failure::NotTried("the record was deleted during re-initialization".into()))),
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
        Ok(Settled::Failed(Failure::NoEndpoint(why)))
    }

    /// Best effort, in the background: ends a backend session control created but does not use.
    pub(super) fn delete_orphan(&self, target: &Target<'_>, session_id: &str) {
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
}
