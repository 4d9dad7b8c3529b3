//! Record writes of the Redis store ([`RedisStore::read_modify_write`]), under `put` and
//! `patch`.
//!
//! **Writes** are read–modify–write with an atomic compare-and-swap in Redis: control
//! reads the value, decides in Rust (generation condition, kept `created_at_ms`, patch),
//! then a Lua script replaces the value only if it is still byte-for-byte the one read (or
//! still absent). A lost race re-reads and decides again, so a conditional `put` has
//! exactly one winner among concurrent writers, across any number of control instances.

use super::RedisStore;
use super::connection::Checkout;
use crate::record::SessionRecord;
use crate::store::StoreError;

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

impl RedisStore {
    /// The record at `key`, with its raw JSON (what the compare-and-swap compares).
    pub(super) async fn read(&self, checkout: &mut Checkout, key: &str) -> Result<Option<(String, SessionRecord)>, StoreError> {
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
    pub(super) async fn read_modify_write(
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
