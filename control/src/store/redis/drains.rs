//! The drains of the Redis store: their hash, its scripts, and the drain operations of
//! [`SessionStore`](crate::store::SessionStore).
//!
//! **Drains** live in ONE hash, `<prefix>drains` ([`drains_key`](super::drains_key)),
//! with five fields per upstream `U` (canonical `ip:port`): `since:U` (Unix ms, the
//! store's clock), `source:U`, `moved:U`, `failed:U` and `last:U` (Unix ms of the last
//! successful move; absent before it). Listing is one `HGETALL`; undraining one `HDEL` of the five fields (through a
//! script that also says whether the drain was live); draining, counting a move and
//! deleting an expired drain are short scripts on that one key, so each is atomic (an
//! existing drain is never overwritten, a counter never outlives its drain, a late
//! clean-up never deletes a newer drain). Expiry is decided from `since:U` and the time
//! control passes in (the store's clock), not by a Redis TTL; expired drains are deleted
//! when a listing finds them. Like every other command here each touches exactly one key,
//! so drains work on one node, Sentinel and Cluster alike. Drain writes do not `WAIT`
//! for replicas (a drain lost in a failover costs a pod's sessions their early move; they
//! are still recovered when the pod stops).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use super::RedisStore;
use crate::store::{Drain, DrainSource, StoreError, drain_expired};

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
            tasks: 0,
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

impl RedisStore {
    /// [`SessionStore::drain`](crate::store::SessionStore::drain): the drain script.
    pub(super) async fn drain_upstream(&self, upstream: SocketAddr, source: DrainSource) -> Result<Drain, StoreError> {
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

    /// [`SessionStore::undrain`](crate::store::SessionStore::undrain): the undrain script.
    pub(super) async fn undrain_upstream(&self, upstream: SocketAddr) -> Result<bool, StoreError> {
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
    pub(super) async fn list_drains(&self) -> Result<Vec<Drain>, StoreError> {
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

    /// [`SessionStore::record_drain_move`](crate::store::SessionStore::record_drain_move):
    /// the move script.
    pub(super) async fn count_drain_move(&self, upstream: SocketAddr, moved: bool) -> Result<Option<Drain>, StoreError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::drains_key;

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
                last_move_ms: Some(1500),
                tasks: 0
            }
        );
        let b = grouped["[::1]:8080"].to_drain("[::1]:8080").unwrap();
        assert_eq!((b.source, b.last_move_ms, b.moved), (DrainSource::Other, None, 0));
        assert!(grouped["10.0.0.9:80"].to_drain("10.0.0.9:80").is_err(), "no since: not a drain");
        assert_eq!(drains_key("mcp-affinity:"), "mcp-affinity:drains");
    }
}
