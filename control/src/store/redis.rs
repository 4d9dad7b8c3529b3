//! The Redis store, on one node, a Sentinel-monitored master or a Redis Cluster
//! ([`RedisTopology`], parsed from the `--store` URL).
//!
//! **Keys.** Each session has two keys that share a Redis Cluster hash tag, so they always
//! live in the same slot: `<prefix>{<id>}:record` (the record JSON, with the idle TTL set
//! again by every `put` and `patch`) and `<prefix>{<id>}:lease` (the recovery lease). In
//! the tag, `%`, `{` and `}` of the session id are percent-encoded (`%25`, `%7B`, `%7D`),
//! so the braces added around it are always the key's hash tag and distinct ids give
//! distinct keys. The prefix may not contain braces (it would move the tag). Every
//! command and script touches exactly one key.
//!
//! **Writes** are read–modify–write with an atomic compare-and-swap in Redis: control
//! reads the value, decides in Rust (generation condition, kept `created_at_ms`, patch),
//! then a Lua script replaces the value only if it is still byte-for-byte the one read (or
//! still absent). A lost race re-reads and decides again, so a conditional `put` has
//! exactly one winner among concurrent writers, across any number of control instances.
//!
//! **Replication** ([`ReplicationWait`], `--redis-wait-replicas`): a record write (`put`,
//! `patch`, `delete`) is sent as one pipeline `<write>; WAIT <replicas> <timeout>`, so the
//! `WAIT` runs on the connection and node that executed the write (in a cluster, a
//! `MOVED` redirects the whole pipeline; routing `WAIT` on its own could reach another
//! node and count its replicas). When fewer replicas acknowledge in time the operation
//! fails with [`StoreError::Unavailable`] although the primary holds the write — the one
//! case where a failed operation may have written.
//!
//! **Connections** (`redis/connection.rs`): every operation, connecting included, is
//! bounded by the store timeout; when Redis is unreachable operations fail with
//! [`StoreError::Unavailable`] and the next operation after Redis returns reconnects (on
//! Sentinel: asks the sentinels for the current master). Apart from the `WAIT` case
//! above, a failed operation wrote nothing (the scripts and `DEL` are the only writes).
//!
//! Recovery leases are taken with `SET <lease key> owner NX PX ttl` and released by a
//! script that deletes the key only while it still holds the caller's owner token.
//!
//! **Drains** live in ONE hash, `<prefix>drains` ([`drains_key`]), with five fields per
//! upstream `U` (canonical `ip:port`): `since:U` (Unix ms, the store's clock), `source:U`,
//! `moved:U`, `failed:U` and `last:U` (Unix ms of the last successful move; absent before
//! it). Listing is one `HGETALL`; undraining one `HDEL` of the five fields (through a
//! script that also says whether the drain was live); draining, counting a move and
//! deleting an expired drain are short scripts on that one key, so each is atomic (an
//! existing drain is never overwritten, a counter never outlives its drain, a late
//! clean-up never deletes a newer drain). Expiry is decided from `since:U` and the time
//! control passes in (the store's clock), not by a Redis TTL; expired drains are deleted
//! when a listing finds them. Like every other command here each touches exactly one key,
//! so drains work on one node, Sentinel and Cluster alike. Drain writes do not `WAIT`
//! for replicas (a drain lost in a failover costs a pod's sessions their early move; they
//! are still recovered when the pod stops).

mod connection;
pub mod topology;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind};

use self::connection::{Backend, Checkout};
pub use self::topology::RedisTopology;
use super::{DEFAULT_DRAIN_TTL, Drain, DrainSource, PutOutcome, SessionStore, StoreError, StoreStats, drain_expired};
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

/// `KEYS[1]` = drains hash; `ARGV` = upstream, source, now ms, drain TTL ms. Creates the
/// drain unless a live one exists (an expired one is replaced); returns the drain's five
/// fields (`HMGET` order: since, source, moved, failed, last).
const DRAIN_SCRIPT: &str = r#"
local k, up = KEYS[1], ARGV[1]
local f = {'since:'..up, 'source:'..up, 'moved:'..up, 'failed:'..up, 'last:'..up}
local raw = redis.call('HGET', k, f[1])
local since = raw and tonumber(raw)
if not since or since + tonumber(ARGV[4]) <= tonumber(ARGV[3]) then
  redis.call('HDEL', k, unpack(f))
  redis.call('HSET', k, f[1], ARGV[3], f[2], ARGV[2], f[3], '0', f[4], '0')
