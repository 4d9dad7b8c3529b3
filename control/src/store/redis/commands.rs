//! Running one store operation on Redis: the timeout around it, a command or a Lua
//! script (`EVALSHA`, falling back to `EVAL`), a record write followed by `WAIT` for
//! replicas, and retiring the connection a failed command ran on.
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

use redis::{ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind};

use super::connection::Checkout;
use super::{RedisStore, ReplicationWait, unavailable};
use crate::store::StoreError;

/// `WAIT`'s timeout argument, in milliseconds (0 would mean "forever").
fn wait_ms(wait: ReplicationWait) -> u64 {
    wait.timeout.as_millis().max(1) as u64
}

impl RedisStore {
    /// Runs `op` within the operation timeout.
    pub(super) async fn bounded<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => {
                // Whatever hung (a Sentinel master that stopped answering?) is not reused.
                self.backend.failed_all();
                Err(StoreError::Unavailable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    pub(super) async fn checkout(&self) -> Result<Checkout, StoreError> {
        self.backend.connection().await.map_err(unavailable)
    }

    /// The result of a command on `checkout`; a failure retires the connection.
    pub(super) fn settle<T>(&self, checkout: &Checkout, result: RedisResult<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.backend.failed(checkout, &e);
            unavailable(e)
        })
    }

    pub(super) async fn query<T: FromRedisValue>(&self, checkout: &mut Checkout, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let result = cmd.query_async(&mut checkout.conn).await;
        self.settle(checkout, result)
    }

    /// Runs a script on `key`: `EVALSHA`, and `EVAL` (which also caches it) when this
    /// node does not know the script yet — routed by the key, so in a cluster it never
    /// needs the other primaries.
    pub(super) async fn eval<T: FromRedisValue>(
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
    pub(super) async fn write_and_wait<T: FromRedisValue>(
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
    pub(super) async fn eval_write<T: FromRedisValue>(
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

    /// `DEL key` (with `WAIT`, see [`Self::write_and_wait`]) on `checkout`: whether it
    /// existed. A deletion the replicas did not acknowledge fails.
    pub(super) async fn delete_key(&self, checkout: &mut Checkout, key: &str) -> Result<bool, StoreError> {
        let result = self.write_and_wait::<i64>(checkout, redis::cmd("DEL").arg(key)).await;
        let (removed, acked) = self.settle(checkout, result)?;
        if removed > 0 {
            self.check_replicated(acked)?;
        }
        Ok(removed > 0)
    }

    /// Fails unless the configured number of replicas acknowledged a write that happened.
    pub(super) fn check_replicated(&self, acked: Option<u64>) -> Result<(), StoreError> {
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
}
