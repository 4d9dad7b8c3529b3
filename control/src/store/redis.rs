//! The Redis store, on one node, a Sentinel-monitored master or a Redis Cluster
//! ([`RedisTopology`], parsed from the `--store` URL): [`RedisStore`], its settings and
//! its [`SessionStore`] implementation. Every command and script touches exactly one
//! key, so the store works on the three topologies alike.
//!
//! - `keys`: the keys of a session (record and lease, one hash tag) and of the drains;
//! - `cas`: record writes, read–modify–write with a compare-and-swap script;
//! - `commands`: running one operation — its timeout, scripts, `WAIT` for replicas;
//! - `drains`: the drains hash and its scripts;
//! - `tasks`: task pins and each upstream's index of unfinished tasks;
//! - `connection`: the connections of the three topologies; [`topology`]: the URL.
//!
//! Recovery leases are taken with `SET <lease key> owner NX PX ttl` and released by a
//! script that deletes the key only while it still holds the caller's owner token.

mod cas;
mod commands;
mod connection;
mod drains;
mod keys;
mod tasks;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use self::connection::Backend;
pub use self::keys::{check_key_prefix, drains_key, lease_key, record_key, task_key, tasks_on_key};
pub use self::topology::RedisTopology;
use super::{DEFAULT_DRAIN_TTL, Drain, DrainSource, PutOutcome, SessionStore, StoreError, StoreStats, TaskRecord};
use crate::clock::{Clock, SystemClock};
use crate::record::{PatchSession, PutCondition, PutSession, SessionRecord};
use crate::session_id::SessionId;

/// `KEYS[1]` = lease key, `ARGV[1]` = owner. Deletes the lease only if `owner` holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Settings of a [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` with the `tls` feature),
    /// `redis+sentinel://…` or `redis+cluster://…`: see [`topology`].
    pub url: String,
    /// Start of every key, e.g. `mcp-affinity:` (no `{` or `}`).
    pub key_prefix: String,
    /// Idle TTL of a record.
    pub ttl: Duration,
    /// Upper bound of one store operation, connection set-up (and `WAIT`) included.
    pub timeout: Duration,
}

/// Replication safety of record writes: after each one, `WAIT replicas timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationWait {
    /// Replicas that must acknowledge a record write before it is acknowledged (≥ 1).
    pub replicas: u32,
    /// How long Redis waits for them; below the store timeout.
    pub timeout: Duration,
}

/// [`SessionStore`] backed by Redis (any server speaking the Redis protocol: Redis,
/// Valkey, managed offerings), on one node, behind Sentinel or as a Cluster.
#[derive(Clone)]
pub struct RedisStore {
    backend: Arc<Backend>,
    key_prefix: String,
    ttl_ms: u64,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    wait: Option<ReplicationWait>,
    drain_ttl: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Creates the store without connecting: the first operation connects, so control
    /// starts (and reports not-ready) while Redis is down.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL or the key prefix is invalid.
    pub fn new(config: &RedisStoreConfig) -> Result<Self, StoreError> {
        let topology = RedisTopology::parse(&config.url).map_err(StoreError::Unavailable)?;
        check_key_prefix(&config.key_prefix).map_err(StoreError::Unavailable)?;
        let backend = Backend::new(&topology, config.timeout).map_err(unavailable)?;
        Ok(RedisStore {
            backend: Arc::new(backend),
            key_prefix: config.key_prefix.clone(),
            ttl_ms: config.ttl.as_millis().max(1) as u64,
            timeout: config.timeout,
            clock: Arc::new(SystemClock),
            wait: None,
            drain_ttl: DEFAULT_DRAIN_TTL,
        })
    }

    /// Sets the drain TTL: a drain expires `ttl` after its `since_ms` (default
    /// [`DEFAULT_DRAIN_TTL`]).
    #[must_use]
    pub fn with_drain_ttl(mut self, ttl: Duration) -> Self {
        self.drain_ttl = ttl;
        self
    }

    /// Replaces the clock the store takes timestamps from (`created_at_ms`,
    /// `last_seen_ms`, drain times) and decides drain expiry with (tests). Record and
    /// lease expiry stay Redis key TTLs, on Redis's own clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Key of the drains hash: `<prefix>drains`.
    pub fn drains_key(&self) -> String {
        drains_key(&self.key_prefix)
    }

