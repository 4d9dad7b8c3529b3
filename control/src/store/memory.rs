//! The embedded store: records in process memory, lost when the process exits.
//!
//! - **Idle TTL**: a record expires `ttl` after its last `put`/`patch`. Expired records are
//!   invisible at once and reclaimed on the next operation (an ordered index by last
//!   touch makes each sweep cost only the expired entries).
//! - **Bound**: at most `max_sessions` records. Creating one more evicts the
//!   least-recently-seen record (the same index), counted in [`StoreStats::evictions`].
//!   Eviction rather than refusal keeps new sessions working under load; an evicted
//!   session was the idlest one, and the filter still holds its own pin.
//! - **Recovery leases**: a separate small map `id → (owner, expiry)`; expired leases are
//!   dropped whenever a lease is taken.
//! - **Drains**: a map `upstream → Drain` ordered by upstream; drains past the drain TTL
//!   (measured from `since_ms` on the store's wall clock) are dropped by every drain
//!   operation.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DEFAULT_DRAIN_TTL, Drain, TaskRecord, drain_expired, DrainSource, PutOutcome, SessionStore, StoreError, StoreStats};
use crate::clock::{Clock, SystemClock};
use crate::record::{PatchSession, PutCondition, PutSession, SessionRecord};
use crate::session_id::SessionId;

/// Position of a record in the last-touch order: (touch instant, tie-breaking sequence).
type TouchKey = (Instant, u64);

struct Entry {
    record: SessionRecord,
    touched: TouchKey,
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, Entry>,
    by_touch: BTreeMap<TouchKey, String>,
    seq: u64,
}

impl Inner {
    /// Drops every record last touched at or before `cutoff`.
    fn sweep(&mut self, cutoff: Instant) {
        while let Some(entry) = self.by_touch.first_entry() {
            if entry.key().0 > cutoff {
                break;
            }
            let id = entry.remove();
            self.records.remove(&id);
        }
    }

    /// Stores `record` as touched at `now`, replacing any previous entry of its id.
    fn insert(&mut self, record: SessionRecord, now: Instant) {
        self.seq += 1;
        let touched = (now, self.seq);
        let id = record.session_id.clone();
        self.by_touch.insert(touched, id.clone());
        if let Some(old) = self.records.insert(id, Entry { record, touched }) {
            self.by_touch.remove(&old.touched);
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.records.remove(id) {
            Some(old) => {
                self.by_touch.remove(&old.touched);
                true
            }
            None => false,
        }
    }

    /// Removes the least-recently-touched record.
    fn evict_one(&mut self) -> bool {
        match self.by_touch.pop_first() {
            Some((_, id)) => {
                self.records.remove(&id);
                true
            }
            None => false,
        }
    }
}

/// In-memory [`SessionStore`] with idle TTL and least-recently-seen eviction.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_sessions: usize,
    clock: Arc<dyn Clock>,
    evictions: AtomicU64,
    leases: Mutex<HashMap<String, (String, Instant)>>,
    drains: Mutex<BTreeMap<String, Drain>>,
    drain_ttl: Duration,
    /// Task pins by task id, at most `max_sessions` of them.
    tasks: Mutex<HashMap<String, TaskRecord>>,
}

impl MemoryStore {
    /// A store whose records expire `ttl` after their last write or touch and that holds
    /// at most `max_sessions` records (values below 1 are treated as 1).
    pub fn new(ttl: Duration, max_sessions: usize) -> Self {
        Self::with_clock(ttl, max_sessions, Arc::new(SystemClock))
    }

