//! Store benchmark: GET and conditional PUT (`if_generation`) throughput and p50/p99
//! latency, for the memory store and for Redis (a `redis-server` started on a free
//! loopback port; skipped with a note when `redis-server` is not installed).
//!
//! Run: `cargo bench -p mcp-affinity-control --bench store`. Scale with `BENCH_OPS`
//! (operations per measurement, default 50 000) and `BENCH_CONCURRENCY` (tasks, default 16).
//!
//! Operations go through the [`SessionStore`] trait, i.e. what a request costs the service
//! minus HTTP. Each conditional PUT moves a session from generation g to g+1, so every
//! one of them performs the full read–decide–compare-and-swap path.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_affinity_control::record::{PutCondition, PutSession};
use mcp_affinity_control::session_id::SessionId;
use mcp_affinity_control::store::memory::MemoryStore;
use mcp_affinity_control::store::redis::{RedisStore, RedisStoreConfig};
use mcp_affinity_control::store::{PutOutcome, SessionStore};

const SESSIONS_PER_TASK: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn body(generation: u64) -> PutSession {
    PutSession {
        backend_session_id: None,
        upstream: "10.0.0.7:8080".into(),
        generation: Some(generation),
        initialize: r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}"#.into(),
        initialized: Some(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into()),
        protocol_version: Some("2025-06-18".into()),
    }
}

fn id(task: usize, n: usize) -> SessionId {
    SessionId::parse(&format!("bench-{task}-{n}")).unwrap()
}

/// Latencies of one measurement, summarised.
fn report(store: &str, op: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let ops = latencies.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{store:<7} {op:<18} {:>8} ops  {:>10.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
        latencies.len(),
        ops,
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
}

/// Runs `ops` operations spread over `tasks` tasks; `op(task, i)` is the i-th of a task.
async fn measure<S, F, Fut>(store: &Arc<S>, tasks: usize, ops: usize, op: F) -> (Vec<Duration>, Duration)
where
    S: SessionStore,
    F: Fn(Arc<S>, usize, usize) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = ()> + Send,
{
    let per_task = ops / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let s = Instant::now();
                    op(store.clone(), t, i).await;
                    lat.push(s.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(ops);
    for h in handles {
        all.extend(h.await.unwrap());
    }
    (all, start.elapsed())
}

async fn bench_store<S: SessionStore>(name: &str, store: S, tasks: usize, ops: usize) {
    let store = Arc::new(store);
    for t in 0..tasks {
        for n in 0..SESSIONS_PER_TASK {
            store.put(&id(t, n), &body(1), PutCondition::Always).await.expect("preload");
        }
    }
    // Warm-up (connections, allocator, caches).
    let _ = measure(&store, tasks, ops / 10, |s, t, i| async move {
        s.get(&id(t, i % SESSIONS_PER_TASK)).await.unwrap().expect("present");
    })
    .await;

    let (lat, elapsed) = measure(&store, tasks, ops, |s, t, i| async move {
        s.get(&id(t, i % SESSIONS_PER_TASK)).await.unwrap().expect("present");
    })
    .await;
    report(name, "GET", lat, elapsed);

    // Each task owns its sessions, so generation of session n after round r is r + 1.
    let (lat, elapsed) = measure(&store, tasks, ops, |s, t, i| async move {
        let round = (i / SESSIONS_PER_TASK) as u64;
        let outcome = s
            .put(&id(t, i % SESSIONS_PER_TASK), &body(round + 2), PutCondition::IfGeneration(round + 1))
            .await
            .unwrap();
        assert!(matches!(outcome, PutOutcome::Replaced(_)), "unexpected {outcome:?}");
    })
    .await;
    report(name, "PUT if_generation", lat, elapsed);
}

/// A `redis-server` on a free loopback port, killed when dropped.
struct RedisProcess(std::process::Child, u16);

impl RedisProcess {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        Some(RedisProcess(child, port))
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let ops = env_usize("BENCH_OPS", 50_000);
    let tasks = env_usize("BENCH_CONCURRENCY", 16).max(1);
    println!("store benchmark: {ops} operations per line, {tasks} concurrent tasks, {} worker threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()));

    bench_store("memory", MemoryStore::new(Duration::from_secs(3600), 1_000_000), tasks, ops).await;

    let Some(redis) = RedisProcess::start() else {
        println!("redis   skipped: `redis-server` not found (apt-get install redis-server, or set REDIS_SERVER)");
        return;
    };
    let store = RedisStore::new(&RedisStoreConfig {
        url: format!("redis://127.0.0.1:{}", redis.1),
        key_prefix: "bench:".into(),
        ttl: Duration::from_secs(3600),
        timeout: Duration::from_secs(2),
    })
    .expect("redis store");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not answer PING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bench_store("redis", store, tasks, ops).await;
    drop(redis);
}