    fn drain_ttl_ms(&self) -> u64 {
        u64::try_from(self.drain_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes every record write wait for `wait.replicas` replicas (`None`: do not wait).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when `wait.replicas` is 0 or `wait.timeout` is not
    /// below the store timeout (the operation would time out before `WAIT` answers).
    pub fn with_replication_wait(mut self, wait: Option<ReplicationWait>) -> Result<Self, StoreError> {
        if let Some(w) = wait {
            if w.replicas == 0 {
                return Err(StoreError::Unavailable("WAIT needs at least one replica".into()));
            }
            if w.timeout.is_zero() || w.timeout >= self.timeout {
                return Err(StoreError::Unavailable(format!(
                    "the replication wait ({:?}) must be above zero and below the Redis timeout ({:?})",
                    w.timeout, self.timeout
                )));
            }
        }
        self.wait = wait;
        Ok(self)
    }

    /// Key of the record of `id`: `<prefix>{<id>}:record`.
    pub fn record_key(&self, id: &SessionId) -> String {
        record_key(&self.key_prefix, id)
    }

    /// Key of the recovery lease of `id`: `<prefix>{<id>}:lease`.
    pub fn lease_key(&self, id: &SessionId) -> String {
        lease_key(&self.key_prefix, id)
    }
}

impl SessionStore for RedisStore {
    async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let key = self.record_key(id);
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            Ok(self.read(&mut checkout, &key).await?.map(|(_, r)| r))
        })
        .await
    }

    async fn put(&self, id: &SessionId, body: &PutSession, condition: PutCondition) -> Result<PutOutcome, StoreError> {
        let key = self.record_key(id);
        let now = self.clock.unix_ms();
        let decide = |current: Option<&SessionRecord>| {
            condition.holds(current).then(|| body.to_record(id, now, current))
        };
        let (current, written) = self.bounded(self.read_modify_write(&key, decide)).await?;
        Ok(match (current, written) {
            (current, None) => PutOutcome::Conflict(current),
            (None, Some(r)) => PutOutcome::Created(r),
            (Some(_), Some(r)) => PutOutcome::Replaced(r),
        })
    }

    async fn patch(&self, id: &SessionId, patch: &PatchSession) -> Result<Option<SessionRecord>, StoreError> {
        let key = self.record_key(id);
        let now = self.clock.unix_ms();
        let decide = |current: Option<&SessionRecord>| current.map(|r| patch.apply(r, now));
        let (_, written) = self.bounded(self.read_modify_write(&key, decide)).await?;
        Ok(written)
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let key = self.record_key(id);
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            self.delete_key(&mut checkout, &key).await
        })
        .await
    }

    async fn try_acquire_lease(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.lease_key(id);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let set: Option<String> =
                self.query(&mut checkout, redis::cmd("SET").arg(&key).arg(owner).arg("NX").arg("PX").arg(ttl_ms)).await?;
            Ok(set.is_some())
        })
        .await
    }

    async fn release_lease(&self, id: &SessionId, owner: &str) -> Result<(), StoreError> {
        let key = self.lease_key(id);
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let _: i64 = self.eval(&mut checkout, RELEASE_SCRIPT, &key, &[owner]).await?;
            Ok(())
        })
        .await
    }

    async fn drain(&self, upstream: SocketAddr, source: DrainSource) -> Result<Drain, StoreError> {
        self.drain_upstream(upstream, source).await
    }

    async fn undrain(&self, upstream: SocketAddr) -> Result<bool, StoreError> {
        self.undrain_upstream(upstream).await
    }

    /// One `HGETALL`, expired drains deleted on the way (see `redis/drains.rs`).
    async fn draining(&self) -> Result<Vec<Drain>, StoreError> {
        self.list_drains().await
    }

    async fn record_drain_move(&self, upstream: SocketAddr, moved: bool) -> Result<Option<Drain>, StoreError> {
        self.count_drain_move(upstream, moved).await
    }

    /// See `redis/tasks.rs`.
    async fn put_task(&self, task_id: &str, upstream: &str, ttl: Duration, terminal: bool) -> Result<TaskRecord, StoreError> {
        self.write_task(task_id, upstream, ttl, terminal).await
    }

    /// `ZCOUNT` of the upstream's unfinished-task index (see `redis/tasks.rs`).
    async fn unfinished_tasks(&self, upstream: &str) -> Result<u64, StoreError> {
        self.count_unfinished_tasks(upstream).await
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.get_task_record(task_id).await
    }

    async fn delete_task(&self, task_id: &str) -> Result<bool, StoreError> {
        self.remove_task(task_id).await
    }

    /// `PING`; in a cluster every primary must answer (every slot is served).
    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let _: String = self.query(&mut checkout, &redis::cmd("PING")).await?;
            Ok(())
        })
        .await
    }

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }


    #[test]
    fn prefix_rules() {
        assert!(check_key_prefix("mcp-affinity:").is_ok());
        assert!(check_key_prefix("").is_ok());
        assert!(check_key_prefix("a{b}:").is_err());
        assert!(check_key_prefix("a}").is_err());
        let err = RedisStore::new(&RedisStoreConfig {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "x{".into(),
            ttl: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("may not contain"), "{err}");
    }

    #[tokio::test]
    async fn replication_wait_rules() {
        let store = || {
            RedisStore::new(&RedisStoreConfig {
                url: "redis+sentinel://127.0.0.1:1/m".into(),
                key_prefix: "p:".into(),
                ttl: Duration::from_secs(1),
                timeout: Duration::from_millis(1000),
            })
            .unwrap()
        };
        let wait = |replicas, ms| Some(ReplicationWait { replicas, timeout: Duration::from_millis(ms) });
        assert!(store().with_replication_wait(wait(1, 500)).is_ok());
        assert!(store().with_replication_wait(None).is_ok());
        assert!(store().with_replication_wait(wait(0, 500)).is_err());
        assert!(store().with_replication_wait(wait(1, 1000)).is_err());
        assert!(store().with_replication_wait(wait(1, 0)).is_err());
    }

    #[tokio::test]
    async fn unreachable_topologies_fail_fast_and_cleanly() {
        // Nothing listens on port 1: every topology answers Unavailable within the timeout.
        for url in ["redis://127.0.0.1:1", "redis+sentinel://127.0.0.1:1/m", "redis+cluster://127.0.0.1:1"] {
            let store = RedisStore::new(&RedisStoreConfig {
                url: url.into(),
                key_prefix: "p:".into(),
                ttl: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
            })
            .unwrap();
            let start = std::time::Instant::now();
            let err = store.get(&id("s")).await.unwrap_err();
            assert!(matches!(err, StoreError::Unavailable(_)), "{url}: {err}");
            assert!(store.ping().await.is_err(), "{url}");
            assert!(start.elapsed() < Duration::from_secs(3), "{url}: {:?}", start.elapsed());
        }
    }
}