end
return redis.call('HMGET', k, unpack(f))
"#;

/// `KEYS[1]` = drains hash; `ARGV` = upstream, `moved` | `failed`, now ms, drain TTL ms.
/// Counts a drain-move of a live drain (and sets `last` to the latest move time); returns
/// the five fields, or nil when the upstream is not draining (nothing written).
const DRAIN_MOVE_SCRIPT: &str = r#"
local k, up = KEYS[1], ARGV[1]
local f = {'since:'..up, 'source:'..up, 'moved:'..up, 'failed:'..up, 'last:'..up}
local raw = redis.call('HGET', k, f[1])
local since = raw and tonumber(raw)
if not since or since + tonumber(ARGV[4]) <= tonumber(ARGV[3]) then
  return false
end
redis.call('HINCRBY', k, ARGV[2]..':'..up, 1)
if ARGV[2] == 'moved' then
  local last = tonumber(redis.call('HGET', k, f[5]) or '0') or 0
  if tonumber(ARGV[3]) > last then
    redis.call('HSET', k, f[5], ARGV[3])
  end
end
return redis.call('HMGET', k, unpack(f))
"#;

/// `KEYS[1]` = drains hash; `ARGV` = upstream, now ms, drain TTL ms. Deletes the drain's
/// fields; returns 1 when it was live, else 0.
const UNDRAIN_SCRIPT: &str = r#"
local k, up = KEYS[1], ARGV[1]
local raw = redis.call('HGET', k, 'since:'..up)
local since = raw and tonumber(raw)
redis.call('HDEL', k, 'since:'..up, 'source:'..up, 'moved:'..up, 'failed:'..up, 'last:'..up)
if since and since + tonumber(ARGV[3]) > tonumber(ARGV[2]) then
  return 1
end
return 0
"#;

/// `KEYS[1]` = drains hash; `ARGV` = upstream, the `since` value seen ('' = absent).
/// Deletes the upstream's fields only while `since` is still that value, so clearing an
/// expired (or orphaned) drain never deletes a drain created meanwhile.
const DRAIN_CLEANUP_SCRIPT: &str = r#"
local k, up = KEYS[1], ARGV[1]
if (redis.call('HGET', k, 'since:'..up) or '') ~= ARGV[2] then
  return 0
end
return redis.call('HDEL', k, 'since:'..up, 'source:'..up, 'moved:'..up, 'failed:'..up, 'last:'..up)
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

/// `WAIT`'s timeout argument, in milliseconds (0 would mean "forever").
fn wait_ms(wait: ReplicationWait) -> u64 {
    wait.timeout.as_millis().max(1) as u64
}

/// The key of the record of `id`: `<prefix>{<id>}:record` (see the module documentation).
pub fn record_key(prefix: &str, id: &SessionId) -> String {
    format!("{prefix}{{{}}}:record", hash_tag(id.as_str()))
}

/// The key of the recovery lease of `id`: `<prefix>{<id>}:lease`, in the slot of the
/// record key.
pub fn lease_key(prefix: &str, id: &SessionId) -> String {
    format!("{prefix}{{{}}}:lease", hash_tag(id.as_str()))
}

/// The key of the drains hash: `<prefix>drains` (one key for every upstream; it never
/// collides with a session's keys, which always carry a `{…}` hash tag).
pub fn drains_key(prefix: &str) -> String {
    format!("{prefix}drains")
}

/// The fields of one upstream in the drains hash, as read.
#[derive(Default)]
struct DrainFields {
    since: Option<String>,
    source: Option<String>,
    moved: Option<String>,
    failed: Option<String>,
    last: Option<String>,
}

impl DrainFields {
    /// From the `HMGET` order of the scripts: since, source, moved, failed, last.
    fn from_hmget(values: Vec<Option<String>>) -> DrainFields {
        let mut it = values.into_iter();
        let mut next = || it.next().flatten();
        DrainFields { since: next(), source: next(), moved: next(), failed: next(), last: next() }
    }

