//! Connections of the three Redis topologies behind one type, [`Backend`].
//!
//! - **Single** node: the redis crate's [`ConnectionManager`] (one multiplexed
//!   connection, reconnecting after I/O errors), created lazily, and replaced by a new one
//!   after a `READONLY` answer (a managed primary endpoint whose old primary was demoted
//!   without closing its connections: the new connection resolves the name again).
//! - **Sentinel**: a multiplexed connection to the master the sentinels name (the crate's
//!   [`SentinelClient`] asks each sentinel in turn for the master and checks with `ROLE`
//!   that the node it names really is a master). Any error on that connection — the
//!   master died, was demoted (`READONLY`), does not answer in time — drops it, and the
//!   next operation asks the sentinels again, so control follows a failover without a
//!   restart. The sentinels are also asked again every [`MASTER_RECHECK`] while the
//!   connection works, so a master demoted without dropping its clients is left within
//!   about that long.
//! - **Cluster**: the crate's async [`ClusterConnection`] (routes each command to the
//!   node owning its key's slot, follows `MOVED`/`ASK`, refreshes the slot map after
//!   errors and failovers), created on first use and again after a failed attempt.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};

use super::topology::RedisTopology;

/// One connection of any topology; commands run on it through [`ConnectionLike`].
#[derive(Clone)]
pub(super) enum Conn {
    /// Single node.
    Manager(ConnectionManager),
    /// The current Sentinel master.
    Node(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection handed out by [`Backend::connection`]; give it back to
/// [`Backend::failed`] when an operation on it failed.
pub(super) struct Checkout {
    pub(super) conn: Conn,
    /// Which connection this is (single node, Sentinel), so a failure retires only that
    /// one and not a newer replacement; 0 for a cluster.
    epoch: u64,
}

/// The connection source of one topology.
pub(super) enum Backend {
    Single(SingleBackend),
    Sentinel(Arc<SentinelBackend>),
    Cluster(ClusterBackend),
}

impl Backend {
    /// Prepares connections to `topology` without connecting: the first operation
    /// connects, so control starts (and reports not ready) while Redis is down. Every
    /// connection attempt and every answer is bounded by `timeout`.
    pub(super) fn new(topology: &RedisTopology, timeout: Duration) -> RedisResult<Backend> {
        Ok(match topology {
            RedisTopology::Single { url } => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                Backend::Single(SingleBackend { client, config, current: Mutex::new((0, manager)), epochs: AtomicU64::new(0) })
            }
            RedisTopology::Sentinel { sentinels, master_name, master, tls } => {
                let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(master.clone());
                if *tls {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let client = SentinelClient::build(sentinels.clone(), master_name.clone(), Some(node), SentinelServerType::Master)?;
                Backend::Sentinel(Arc::new(SentinelBackend {
                    resolver: tokio::sync::Mutex::new(client),
                    current: Mutex::new(None),
                    epochs: AtomicU64::new(0),
                    rechecking: AtomicBool::new(false),
                    timeout,
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout)),
                }))
            }
            RedisTopology::Cluster { nodes } => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()?;
                Backend::Cluster(ClusterBackend { client, conn: tokio::sync::OnceCell::new() })
            }
        })
    }

    /// A connection to the node(s) that take writes now.
    pub(super) async fn connection(&self) -> RedisResult<Checkout> {
        match self {
            Backend::Single(single) => Ok(single.checkout()),
            Backend::Sentinel(sentinel) => sentinel.connection().await,
            Backend::Cluster(cluster) => cluster.connection().await,
        }
    }

    /// An operation on `checkout` failed with `error`: a Sentinel connection is dropped
    /// so that the next operation asks the sentinels where the master is now; a
    /// single-node connection that met a replica (`READONLY`) is replaced. Otherwise the
    /// connections reconnect by themselves.
    pub(super) fn failed(&self, checkout: &Checkout, error: &RedisError) {
        match self {
            Backend::Sentinel(sentinel) => sentinel.discard(checkout.epoch),
            Backend::Single(single) if error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) => {
                single.replace(checkout.epoch);
            }
            Backend::Single(_) | Backend::Cluster(_) => {}
        }
    }

    /// Drops every cached Sentinel connection (after an operation timed out without
    /// telling which connection hung).
    pub(super) fn failed_all(&self) {
        if let Backend::Sentinel(sentinel) = self {
            *sentinel.lock_current() = None;
        }
    }
}

/// One node: a [`ConnectionManager`], replaced after `READONLY`.
pub(super) struct SingleBackend {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: Mutex<(u64, ConnectionManager)>,
    epochs: AtomicU64,
}

