//! Session storage: one trait, [`SessionStore`], and two implementations — the embedded
//! [`memory::MemoryStore`] (default) and [`redis::RedisStore`] (shared by several control
//! instances; one node, Sentinel or Cluster).
//!
//! Every implementation gives the same guarantees, checked by one conformance suite:
//! records expire after an idle TTL (refreshed by `put` and `patch`, not by `get`);
//! `put` with [`PutCondition::IfGeneration`] is an atomic compare-and-set; a failed
//! operation changes nothing (one documented exception: a Redis write that too few replicas
//! acknowledged, see [`redis::ReplicationWait`]); a recovery lease ([`SessionStore::try_acquire_lease`]) has
//! at most one live holder per session among everyone sharing the store.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::record::{PatchSession, PutCondition, PutSession, SessionRecord};
use crate::session_id::SessionId;

/// What a `put` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// No record existed; this one was stored.
    Created(SessionRecord),
    /// A record existed and was replaced by this one.
    Replaced(SessionRecord),
    /// The condition did not hold; nothing was written. Holds the current record
    /// (`None` when absent).
    Conflict(Option<SessionRecord>),
}

/// Counters a store can report cheaply (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Live records, when the store can count them cheaply (memory: yes; Redis: no).
    pub records: Option<u64>,
    /// Records removed to make room (memory store at `--max-sessions`).
    pub evictions: u64,
}

/// Why a store operation failed. Nothing was written when an error is returned, except
/// for [`StoreError::Unavailable`] from a Redis store with a [`redis::ReplicationWait`]:
/// the primary applied the write but too few replicas acknowledged it (outcome unknown).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing store cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Concurrent writers kept changing the record; the write was not applied.
    #[error("store busy: {0}")]
    Busy(String),
    /// A stored value is not a valid record.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Durable, shared home of session records.
///
/// Futures are `Send` so handlers can run on a multi-threaded runtime. Implementations
/// take timestamps from their own clock.
pub trait SessionStore: Send + Sync + 'static {
    /// The record of `id`, or `None` when absent or expired. Does not touch it.
    fn get(&self, id: &SessionId) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Creates or replaces the record of `id` from `body` if `condition` holds against
    /// the current record, atomically. Keeps `created_at_ms` of a replaced record and
    /// restarts the idle TTL.
    fn put(
        &self,
        id: &SessionId,
        body: &PutSession,
        condition: PutCondition,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send;

    /// Touches the record of `id` (last seen, idle TTL) and applies `patch`; `None` when
    /// absent.
    fn patch(
        &self,
        id: &SessionId,
        patch: &PatchSession,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Removes the record of `id`; `false` when there was none.
    fn delete(&self, id: &SessionId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes the recovery lease of `id` for `owner` unless someone else holds a live one:
    /// `true` when `owner` now holds it. The lease expires on its own after `ttl` (so a
    /// holder that crashes cannot block recovery for longer). Independent of the record:
    /// works whether or not the record exists and never changes it.
    fn try_acquire_lease(
        &self,
        id: &SessionId,
        owner: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease of `id` up if `owner` still holds it (a lease that expired and was
    /// taken by someone else is left alone).
    fn release_lease(&self, id: &SessionId, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks that the store answers (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Cheap counters for `/metrics`.
    fn stats(&self) -> StoreStats;
}