    /// Like [`MemoryStore::new`] with an injected clock (tests).
    pub fn with_clock(ttl: Duration, max_sessions: usize, clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            ttl,
            max_sessions: max_sessions.max(1),
            clock,
            evictions: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            drains: Mutex::new(BTreeMap::new()),
            drain_ttl: DEFAULT_DRAIN_TTL,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the drain TTL: a drain expires `ttl` after its `since_ms` (default
    /// [`DEFAULT_DRAIN_TTL`]).
    #[must_use]
    pub fn with_drain_ttl(mut self, ttl: Duration) -> Self {
        self.drain_ttl = ttl;
        self
    }

    /// Locks the drains after dropping expired ones; returns the guard and now (Unix ms).
    fn lock_drains(&self) -> (std::sync::MutexGuard<'_, BTreeMap<String, Drain>>, u64) {
        let now_ms = self.clock.unix_ms();
        let mut drains = self.drains.lock().unwrap_or_else(|p| p.into_inner());
        drains.retain(|_, d| !drain_expired(d.since_ms, now_ms, self.drain_ttl));
        (drains, now_ms)
    }

    fn drain_now(&self, upstream: SocketAddr, source: DrainSource) -> Drain {
        let (mut drains, now_ms) = self.lock_drains();
        drains.entry(upstream.to_string()).or_insert_with(|| Drain::new(upstream, source, now_ms)).clone()
    }

    fn undrain_now(&self, upstream: SocketAddr) -> bool {
        let (mut drains, _) = self.lock_drains();
        drains.remove(&upstream.to_string()).is_some()
    }

    fn draining_now(&self) -> Vec<Drain> {
        let (drains, _) = self.lock_drains();
        drains.values().cloned().collect()
    }

    fn record_drain_move_now(&self, upstream: SocketAddr, moved: bool) -> Option<Drain> {
        let (mut drains, now_ms) = self.lock_drains();
        let drain = drains.get_mut(&upstream.to_string())?;
        if moved {
            drain.moved += 1;
            drain.last_move_ms = Some(drain.last_move_ms.map_or(now_ms, |last| last.max(now_ms)));
        } else {
            drain.failed += 1;
        }
        Some(drain.clone())
    }

    /// Locks the map after dropping expired records; returns the guard and `now`.
    fn lock_swept(&self) -> (std::sync::MutexGuard<'_, Inner>, Instant) {
        let now = self.clock.now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cutoff) = now.checked_sub(self.ttl) {
            inner.sweep(cutoff);
        }
        (inner, now)
    }

    fn get_now(&self, id: &SessionId) -> Option<SessionRecord> {
        let (inner, _) = self.lock_swept();
        inner.records.get(id.as_str()).map(|e| e.record.clone())
    }

    fn put_now(&self, id: &SessionId, body: &PutSession, condition: PutCondition) -> PutOutcome {
        let (mut inner, now) = self.lock_swept();
        let current = inner.records.get(id.as_str()).map(|e| &e.record);
        if !condition.holds(current) {
            return PutOutcome::Conflict(current.cloned());
        }
        let record = body.to_record(id, self.clock.unix_ms(), current);
        let existed = current.is_some();
        if !existed && inner.records.len() >= self.max_sessions && inner.evict_one() {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        inner.insert(record.clone(), now);
        if existed { PutOutcome::Replaced(record) } else { PutOutcome::Created(record) }
    }

    fn patch_now(&self, id: &SessionId, patch: &PatchSession) -> Option<SessionRecord> {
        let (mut inner, now) = self.lock_swept();
        let current = inner.records.get(id.as_str())?;
        let record = patch.apply(&current.record, self.clock.unix_ms());
        inner.insert(record.clone(), now);
        Some(record)
    }

    fn delete_now(&self, id: &SessionId) -> bool {
        let (mut inner, _) = self.lock_swept();
        inner.remove(id.as_str())
    }

    fn acquire_now(&self, id: &SessionId, owner: &str, ttl: Duration) -> bool {
        let now = self.clock.now();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.retain(|_, (_, expires)| *expires > now);
        if leases.contains_key(id.as_str()) {
            return false;
        }
        leases.insert(id.as_str().to_string(), (owner.to_string(), now + ttl));
        true
    }

    fn release_now(&self, id: &SessionId, owner: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases.get(id.as_str()).is_some_and(|(o, _)| o == owner) {
            leases.remove(id.as_str());
        }
    }
}

impl SessionStore for MemoryStore {
    async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.get_now(id))
    }

    async fn put(&self, id: &SessionId, body: &PutSession, condition: PutCondition) -> Result<PutOutcome, StoreError> {
        Ok(self.put_now(id, body, condition))
    }