    /// The drain of `upstream`, or why the fields are not one.
    fn to_drain(&self, upstream: &str) -> Result<Drain, String> {
        let number = |name: &str, v: &Option<String>| -> Result<u64, String> {
            v.as_deref().unwrap_or("0").parse::<u64>().map_err(|e| format!("{name}:{upstream}: {e}"))
        };
        let since = self.since.as_deref().ok_or_else(|| format!("since:{upstream} is missing"))?;
        Ok(Drain {
            upstream: upstream.to_string(),
            since_ms: since.parse().map_err(|e| format!("since:{upstream}: {e}"))?,
            source: DrainSource::parse(self.source.as_deref().unwrap_or("")),
            moved: number("moved", &self.moved)?,
            failed: number("failed", &self.failed)?,
            last_move_ms: self.last.as_ref().map(|_| number("last", &self.last)).transpose()?,
        })
    }
}

/// Groups the fields of `HGETALL <drains key>` by upstream (`<kind>:<upstream>`; unknown
/// kinds are ignored).
fn group_drain_fields(all: HashMap<String, String>) -> BTreeMap<String, DrainFields> {
    let mut out: BTreeMap<String, DrainFields> = BTreeMap::new();
    for (field, value) in all {
        let Some((kind, upstream)) = field.split_once(':') else { continue };
        let entry = out.entry(upstream.to_string()).or_default();
        let slot = match kind {
            "since" => &mut entry.since,
            "source" => &mut entry.source,
            "moved" => &mut entry.moved,
            "failed" => &mut entry.failed,
            "last" => &mut entry.last,
            _ => continue,
        };
        *slot = Some(value);
    }
    out
}

/// The session id as it appears between the braces: `%`, `{`, `}` percent-encoded.
fn hash_tag(id: &str) -> Cow<'_, str> {
    if !id.contains(['%', '{', '}']) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Checks a key prefix: braces would change which part of the key is its hash tag.
