//! The control service on Redis beyond one node, against real servers on loopback:
//!
//! - **Sentinel** (`redis+sentinel://`): a master, one replica and three sentinels
//!   (quorum 2). Records are written with `--redis-wait-replicas 1`, the master is
//!   SIGKILLed, Sentinel promotes the replica, and control — without a restart — serves
//!   again after a bounded number of 503 `store_unavailable`, with every acknowledged
//!   record intact. Writes need a live replica again (`WAIT 1`): they answer 503 until
//!   the old master's port rejoins as a replica, then succeed.
//! - **Cluster** (`redis+cluster://`): three primaries created with `redis-cli --cluster
//!   create`; conformance-style operations on sessions spread over every primary, the
//!   lease of a session in the slot (and on the node) of its record (`CLUSTER KEYSLOT`),
//!   and one winner among concurrent conditional writes.
//! - **Cluster with replicas** (3 + 3): a primary SIGKILLed, its replica takes over,
//!   control keeps serving and every acknowledged record (`WAIT 1`) is still there.
//! - **Sentinel manual failover**: the old master keeps running; control's writes move to
//!   the new master within about a second (its periodic re-check of the master).
//! - **One node demoted** under an open connection: 503 (`READONLY`), then service again.
//!
//! Control runs in-process. Every Redis process is on a free loopback port and stopped
//! by pid when its fixture is dropped; waits poll with deadlines, never fixed sleeps.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mcp_affinity_control::session_id::SessionId;
use mcp_affinity_control::store::SessionStore;
use mcp_affinity_control::store::redis::{RedisStore, RedisStoreConfig, lease_key, record_key};
use mcp_affinity_proto::sessions::encode_segment as encode;
use mcp_affinity_harness::fixtures::control::InProcessControl;
use mcp_affinity_harness::fixtures::redis::{RedisCluster, RedisSentinels, RedisServer, query};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const TOKEN: &str = "topologies-token-0123456789";
const PREFIX: &str = "mcp-affinity:";
/// `--redis-timeout-ms` of the instances under test, and `--redis-wait-timeout-ms` when
/// writes wait for a replica (generous: the test machine may be loaded).
const STORE_TIMEOUT_MS: u64 = 3000;
const WAIT_TIMEOUT_MS: &str = "1500";

/// Control in this process, on `store`, with more flags.
struct Control {
    base: String,
    http: reqwest::Client,
    _server: InProcessControl,
}

impl Control {
    async fn start(store: &str, extra: &[&str]) -> Control {
        let mut args: Vec<String> = ["--token", TOKEN, "--store", store, "--redis-timeout-ms", &STORE_TIMEOUT_MS.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = InProcessControl::start(&args).await;
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap();
        Control { base: server.base.clone(), http, _server: server }
    }

    async fn call(&self, method: Method, id: &str, query: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}/v1/sessions/{}{query}", self.base, encode(id));
        let mut req = self.http.request(method, url).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.expect("control must answer");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).expect("JSON answer") })
    }

    async fn put(&self, id: &str, body: Value, if_generation: Option<u64>) -> (StatusCode, Value) {
        let query = if_generation.map(|g| format!("?if_generation={g}")).unwrap_or_default();
        self.call(Method::PUT, id, &query, Some(body)).await
    }

    async fn get(&self, id: &str) -> (StatusCode, Value) {
        self.call(Method::GET, id, "", None).await
    }

    async fn ready(&self) -> StatusCode {
        self.http.get(format!("{}/readyz", self.base)).send().await.unwrap().status()
    }
}

fn record_body(i: usize, generation: u64) -> Value {
    json!({
        "upstream": format!("10.2.0.{}:8080", i % 250),
        "backend_session_id": format!("backend-{i}"),
        "generation": generation,
        "initialize": format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"initialize","params":{{}}}}"#),
        "protocol_version": "2025-06-18",
    })
}

fn assert_unavailable(answer: &(StatusCode, Value)) {
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.1);
    assert_eq!(answer.1["code"], "store_unavailable", "{}", answer.1);
}