    async fn patch(&self, id: &SessionId, patch: &PatchSession) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.patch_now(id, patch))
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        Ok(self.delete_now(id))
    }

    async fn try_acquire_lease(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.acquire_now(id, owner, ttl))
    }

    async fn release_lease(&self, id: &SessionId, owner: &str) -> Result<(), StoreError> {
        self.release_now(id, owner);
        Ok(())
    }

    async fn drain(&self, upstream: SocketAddr, source: DrainSource) -> Result<Drain, StoreError> {
        Ok(self.drain_now(upstream, source))
    }

    async fn undrain(&self, upstream: SocketAddr) -> Result<bool, StoreError> {
        Ok(self.undrain_now(upstream))
    }

    async fn draining(&self) -> Result<Vec<Drain>, StoreError> {
        Ok(self.draining_now())
    }

    async fn record_drain_move(&self, upstream: SocketAddr, moved: bool) -> Result<Option<Drain>, StoreError> {
        Ok(self.record_drain_move_now(upstream, moved))
    }

    async fn put_task(&self, task_id: &str, upstream: &str, ttl: Duration, terminal: bool) -> Result<TaskRecord, StoreError> {
        let now_ms = self.clock.unix_ms();
        let mut tasks = self.tasks.lock().unwrap();
        if terminal
            && let Some(pin) = tasks.get_mut(task_id).filter(|t| t.expires_at_ms > now_ms && t.upstream == upstream)
        {
            pin.terminal = true;
            return Ok(pin.clone());
        }
        let record = TaskRecord {
            task_id: task_id.to_string(),
            upstream: upstream.to_string(),
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            terminal,
        };
        if tasks.len() >= self.max_sessions && !tasks.contains_key(task_id) {
            // Full: drop the expired pins, else the one that expires first.
            tasks.retain(|_, t| t.expires_at_ms > now_ms);
            if tasks.len() >= self.max_sessions
                && let Some(first) = tasks.values().min_by_key(|t| t.expires_at_ms).map(|t| t.task_id.clone())
            {
                tasks.remove(&first);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        tasks.insert(task_id.to_string(), record.clone());
        Ok(record)
    }

    /// One pass over the task pins (asked once per drain per poll).
    async fn unfinished_tasks(&self, upstream: &str) -> Result<u64, StoreError> {
        let now_ms = self.clock.unix_ms();
        let tasks = self.tasks.lock().unwrap();
        Ok(tasks.values().filter(|t| !t.terminal && t.expires_at_ms > now_ms && t.upstream == upstream).count() as u64)
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let now_ms = self.clock.unix_ms();
        Ok(self.tasks.lock().unwrap().get(task_id).filter(|t| t.expires_at_ms > now_ms).cloned())
    }

    async fn delete_task(&self, task_id: &str) -> Result<bool, StoreError> {
        Ok(self.tasks.lock().unwrap().remove(task_id).is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        let (inner, _) = self.lock_swept();
        StoreStats {
            records: Some(inner.records.len() as u64),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// One pass over the live records under the store's lock: O(records), a few
    /// milliseconds at 100 000 (the status page asks once per view).
    fn sessions_by_upstream(&self) -> Option<BTreeMap<String, u64>> {
        let (inner, _) = self.lock_swept();
        let mut counts = BTreeMap::new();
        for entry in inner.records.values() {
            *counts.entry(entry.record.upstream.clone()).or_insert(0) += 1;
        }
        Some(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn body(upstream: &str) -> PutSession {
        PutSession {
            backend_session_id: None,
            upstream: upstream.into(),
            generation: None,
            initialize: "{}".into(),
            initialized: None,
            protocol_version: None,
        }
    }

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    fn store(ttl_secs: u64, max: usize) -> (MemoryStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        (MemoryStore::with_clock(Duration::from_secs(ttl_secs), max, clock.clone()), clock)
    }

    #[test]
    fn idle_ttl_expires_and_touch_extends() {
        let (s, clock) = store(10, 100);
        s.put_now(&id("a"), &body("h:1"), PutCondition::Always);
        s.put_now(&id("b"), &body("h:1"), PutCondition::Always);
        clock.advance(Duration::from_secs(6));
        assert!(s.patch_now(&id("a"), &PatchSession::default()).is_some());
        clock.advance(Duration::from_secs(5));
        // b: 11 s idle → gone; a: touched 5 s ago → alive.
        assert!(s.get_now(&id("b")).is_none());
        assert!(s.get_now(&id("a")).is_some());
        assert_eq!(s.stats().records, Some(1), "expired record reclaimed");
        // A get does not touch.
        clock.advance(Duration::from_secs(5));
        assert!(s.get_now(&id("a")).is_none());
        assert_eq!(s.stats().records, Some(0));
        // Expired behaves as absent for conditions and patch.
        assert!(s.patch_now(&id("a"), &PatchSession::default()).is_none());
        assert!(matches!(s.put_now(&id("a"), &body("h:2"), PutCondition::IfGeneration(0)), PutOutcome::Created(_)));
    }

    #[test]
    fn evicts_least_recently_seen_when_full() {
        let (s, clock) = store(100, 2);
        s.put_now(&id("a"), &body("h:1"), PutCondition::Always);
        clock.advance(Duration::from_millis(1));
        s.put_now(&id("b"), &body("h:1"), PutCondition::Always);
        clock.advance(Duration::from_millis(1));
        s.patch_now(&id("a"), &PatchSession::default()); // b is now the idlest
        clock.advance(Duration::from_millis(1));
        // Replacing an existing record never evicts.
        assert!(matches!(s.put_now(&id("a"), &body("h:2"), PutCondition::Always), PutOutcome::Replaced(_)));
        assert_eq!(s.stats().evictions, 0);
        s.put_now(&id("c"), &body("h:1"), PutCondition::Always);
        assert!(s.get_now(&id("b")).is_none());
        assert!(s.get_now(&id("a")).is_some() && s.get_now(&id("c")).is_some());
        assert_eq!(s.stats(), StoreStats { records: Some(2), evictions: 1 });
    }

    #[test]
    fn lease_has_one_holder_and_expires() {
        let (s, clock) = store(100, 10);
        let ttl = Duration::from_secs(10);
        assert!(s.acquire_now(&id("a"), "x", ttl));
        assert!(!s.acquire_now(&id("a"), "y", ttl));
        assert!(s.acquire_now(&id("b"), "y", ttl), "leases are per session");
        // Only the holder releases.
        s.release_now(&id("a"), "y");
        assert!(!s.acquire_now(&id("a"), "y", ttl));
        s.release_now(&id("a"), "x");
        assert!(s.acquire_now(&id("a"), "y", ttl));
        // An expired lease is free again; the late release of the old holder is a no-op.
        clock.advance(Duration::from_secs(11));
        assert!(s.acquire_now(&id("a"), "z", ttl));
        s.release_now(&id("a"), "y");
        assert!(!s.acquire_now(&id("a"), "x", ttl));
        assert_eq!(s.leases.lock().unwrap().len(), 1, "expired leases are dropped");
    }

    #[test]
    fn drains_are_idempotent_counted_and_expire() {
        let (s, clock) = store(100, 10);
        let s = s.with_drain_ttl(Duration::from_secs(60));
        let a: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let b: SocketAddr = "[::1]:8080".parse().unwrap();
        let first = s.drain_now(a, DrainSource::Dns);
        assert_eq!(first, Drain::new(a, DrainSource::Dns, 1_700_000_000_000));
        clock.advance(Duration::from_secs(1));
        assert_eq!(s.drain_now(a, DrainSource::Admin), first, "an existing drain is kept as it is");
        assert_eq!(s.record_drain_move_now(b, true), None, "not draining: no-op");
        s.drain_now(b, DrainSource::Admin);
        let moved = s.record_drain_move_now(a, true).unwrap();
        assert_eq!((moved.moved, moved.failed, moved.last_move_ms), (1, 0, Some(1_700_000_001_000)));
        let failed = s.record_drain_move_now(a, false).unwrap();
        assert_eq!((failed.moved, failed.failed, failed.last_move_ms), (1, 1, Some(1_700_000_001_000)));
        let listed: Vec<String> = s.draining_now().into_iter().map(|d| d.upstream).collect();
        assert_eq!(listed, ["10.0.0.2:80", "[::1]:8080"], "sorted by upstream text");
        assert!(s.undrain_now(b));
        assert!(!s.undrain_now(b));
        // 60 s after since_ms the drain is over, whatever happened meanwhile.
        clock.advance(Duration::from_millis(58_999));
        assert_eq!(s.draining_now().len(), 1);
        clock.advance(Duration::from_millis(1));
        assert!(s.draining_now().is_empty());
        assert!(!s.undrain_now(a), "expired = not draining");
        assert_eq!(s.record_drain_move_now(a, true), None);
        // Draining again starts a new drain.
        let again = s.drain_now(a, DrainSource::Admin);
        assert_eq!(again, Drain::new(a, DrainSource::Admin, 1_700_000_060_000));
    }

    #[test]
    fn timestamps_come_from_the_clock() {
        let (s, clock) = store(100, 10);
        let PutOutcome::Created(r) = s.put_now(&id("a"), &body("h:1"), PutCondition::Always) else { panic!() };
        assert_eq!((r.created_at_ms, r.last_seen_ms), (1_700_000_000_000, 1_700_000_000_000));
        clock.advance(Duration::from_millis(250));
        let r = s.patch_now(&id("a"), &PatchSession::default()).unwrap();
        assert_eq!((r.created_at_ms, r.last_seen_ms), (1_700_000_000_000, 1_700_000_000_250));
    }
}