///
/// # Errors
/// A message when `prefix` contains `{` or `}`.
pub fn check_key_prefix(prefix: &str) -> Result<(), String> {
    if prefix.contains(['{', '}']) {
        return Err("the Redis key prefix may not contain `{` or `}` (control adds the hash tag itself)".into());
    }
    Ok(())
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

    /// Runs `op` within the operation timeout.
    async fn bounded<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever hung (a Sentinel master that stopped answering?) is not reused.
                self.backend.failed_all();
                Err(StoreError::Unavailable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    async fn checkout(&self) -> Result<Checkout, StoreError> {
        self.backend.connection().await.map_err(unavailable)
    }

    /// The result of a command on `checkout`; a failure retires the connection.
    fn settle<T>(&self, checkout: &Checkout, result: RedisResult<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.backend.failed(checkout, &e);
            unavailable(e)
        })
    }

    async fn query<T: FromRedisValue>(&self, checkout: &mut Checkout, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let result = cmd.query_async(&mut checkout.conn).await;
        self.settle(checkout, result)
    }

    /// Runs a script on `key`: `EVALSHA`, and `EVAL` (which also caches it) when this
    /// node does not know the script yet — routed by the key, so in a cluster it never
    /// needs the other primaries.
    async fn eval<T: FromRedisValue>(
        &self,
        checkout: &mut Checkout,
        source: &str,
        key: &str,
        args: &[&str],
    ) -> Result<T, StoreError> {
        let hash = Script::new(source).get_hash().to_string();
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(hash).arg(1).arg(key).arg(args);
        let result = match evalsha.query_async(&mut checkout.conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let mut eval = redis::cmd("EVAL");
                eval.arg(source).arg(1).arg(key).arg(args);
                eval.query_async(&mut checkout.conn).await
            }
            other => other,
        };
        self.settle(checkout, result)
    }

    /// Sends `write` and, when writes wait for replicas, `WAIT` in one pipeline (one
    /// connection, one node, in this order). Returns the write's reply and the number of
    /// replicas that acknowledged.
    async fn write_and_wait<T: FromRedisValue>(
        &self,
        checkout: &mut Checkout,
        write: &redis::Cmd,
    ) -> RedisResult<(T, Option<u64>)> {
        let mut pipe = redis::pipe();
        pipe.add_command(write.clone());
        match self.wait {
            None => {
                let (reply,): (T,) = pipe.query_async(&mut checkout.conn).await?;
                Ok((reply, None))
            }
            Some(wait) => {
                pipe.cmd("WAIT").arg(wait.replicas).arg(wait_ms(wait));
                let (reply, acked): (T, u64) = pipe.query_async(&mut checkout.conn).await?;
                Ok((reply, Some(acked)))
            }
        }
    }

    /// Runs the script `source` as a write on `key` (with `WAIT`, see
    /// [`Self::write_and_wait`]). Always `EVAL` with the script's text (Redis caches it by
    /// its hash): an `EVALSHA` unknown to the node — a freshly promoted replica — would
    /// cost a whole `WAIT` before the retry.
    async fn eval_write<T: FromRedisValue>(
        &self,
        checkout: &mut Checkout,
        source: &str,
        key: &str,
        args: &[&str],
    ) -> Result<(T, Option<u64>), StoreError> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(source).arg(1).arg(key).arg(args);
        let result = self.write_and_wait(checkout, &eval).await;
        self.settle(checkout, result)
    }

    /// Fails unless the configured number of replicas acknowledged a write that happened.
    fn check_replicated(&self, acked: Option<u64>) -> Result<(), StoreError> {
        match (self.wait, acked) {
            (Some(wait), Some(acked)) if acked < u64::from(wait.replicas) => Err(StoreError::Unavailable(format!(
                "written on the primary but acknowledged by {acked} of {} replicas within {} ms; \
                 the write may be lost in a failover",
                wait.replicas,
                wait_ms(wait)
            ))),
            _ => Ok(()),
        }
    }

    async fn read(&self, checkout: &mut Checkout, key: &str) -> Result<Option<(String, SessionRecord)>, StoreError> {
        let raw: Option<String> = self.query(checkout, redis::cmd("GET").arg(key)).await?;
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
        let mut checkout = self.checkout().await?;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.read(&mut checkout, key).await?;
            let Some(next) = decide(current.as_ref().map(|(_, r)| r)) else {
                return Ok((current.map(|(_, r)| r), None));
            };
            let json = serde_json::to_string(&next).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (mode, expected) = match &current {
                Some((raw, _)) => ("equal", raw.as_str()),
                None => ("absent", ""),
            };
            let ttl = self.ttl_ms.to_string();
            let (written, acked): (i64, _) =
                self.eval_write(&mut checkout, CAS_SCRIPT, key, &[mode, expected, &json, &ttl]).await?;
            if written == 1 {
                self.check_replicated(acked)?;
                return Ok((current.map(|(_, r)| r), Some(next)));
            }
        }
        Err(StoreError::Busy(format!("{key} kept changing during {MAX_CAS_ATTEMPTS} attempts")))
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
            let result = self.write_and_wait::<i64>(&mut checkout, redis::cmd("DEL").arg(&key)).await;
            let (removed, acked) = self.settle(&checkout, result)?;
            if removed > 0 {
                self.check_replicated(acked)?;
            }
            Ok(removed > 0)
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
        let key = self.drains_key();
        let up = upstream.to_string();
        let (now, ttl) = (self.clock.unix_ms().to_string(), self.drain_ttl_ms().to_string());
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let fields: Vec<Option<String>> =
                self.eval(&mut checkout, DRAIN_SCRIPT, &key, &[&up, source.as_str(), &now, &ttl]).await?;
            DrainFields::from_hmget(fields).to_drain(&up).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
        })
        .await
    }

    async fn undrain(&self, upstream: SocketAddr) -> Result<bool, StoreError> {
        let key = self.drains_key();
        let up = upstream.to_string();
        let (now, ttl) = (self.clock.unix_ms().to_string(), self.drain_ttl_ms().to_string());
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let live: i64 = self.eval(&mut checkout, UNDRAIN_SCRIPT, &key, &[&up, &now, &ttl]).await?;
            Ok(live == 1)
        })
        .await
    }

    /// `HGETALL`; expired drains (and fields without a `since`, which no write leaves
    /// behind) are not returned and are deleted by [`DRAIN_CLEANUP_SCRIPT`] (best effort:
    /// a failed deletion is logged and retried by the next listing). A drain whose
    /// fields do not parse is skipped with a warning rather than failing the whole list
    /// (filters poll it).
    async fn draining(&self) -> Result<Vec<Drain>, StoreError> {
        let key = self.drains_key();
        let now = self.clock.unix_ms();
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let all: HashMap<String, String> = self.query(&mut checkout, redis::cmd("HGETALL").arg(&key)).await?;
            let mut out = Vec::new();
            let mut stale = Vec::new();
            for (upstream, fields) in group_drain_fields(all) {
                match fields.to_drain(&upstream) {
                    Ok(drain) if drain_expired(drain.since_ms, now, self.drain_ttl) => {
                        stale.push((upstream, fields.since.unwrap_or_default()));
                    }
                    Ok(drain) => out.push(drain),
                    Err(_) if fields.since.is_none() => stale.push((upstream, String::new())),
                    Err(e) => tracing::warn!(key = key.as_str(), error = e.as_str(), "skipping an unreadable drain"),
                }
            }
            // Best effort: the listing stands without it, and the next listing retries.
            for (upstream, since) in stale {
                if let Err(e) = self.eval::<i64>(&mut checkout, DRAIN_CLEANUP_SCRIPT, &key, &[&upstream, &since]).await {
                    tracing::warn!(key = key.as_str(), upstream = upstream.as_str(), error = %e, "deleting an expired drain failed");
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_drain_move(&self, upstream: SocketAddr, moved: bool) -> Result<Option<Drain>, StoreError> {
        let key = self.drains_key();
        let up = upstream.to_string();
        let kind = if moved { "moved" } else { "failed" };
        let (now, ttl) = (self.clock.unix_ms().to_string(), self.drain_ttl_ms().to_string());
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let fields: Option<Vec<Option<String>>> =
                self.eval(&mut checkout, DRAIN_MOVE_SCRIPT, &key, &[&up, kind, &now, &ttl]).await?;
            fields
                .map(|f| DrainFields::from_hmget(f).to_drain(&up).map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))))
                .transpose()
        })
        .await
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

    /// The hash tag Redis Cluster computes for `key` (the part hashed into a slot).
    fn cluster_tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(len) = key[open + 1..].find('}')
            && len > 0
        {
            return &key[open + 1..open + 1 + len];
        }
        key
    }

    #[test]
    fn keys_share_a_hash_tag() {
        assert_eq!(record_key("mcp-affinity:", &id("abc-123")), "mcp-affinity:{abc-123}:record");
        assert_eq!(lease_key("mcp-affinity:", &id("abc-123")), "mcp-affinity:{abc-123}:lease");
        for raw in ["abc", "}", "{", "{}", "a}b{c", "%7D", "%", "x:record", "}}}{{{"] {
            let (record, lease) = (record_key("p:", &id(raw)), lease_key("p:", &id(raw)));
            assert_eq!(cluster_tag(&record), cluster_tag(&lease), "{raw}: {record} / {lease}");
            assert_ne!(cluster_tag(&record), record, "{raw}: the key must have a hash tag");
            assert_ne!(record, lease);
        }
        // Distinct ids, distinct keys (the escaping is injective).
        let ids = ["}", "%7D", "%257D", "{", "%7B", "%", "%25"];
        let keys: std::collections::BTreeSet<String> = ids.iter().map(|s| record_key("", &id(s))).collect();
        assert_eq!(keys.len(), ids.len(), "{keys:?}");
    }

    #[test]
    fn drain_fields_group_and_parse() {
        let all: HashMap<String, String> = [
            ("since:10.0.0.1:80", "1000"),
            ("source:10.0.0.1:80", "dns"),
            ("moved:10.0.0.1:80", "3"),
            ("failed:10.0.0.1:80", "1"),
            ("last:10.0.0.1:80", "1500"),
            ("since:[::1]:8080", "2000"),
            ("source:[::1]:8080", "kubernetes-someday"),
            ("moved:[::1]:8080", "0"),
            ("failed:[::1]:8080", "0"),
            ("moved:10.0.0.9:80", "1"),
            ("junk", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let grouped = group_drain_fields(all);
        assert_eq!(grouped.keys().collect::<Vec<_>>(), ["10.0.0.1:80", "10.0.0.9:80", "[::1]:8080"]);
        let a = grouped["10.0.0.1:80"].to_drain("10.0.0.1:80").unwrap();
        assert_eq!(
            a,
            Drain {
                upstream: "10.0.0.1:80".into(),
                since_ms: 1000,
                source: DrainSource::Dns,
                moved: 3,
                failed: 1,
                last_move_ms: Some(1500)
            }
        );
        let b = grouped["[::1]:8080"].to_drain("[::1]:8080").unwrap();
        assert_eq!((b.source, b.last_move_ms, b.moved), (DrainSource::Other, None, 0));
        assert!(grouped["10.0.0.9:80"].to_drain("10.0.0.9:80").is_err(), "no since: not a drain");
        assert_eq!(drains_key("mcp-affinity:"), "mcp-affinity:drains");
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