/// GETs `id` every 50 ms until `stop` is set; returns every status seen. Each answer must
/// be 200 or 503 `store_unavailable`, and come within the store timeout (plus slack).
fn watch(control: Arc<Control>, id: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<StatusCode>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let answer = control.get(id).await;
            assert!(
                start.elapsed() < Duration::from_millis(STORE_TIMEOUT_MS) + Duration::from_secs(2),
                "a request during the failover took {:?}",
                start.elapsed()
            );
            if answer.0 != StatusCode::OK {
                assert_unavailable(&answer);
            }
            seen.push(answer.0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}

/// GETs `id` until it answers 200 (503 `store_unavailable` meanwhile), at most `attempts`
/// times; returns how many 503 came first.
async fn get_until_ok(control: &Control, id: &str, attempts: usize) -> usize {
    for failures in 0..attempts {
        let answer = control.get(id).await;
        if answer.0 == StatusCode::OK {
            return failures;
        }
        assert_unavailable(&answer);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id}: still unavailable after {attempts} attempts");
}

/// Blocking fixture work (process starts, polls) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_keeps_every_acknowledged_record() {
    let started = Instant::now();
    let mut redis = blocking(|| RedisSentinels::start("mcp-affinity-test")).expect("master, replica and three sentinels");
    let control = Arc::new(Control::start(&redis.url(), &["--redis-wait-replicas", "1", "--redis-wait-timeout-ms", WAIT_TIMEOUT_MS]).await);
    assert_eq!(control.ready().await, StatusCode::OK);

    // Acknowledged writes: creates, a re-pin, a patch, a delete.
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let (status, record) = control.put(&format!("s-{i}"), record_body(i, 1), Some(0)).await;
        assert_eq!(status, StatusCode::CREATED, "{record}");
        acknowledged.push((format!("s-{i}"), record));
    }
    let (status, repinned) = control.put("s-1", record_body(1001, 2), Some(1)).await;
    assert_eq!(status, StatusCode::OK, "{repinned}");
    acknowledged[1].1 = repinned;
    let (status, patched) = control.call(Method::PATCH, "s-0", "", Some(json!({"protocol_version": "2099-01-01"}))).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    acknowledged[0].1 = patched;
    assert_eq!(control.call(Method::DELETE, "s-2", "", None).await.0, StatusCode::NO_CONTENT);
    acknowledged.remove(2);
    // WAIT 1 answered: the replica holds exactly the acknowledged records.
    assert_eq!(query(redis.replica.port(), &["DBSIZE"]).unwrap().int(), Some(acknowledged.len() as i64));

    // The master dies (SIGKILL by pid); requests meanwhile answer 200 or 503, never hang.
    let old_port = redis.master.port();
    let pid = redis.master.pid().expect("master runs");
    redis.master.kill();
    let killed_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(control.clone(), "s-3", stop.clone());
    let new_port = blocking(|| redis.wait_for_new_master(old_port, Duration::from_secs(25))).expect("Sentinel promotes the replica");
    assert_eq!(new_port, redis.replica.port());
    let failover = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = watcher.await.unwrap();

    // Control follows the new master: a bounded number of 503 once Sentinel names it.
    let failures_after = get_until_ok(&control, "s-3", 20).await;
    assert!(failures_after <= 5, "{failures_after} failures after Sentinel named the new master");
    for (id, expected) in &acknowledged {
        let (status, got) = control.get(id).await;
        assert_eq!(status, StatusCode::OK, "{id} lost in the failover");
        assert_eq!(&got, expected, "{id} changed in the failover");
    }
    assert_eq!(control.get("s-2").await.0, StatusCode::NOT_FOUND, "a delete was acknowledged too");
    assert_eq!(control.ready().await, StatusCode::OK);

    // The new master has no replica: WAIT 1 cannot be met, so a write is not acknowledged
    // (503) — although the primary applied it (outcome unknown, as documented).
    let unreplicated = control.put("after-1", record_body(2001, 1), Some(0)).await;
    assert_unavailable(&unreplicated);
    assert!(unreplicated.1["message"].as_str().unwrap().contains("0 of 1 replicas"), "{}", unreplicated.1);
    assert_eq!(control.get("after-1").await.0, StatusCode::OK);

    // A replica again (the old master's port, restarted as a replica of the new master):
    // writes are acknowledged again.
    blocking(|| redis.rejoin_old_master_as_replica(new_port)).expect("old master rejoins as a replica");
    let (status, created) = control.put("after-2", record_body(2002, 1), Some(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, replaced) = control.put("s-4", record_body(2003, 2), Some(1)).await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["created_at_ms"], acknowledged[3].1["created_at_ms"]);

    let unavailable = during.iter().filter(|s| **s != StatusCode::OK).count();
    eprintln!(
        "sentinel: master pid {pid} killed; new master after {failover:?}; {unavailable} of {} requests \
         answered 503 meanwhile, {failures_after} after; whole test {:?}",
        during.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_manual_failover_moves_writes_to_the_new_master() {
    // `SENTINEL FAILOVER` promotes the replica while the old master keeps running (Sentinel
    // demotes a reachable old master only several seconds later): nothing breaks control's
    // connection. Control asks the sentinels again every second, so its writes move to the
    // new master within about that long.
    let started = Instant::now();
    let redis = blocking(|| RedisSentinels::start("mcp-affinity-manual")).expect("master, replica and three sentinels");
    let control = Control::start(&redis.url(), &[]).await;
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let id = format!("m-{i}");
        let (status, record) = control.put(&id, record_body(i, 1), Some(0)).await;
        assert_eq!(status, StatusCode::CREATED, "{record}");
        acknowledged.push((id, record));
    }
    // A manual failover does not wait for the replica: let it catch up first.
    let (old, new) = (redis.master.port(), redis.replica.port());
    blocking(|| mcp_affinity_harness::fixtures::redis::wait_replicas_caught_up(old, Duration::from_secs(10))).unwrap();

    blocking(|| redis.manual_failover(Duration::from_secs(15))).expect("SENTINEL FAILOVER");
    assert_eq!(blocking(|| redis.wait_for_new_master(old, Duration::from_secs(15))).expect("the replica is promoted"), new);
    let switched_at = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let id = format!("after-{attempts}");
        let answer = control.put(&id, record_body(100 + attempts, 1), Some(0)).await;
        if answer.0 == StatusCode::CREATED {
            let key = record_key(PREFIX, &SessionId::parse(&id).unwrap());
            if query(new, &["EXISTS", &key]).unwrap().int() == Some(1) {
                break;
            }
        } else {
            assert_unavailable(&answer);
        }
        assert!(switched_at.elapsed() < Duration::from_secs(5), "control still writes elsewhere {:?} after the switch", switched_at.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_after = switched_at.elapsed();
    for (id, expected) in &acknowledged {
        assert_eq!(&control.get(id).await, &(StatusCode::OK, expected.clone()), "{id} after the manual failover");
    }
    eprintln!(
        "sentinel (manual failover): writes reached the new master {moved_after:?} after the switch \
         ({attempts} attempts); whole test {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_demoted_under_an_open_connection_answers_503_then_recovers() {
    // A managed primary endpoint whose node is demoted without closing connections: control
    // meets READONLY, answers 503 (nothing written), replaces its connection, and writes
    // again once the node it reaches is a primary.
    /// Removes the directory when dropped (after the servers, declared later, are gone).
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = TempDir(std::env::temp_dir().join(format!("mcp-affinity-demoted-{}-{nanos}", std::process::id())));
    // Persistent flavour: its own directory, where a replica writes the RDB it receives.
    let node = blocking(|| RedisServer::start_persistent(&dir.0)).expect("redis-server");
    let other = blocking(RedisServer::start).expect("redis-server");
    let control = Control::start(&node.url(), &[]).await;
    assert_eq!(control.put("d-1", record_body(1, 1), Some(0)).await.0, StatusCode::CREATED);

    assert_eq!(node.query(&["REPLICAOF", "127.0.0.1", &other.port().to_string()]).unwrap().text(), Some("OK"));
    let refused = control.put("d-2", record_body(2, 1), Some(0)).await;
    assert_unavailable(&refused);
    assert!(refused.1["message"].as_str().unwrap().contains("read only replica"), "{}", refused.1);

    assert_eq!(node.query(&["REPLICAOF", "NO", "ONE"]).unwrap().text(), Some("OK"));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let answer = control.put(&format!("d-{}", 2 + attempts), record_body(3, 1), Some(0)).await;
        if answer.0 == StatusCode::CREATED {
            break;
        }
        assert_unavailable(&answer);
        assert!(attempts < 5, "still failing: {}", answer.1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` session ids spread over the slots, plus ids with braces and `%`.
fn cluster_ids(n: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..n).map(|i| format!("cl-{i}")).collect();
    ids.extend(["a{b}c", "}x{", "{}", "%7B", "tag{same}1", "tag{same}2"].map(String::from));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_serves_every_slot_and_keeps_a_sessions_keys_in_one_slot() {
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start(3, 0)).expect("a 3-primary Redis Cluster");
    let control = Control::start(&cluster.url(), &[]).await;
    assert_eq!(control.ready().await, StatusCode::OK);

    let ids = cluster_ids(45);
    let mut primaries = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (status, created) = control.put(id, record_body(i, 1), Some(0)).await;
        assert_eq!(status, StatusCode::CREATED, "{id}: {created}");
        assert_eq!(control.get(id).await, (StatusCode::OK, created.clone()));
        let (status, conflict) = control.put(id, record_body(i, 1), Some(0)).await;
        assert_eq!((status, &conflict["code"]), (StatusCode::CONFLICT, &json!("generation_conflict")));
        assert_eq!(conflict["current"], created);
        let (status, repinned) = control.put(id, record_body(i + 1000, 2), Some(1)).await;
        assert_eq!(status, StatusCode::OK, "{id}: {repinned}");
        assert_eq!((repinned["generation"].as_u64(), &repinned["created_at_ms"]), (Some(2), &created["created_at_ms"]));
        let (status, patched) = control.call(Method::PATCH, id, "", Some(json!({"protocol_version": "2030-01-01"}))).await;
        assert_eq!((status, &patched["protocol_version"]), (StatusCode::OK, &json!("2030-01-01")));

        // The record lives on the primary of its slot, under the documented key.
        let sid = SessionId::parse(id).unwrap();
        let key = record_key(PREFIX, &sid);
        let slot = cluster.keyslot(&key).unwrap();
        let primary = cluster.primary_port_of_slot(cluster.nodes[0].port(), slot).unwrap();
        assert_eq!(query(primary, &["EXISTS", &key]).unwrap().int(), Some(1), "{key} on 127.0.0.1:{primary}");
        primaries.insert(primary);
    }
    assert_eq!(primaries.len(), 3, "the sessions are spread over every primary");

    // Leases: in the slot of their record, on the same node, released by their owner.
    let store = RedisStore::new(&RedisStoreConfig {
        url: cluster.url(),
        key_prefix: PREFIX.into(),
        ttl: Duration::from_secs(60),
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    for id in &ids {
        let sid = SessionId::parse(id).unwrap();
        let (record, lease) = (record_key(PREFIX, &sid), lease_key(PREFIX, &sid));
        let slot = cluster.keyslot(&record).unwrap();
        assert_eq!(cluster.keyslot(&lease).unwrap(), slot, "{record} and {lease} must share a slot");
        assert!(store.try_acquire_lease(&sid, "owner-a", Duration::from_secs(30)).await.unwrap());
        assert!(!store.try_acquire_lease(&sid, "owner-b", Duration::from_secs(30)).await.unwrap(), "{id}: one holder");
        let primary = cluster.primary_port_of_slot(cluster.nodes[0].port(), slot).unwrap();
        assert_eq!(query(primary, &["EXISTS", &record, &lease]).unwrap().int(), Some(2), "{id}: both keys on one node");
        assert_eq!(query(primary, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]).unwrap().int().map(|n| n >= 2), Some(true));
        store.release_lease(&sid, "owner-b").await.unwrap(); // not the owner: no effect
        assert_eq!(query(primary, &["EXISTS", &lease]).unwrap().int(), Some(1));
        store.release_lease(&sid, "owner-a").await.unwrap();
        assert_eq!(query(primary, &["EXISTS", &lease]).unwrap().int(), Some(0));
    }

    // Concurrent conditional writes on one session: exactly one winner.
    let contested = &ids[7];
    let racers = (0..16).map(|i| control.put(contested, record_body(5000 + i, 3), Some(2)));
    let answers = futures::future::join_all(racers).await;
    let winners = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let conflicts = answers.iter().filter(|(s, _)| *s == StatusCode::CONFLICT).count();
    assert_eq!((winners, conflicts), (1, 15), "{answers:?}");

    // Delete everything: nothing is left in any node.
    for id in &ids {
        assert_eq!(control.call(Method::DELETE, id, "", None).await.0, StatusCode::NO_CONTENT, "{id}");
        assert_eq!(control.get(id).await.0, StatusCode::NOT_FOUND, "{id}");
    }
    for node in &cluster.nodes {
        assert_eq!(node.query(&["DBSIZE"]).unwrap().int(), Some(0), "127.0.0.1:{}", node.port());
    }
    eprintln!("cluster (3 primaries): whole test {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_primary_failover_keeps_every_acknowledged_record() {
    let started = Instant::now();
    let mut cluster = blocking(|| RedisCluster::start(3, 1)).expect("a 3+3 Redis Cluster");
    let control = Arc::new(Control::start(&cluster.url(), &["--redis-wait-replicas", "1", "--redis-wait-timeout-ms", WAIT_TIMEOUT_MS]).await);
    assert_eq!(control.ready().await, StatusCode::OK);

    let mut acknowledged = Vec::new();
    for i in 0..30 {
        let id = format!("fo-{i}");
        let (status, record) = control.put(&id, record_body(i, 1), Some(0)).await;
        assert_eq!(status, StatusCode::CREATED, "{record}");
        acknowledged.push((id, record));
    }

    // Kill the primary of fo-0's slot (SIGKILL by pid); its replica takes over.
    let slot_of = |cluster: &RedisCluster, id: &str| cluster.keyslot(&record_key(PREFIX, &SessionId::parse(id).unwrap())).unwrap();
    let slot = slot_of(&cluster, "fo-0");
    let survivor = cluster.nodes.iter().map(|n| n.port()).find(|p| cluster.primary_port_of_slot(*p, slot).unwrap() != *p).unwrap();
    let victim = cluster.primary_port_of_slot(survivor, slot).unwrap();
    let pid = cluster.node_mut(victim).pid().expect("primary runs");
    cluster.node_mut(victim).kill();
    let killed_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(control.clone(), "fo-0", stop.clone());
    let new_primary = blocking(|| cluster.wait_for_new_primary(slot, victim, Duration::from_secs(25))).expect("the replica takes over");
    let failover = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = watcher.await.unwrap();

    let failures_after = get_until_ok(&control, "fo-0", 30).await;
    for (id, expected) in &acknowledged {
        let (status, got) = control.get(id).await;
        assert_eq!(status, StatusCode::OK, "{id} lost in the failover");
        assert_eq!(&got, expected, "{id} changed in the failover");
    }

    // Slots whose primary still has a replica take acknowledged writes.
    let other = (0..200)
        .map(|i| format!("other-{i}"))
        .find(|id| cluster.primary_port_of_slot(survivor, slot_of(&cluster, id)).unwrap() != new_primary)
        .unwrap();
    let (status, created) = control.put(&other, record_body(3000, 1), Some(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // The promoted primary has no replica yet: WAIT 1 fails there.
    let (status, _) = control.put("fo-0", record_body(3001, 2), Some(1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // The old primary comes back (same port and cluster configuration) as a replica of
    // the new one: writes to that slot are acknowledged again.
    blocking(|| {
        cluster.node_mut(victim).restart()?;
        cluster.wait_healthy(Duration::from_secs(20))?;
        mcp_affinity_harness::fixtures::redis::wait_replicas_online(new_primary, 1, Duration::from_secs(20))
    })
    .expect("the old primary rejoins as a replica");
    let (status, replaced) = control.put("fo-0", record_body(3002, 3), Some(2)).await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(control.ready().await, StatusCode::OK);

    let unavailable = during.iter().filter(|s| **s != StatusCode::OK).count();
    eprintln!(
        "cluster (3+3): primary pid {pid} killed; replica promoted after {failover:?}; {unavailable} of {} requests \
         answered 503 meanwhile, {failures_after} after; whole test {:?}",
        during.len(),
        started.elapsed()
    );
}
