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
//!
//! Stores also hold the **drain state** of upstreams ([`Drain`]): which MCP server pods
//! are going away, so that every control instance (and, through
//! `GET /v1/upstreams/draining`, every filter) moves their sessions off them. A drain
//! expires a fixed time after it began (the drain TTL, `--drain-ttl-secs`), so a drain
//! nobody undoes (the pod is gone, its IP reused much later) does not last forever.

pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
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

/// Default drain TTL (`--drain-ttl-secs`): one hour.
pub const DEFAULT_DRAIN_TTL: Duration = Duration::from_secs(3600);

pub use mcp_affinity_proto::draining::{Drain, DrainSource};
pub use mcp_affinity_proto::tasks::TaskRecord;

/// `true` when a drain that began at `since_ms` is over at `now_ms` (`ttl` after it began).
pub fn drain_expired(since_ms: u64, now_ms: u64, ttl: Duration) -> bool {
    now_ms >= since_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
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

    /// Marks `upstream` as draining, begun by `source`, and returns its drain.
    /// Idempotent: an upstream already draining keeps its drain as it is (`since_ms`,
    /// `source`, counters) and that drain is returned; an expired drain is replaced by a
    /// new one.
    fn drain(&self, upstream: SocketAddr, source: DrainSource) -> impl Future<Output = Result<Drain, StoreError>> + Send;

    /// Ends the drain of `upstream`; `false` when it was not draining (or its drain had
    /// expired).
    fn undrain(&self, upstream: SocketAddr) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every unexpired drain, sorted by `upstream` (as text). Expired drains are not
    /// returned (and may be deleted on the way).
    fn draining(&self) -> impl Future<Output = Result<Vec<Drain>, StoreError>> + Send;

    /// Counts one drain-move of `upstream`: `moved` → `moved += 1` and `last_move_ms` =
    /// now (the store's clock); else `failed += 1`. Returns the drain after the update,
    /// or `None` — and changes nothing — when `upstream` is not draining.
    fn record_drain_move(
        &self,
        upstream: SocketAddr,
        moved: bool,
    ) -> impl Future<Output = Result<Option<Drain>, StoreError>> + Send;

    /// Stores the pin of task `task_id` (MCP tasks extension): it lives on `upstream`; the
    /// pin expires `ttl` from now (the store's clock). Replaces any earlier pin of the id.
    /// `terminal`: the task reached a terminal status; an existing pin is kept with its
    /// expiry and marked terminal (`ttl` applies only when there is none), and the task no
    /// longer counts in [`SessionStore::unfinished_tasks`].
    fn put_task(&self, task_id: &str, upstream: &str, ttl: Duration, terminal: bool) -> impl Future<Output = Result<TaskRecord, StoreError>> + Send;

    /// How many unexpired, non-terminal task pins name `upstream` (the draining list's
    /// `tasks`: what a draining pod's `preStop` hook waits for).
    fn unfinished_tasks(&self, upstream: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The unexpired pin of task `task_id`.
    fn get_task(&self, task_id: &str) -> impl Future<Output = Result<Option<TaskRecord>, StoreError>> + Send;

    /// Forgets the pin of task `task_id`; `false` when there was none.
    fn delete_task(&self, task_id: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Checks that the store answers (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Cheap counters for `/metrics`.
    fn stats(&self) -> StoreStats;

    /// Live records by the upstream they are pinned to (`upstream` as stored), for the
    /// status page; `None` when the store cannot count them cheaply (Redis: that would
    /// read every record). The default is `None`.
    fn sessions_by_upstream(&self) -> Option<BTreeMap<String, u64>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_json_and_sources() {
        let d = Drain::new("10.0.0.7:8080".parse().unwrap(), DrainSource::Admin, 1_700_000_000_000);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"upstream":"10.0.0.7:8080","since_ms":1700000000000,"source":"admin","moved":0,"failed":0,"last_move_ms":null,"tasks":0}"#
        );
        let v6 = Drain::new("[0:0:0:0:0:0:0:1]:80".parse().unwrap(), DrainSource::Dns, 1);
        assert_eq!(v6.upstream, "[::1]:80", "canonical form");
        for s in [DrainSource::Admin, DrainSource::Dns, DrainSource::Endpointslice, DrainSource::Other] {
            assert_eq!(DrainSource::parse(s.as_str()), s);
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::Value::from(s.as_str()));
        }
        assert_eq!(DrainSource::parse("kubernetes"), DrainSource::Other);
        assert_eq!(serde_json::from_str::<DrainSource>(r#""kubernetes""#).unwrap(), DrainSource::Other);
        // Expiry: exactly `ttl` after since_ms.
        let ttl = Duration::from_secs(10);
        assert!(!drain_expired(d.since_ms, d.since_ms + 9_999, ttl));
        assert!(drain_expired(d.since_ms, d.since_ms + 10_000, ttl));
        assert!(!drain_expired(u64::MAX - 1, u64::MAX - 1, ttl), "no overflow");
    }
}