impl SingleBackend {
    fn checkout(&self) -> Checkout {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Checkout { conn: Conn::Manager(current.1.clone()), epoch: current.0 }
    }

    fn replace(&self, epoch: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != epoch {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => {
                *current = (self.epochs.fetch_add(1, Ordering::Relaxed) + 1, manager);
                tracing::warn!("Redis answered READONLY (the node is a replica now); reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot replace the Redis connection"),
        }
    }
}

/// How long a Sentinel master connection is used before the sentinels are asked again
/// whether it is still the master. Bounds how long control keeps writing to a master
/// that was demoted without closing its connections (a manual or partition failover:
/// Sentinel converts a reachable old master only several seconds after the switch).
pub(super) const MASTER_RECHECK: Duration = Duration::from_secs(1);

/// The master of a Sentinel deployment, found again after every failure and checked
/// again every [`MASTER_RECHECK`] (in the background: no operation waits for it).
pub(super) struct SentinelBackend {
    /// Asks the sentinels; one question at a time.
    resolver: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the master last named by the sentinels.
    current: Mutex<Option<Current>>,
    epochs: AtomicU64,
    /// A background check is running.
    rechecking: AtomicBool,
    /// Bound of a background check.
    timeout: Duration,
    config: AsyncConnectionConfig,
}

struct Current {
    epoch: u64,
    /// `host:port` of the master.
    addr: String,
    conn: MultiplexedConnection,
    /// When the sentinels last confirmed it (or were last asked).
    checked: Instant,
}

impl Current {
    fn checkout(&self) -> Checkout {
        Checkout { conn: Conn::Node(self.conn.clone()), epoch: self.epoch }
    }
}

impl SentinelBackend {
    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached connection, and whether it is due for a check.
    fn cached(&self) -> Option<(Checkout, bool)> {
        self.lock_current().as_ref().map(|c| (c.checkout(), c.checked.elapsed() >= MASTER_RECHECK))
    }

    async fn connection(self: &Arc<Self>) -> RedisResult<Checkout> {
        if let Some((checkout, due)) = self.cached() {
            if due && !self.rechecking.swap(true, Ordering::AcqRel) {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.recheck().await });
            }
            return Ok(checkout);
        }
        let mut resolver = self.resolver.lock().await;
        // Another operation may have found the master while this one waited.
        if let Some((checkout, _)) = self.cached() {
            return Ok(checkout);
        }
        self.resolve(&mut resolver).await
    }

    /// Asks the sentinels whether the current master still is the master; switches to the
    /// one they name otherwise. When they cannot tell, the current master is kept (it
    /// fails on its own when it is gone) and asked about again after [`MASTER_RECHECK`].
    async fn recheck(&self) {
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut resolver = self.resolver.lock().await;
            self.resolve(&mut resolver).await
        })
        .await;
        let error = match outcome {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", self.timeout)),
        };
        if let Some(error) = error {
            if let Some(c) = self.lock_current().as_mut() {
                c.checked = Instant::now();
            }
            tracing::warn!(%error, "cannot confirm the Redis master with Sentinel; keeping the current one");
        }
        self.rechecking.store(false, Ordering::Release);
    }

    /// Asks the sentinels for the master (the crate checks its `ROLE`); keeps the current
    /// connection when it is the same master, else connects to the new one.
    async fn resolve(&self, resolver: &mut SentinelClient) -> RedisResult<Checkout> {
        let client = resolver.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        if let Some(c) = self.lock_current().as_mut().filter(|c| c.addr == addr) {
            c.checked = Instant::now();
            return Ok(c.checkout());
        }
        let conn = client.get_multiplexed_async_connection_with_config(&self.config).await?;
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let current = Current { epoch, addr, conn, checked: Instant::now() };
        let checkout = current.checkout();
        tracing::info!(epoch, master = %current.addr, "using the Redis master named by Sentinel");
        *self.lock_current() = Some(current);
        Ok(checkout)
    }

    fn discard(&self, epoch: u64) {
        let mut current = self.lock_current();
        if current.as_ref().is_some_and(|c| c.epoch == epoch) {
            *current = None;
            tracing::warn!(epoch, "Redis master connection failed; asking Sentinel again on the next operation");
        }
    }
}

/// A Redis Cluster connection, made on first use (and again while making it fails).
pub(super) struct ClusterBackend {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl ClusterBackend {
    async fn connection(&self) -> RedisResult<Checkout> {
        let conn = self.conn.get_or_try_init(|| self.client.get_async_connection()).await?;
        Ok(Checkout { conn: Conn::Cluster(conn.clone()), epoch: 0 })
    }
}
