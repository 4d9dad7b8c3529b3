//! The Redis store: one key per session, `<prefix><session id>`, whose value is the
//! record JSON and whose TTL is the idle TTL (set again by every `put` and `patch`).
//!
//! Writes are read–modify–write with an atomic compare-and-swap in Redis: control reads
//! the value, decides in Rust (generation condition, kept `created_at_ms`, patch), then a
//! Lua script replaces the value only if it is still byte-for-byte the one read (or still
//! absent). A lost race re-reads and decides again, so a conditional `put` has exactly one
//! winner among concurrent writers, across any number of control instances.
//!
//! The connection is a [`ConnectionManager`]: multiplexed, reconnecting after I/O errors.
//! Every operation is bounded by a timeout; when Redis is unreachable operations fail
//! with [`StoreError::Unavailable`] and the next operation after Redis returns
//! reconnects. A failed operation wrote nothing (the script is the only write).
//!
//! Recovery leases live in their own key, `<prefix><session id> lease` (a space can never
//! occur in a session id, so a lease key never names a record): taken with
//! `SET key owner NX PX ttl`, released by a script that deletes the key only while it
//! still holds the caller's owner token.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{PutOutcome, SessionStore, StoreError, StoreStats};
use crate::clock::{Clock, SystemClock};
use crate::record::{PatchSession, PutCondition, PutSession, SessionRecord};
use crate::session_id::SessionId;

/// Attempts of one read–modify–write before giving up with [`StoreError::Busy`].
const MAX_CAS_ATTEMPTS: usize = 32;

/// `KEYS[1]` = key; `ARGV` = mode (`absent` | `equal`), expected value, new value, TTL ms.
/// Returns 1 when written, 0 when the value changed since it was read.
const CAS_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == 'absent' then
  if cur then return 0 end
elseif cur ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"#;

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
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` with the `tls` feature).
    pub url: String,
    /// Prepended to the session id to form the key, e.g. `mcp-affinity:session:`.
    pub key_prefix: String,
    /// Idle TTL of a record.
    pub ttl: Duration,
    /// Upper bound of one store operation, connection set-up included.
    pub timeout: Duration,
}

/// [`SessionStore`] backed by Redis (any server speaking the Redis protocol: Redis,
/// Valkey, managed offerings).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    key_prefix: String,
    ttl_ms: u64,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    cas: Script,
    release: Script,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Creates the store without connecting: the first operation connects, so control
    /// starts (and reports not-ready) while Redis is down.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL is invalid.
    pub fn new(config: &RedisStoreConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(unavailable)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(unavailable)?;
        Ok(RedisStore {
            conn,
            key_prefix: config.key_prefix.clone(),
            ttl_ms: config.ttl.as_millis().max(1) as u64,
            timeout: config.timeout,
            clock: Arc::new(SystemClock),
            cas: Script::new(CAS_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
        })
    }

    fn key(&self, id: &SessionId) -> String {
        format!("{}{}", self.key_prefix, id.as_str())
    }

    /// Key of the recovery lease of `id`: `<prefix><id> lease`.
    pub fn lease_key(&self, id: &SessionId) -> String {
        format!("{}{} lease", self.key_prefix, id.as_str())
    }

    /// Runs `op` within the operation timeout.
    async fn bounded<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn read(&self, key: &str) -> Result<Option<(String, SessionRecord)>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(key).await.map_err(unavailable)?;
        raw.map(|raw| {
            let record = serde_json::from_str(&raw).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
            Ok((raw, record))
        })
        .transpose()
    }

    /// Reads the record at `key`, asks `decide` for the new record (`None` = write
    /// nothing) and swaps it in if the value did not change meanwhile; otherwise retries.
    /// Returns the record as read and the record written.
    async fn read_modify_write(
        &self,
        key: &str,
        decide: impl Fn(Option<&SessionRecord>) -> Option<SessionRecord>,
    ) -> Result<(Option<SessionRecord>, Option<SessionRecord>), StoreError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.read(key).await?;
            let Some(next) = decide(current.as_ref().map(|(_, r)| r)) else {
                return Ok((current.map(|(_, r)| r), None));
            };
            let json = serde_json::to_string(&next).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (mode, expected) = match &current {
                Some((raw, _)) => ("equal", raw.as_str()),
                None => ("absent", ""),
            };
            let mut conn = self.conn.clone();
            let written: i64 = self
                .cas
                .key(key)
                .arg(mode)
                .arg(expected)
                .arg(&json)
                .arg(self.ttl_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if written == 1 {
                return Ok((current.map(|(_, r)| r), Some(next)));
            }
        }
        Err(StoreError::Busy(format!("{key} kept changing during {MAX_CAS_ATTEMPTS} attempts")))
    }
}

impl SessionStore for RedisStore {
    async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let key = self.key(id);
        self.bounded(async { Ok(self.read(&key).await?.map(|(_, r)| r)) }).await
    }

    async fn put(&self, id: &SessionId, body: &PutSession, condition: PutCondition) -> Result<PutOutcome, StoreError> {
        let key = self.key(id);
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
        let key = self.key(id);
        let now = self.clock.unix_ms();
        let decide = |current: Option<&SessionRecord>| current.map(|r| patch.apply(r, now));
        let (_, written) = self.bounded(self.read_modify_write(&key, decide)).await?;
        Ok(written)
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let key = self.key(id);
        self.bounded(async {
            let mut conn = self.conn.clone();
            let removed: i64 = conn.del(&key).await.map_err(unavailable)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn try_acquire_lease(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.lease_key(id);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        self.bounded(async {
            let mut conn = self.conn.clone();
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(owner)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(set.is_some())
        })
        .await
    }

    async fn release_lease(&self, id: &SessionId, owner: &str) -> Result<(), StoreError> {
        let key = self.lease_key(id);
        self.bounded(async {
            let mut conn = self.conn.clone();
            let _: i64 = self.release.key(&key).arg(owner).invoke_async(&mut conn).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let mut conn = self.conn.clone();
            let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}
