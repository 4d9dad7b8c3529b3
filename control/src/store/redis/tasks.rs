//! Task pins in Redis (MCP 2026-07-28 tasks extension): the pin of task `T` is the record
//! JSON at `<prefix>{T}:task` ([`task_key`]), expired by Redis (`PX`). Each upstream `U`
//! has an index of its unfinished tasks, the sorted set `<prefix>{U}:tasks-on`
//! ([`tasks_on_key`]): task id → the pin's expiry (Unix ms), so that a drain's remaining
//! tasks are one `ZCOUNT` of the entries not yet expired. A pin is added when written,
//! removed when its task is seen terminal or its pin deleted; expired entries are pruned
//! on every addition, so the index never outgrows the live tasks. Each command touches one
//! key (Cluster-safe); the pin and its index entry are two writes, not one transaction: a
//! failure between them leaves an index entry that expires with the pin's TTL.

use std::time::Duration;

use super::{RedisStore, task_key, tasks_on_key};
use crate::store::{StoreError, TaskRecord};

impl RedisStore {
    /// `SET <task key> <record> PX ttl` and `ZADD` to the upstream's index; `terminal`: the
    /// existing pin (same upstream) is rewritten with `terminal: true` and `KEEPTTL`, or a
    /// new terminal pin is set, and the task leaves the index (`ZREM`).
    pub(super) async fn write_task(&self, task_id: &str, upstream: &str, ttl: Duration, terminal: bool) -> Result<TaskRecord, StoreError> {
        let key = task_key(&self.key_prefix, task_id);
        let index = tasks_on_key(&self.key_prefix, upstream);
        let (now_ms, ttl_ms) = (self.clock.unix_ms(), u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let fresh = TaskRecord { task_id: task_id.to_string(), upstream: upstream.to_string(), created_at_ms: now_ms, expires_at_ms: now_ms.saturating_add(ttl_ms), terminal };
        let kept = if terminal { self.get_task_record(task_id).await?.filter(|r| r.upstream == upstream && r.expires_at_ms > now_ms) } else { None };
        let keep_ttl = kept.is_some();
        let record = kept.map(|r| TaskRecord { terminal: true, ..r }).unwrap_or(fresh);
        let json = serde_json::to_string(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(&json);
        if keep_ttl {
            set.arg("KEEPTTL");
        } else {
            set.arg("PX").arg(ttl_ms);
        }
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let result = self.write_and_wait::<String>(&mut checkout, &set).await;
            let (_, acked) = self.settle(&checkout, result)?;
            self.check_replicated(acked)?;
            if terminal {
                self.query::<i64>(&mut checkout, redis::cmd("ZREM").arg(&index).arg(task_id)).await?;
            } else {
                self.query::<i64>(&mut checkout, redis::cmd("ZREMRANGEBYSCORE").arg(&index).arg("-inf").arg(now_ms)).await?;
                self.query::<i64>(&mut checkout, redis::cmd("ZADD").arg(&index).arg(record.expires_at_ms).arg(task_id)).await?;
            }
            Ok(())
        })
        .await?;
        Ok(record)
    }

    /// `GET <task key>`.
    pub(super) async fn get_task_record(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let key = task_key(&self.key_prefix, task_id);
        let value: Option<String> = self
            .bounded(async {
                let mut checkout = self.checkout().await?;
                self.query(&mut checkout, redis::cmd("GET").arg(&key)).await
            })
            .await?;
        value.map(|v| serde_json::from_str(&v).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))).transpose()
    }

    /// `ZCOUNT <index> (now +inf`.
    pub(super) async fn count_unfinished_tasks(&self, upstream: &str) -> Result<u64, StoreError> {
        let index = tasks_on_key(&self.key_prefix, upstream);
        let now_ms = self.clock.unix_ms();
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            self.query(&mut checkout, redis::cmd("ZCOUNT").arg(&index).arg(format!("({now_ms}")).arg("+inf")).await
        })
        .await
    }

    /// `DEL <task key>`, and `ZREM` from its upstream's index.
    pub(super) async fn remove_task(&self, task_id: &str) -> Result<bool, StoreError> {
        let record = self.get_task_record(task_id).await?;
        let key = task_key(&self.key_prefix, task_id);
        self.bounded(async {
            let mut checkout = self.checkout().await?;
            let removed = self.delete_key(&mut checkout, &key).await?;
            if let Some(r) = &record {
                self.query::<i64>(&mut checkout, redis::cmd("ZREM").arg(tasks_on_key(&self.key_prefix, &r.upstream)).arg(task_id)).await?;
            }
            Ok(removed)
        })
        .await
    }
}
