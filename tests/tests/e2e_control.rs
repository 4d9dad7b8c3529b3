//! End-to-end: pins outlive the proxy and are shared by several proxies through the
//! control service (issue: filter ↔ control write-through and lookup).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mcp_affinity_harness::fixtures::control::ControlService;
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions, initializations, pods};
use mcp_affinity_harness::fixtures::redis::RedisServer;
use mcp_affinity_harness::mcp_client::{self, Session};
use mcp_affinity_harness::rmcp_client::RmcpClient;

fn addrs(pods: &[Pod]) -> Vec<std::net::SocketAddr> {
    pods.iter().map(|p| p.addr).collect()
}

fn with_control(control: &ControlService) -> ProxyOptions {
    control.proxy_options(ControlService::filter_config(""))
}

/// The acceptance case: initialize, restart Envoy, 5 requests → all on the original pod,
/// found through control (embedded store), with no re-initialization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_envoy_restart() {
    survive_a_restart("memory").await;
}

/// The same with control on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_envoy_restart_with_redis() {
    let redis = RedisServer::start().unwrap();
    survive_a_restart(&redis.url()).await;
}

async fn survive_a_restart(store: &str) {
    let pods = pods(2).unwrap();
    let control = ControlService::start(store).unwrap();
    let mut proxy = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    let origin = s.whoami().await.unwrap();

    // The record reaches control with the initialize body, the initialized notification
    // and the protocol version. Both writes are asynchronous to the client (the
    // `initialize` write by design; the notification's because the pod may answer 202
    // before it has the body), so wait for them, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let (status, record) = control.get_session(&s.session_id).await.unwrap();
        if status == 200 && record["initialized"].is_string() {
            break record;
        }
        assert!(Instant::now() < deadline, "the record never had `initialized`: {status} {record}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(record["initialize"].as_str().unwrap().contains("\"initialize\""), "{record}");
    assert!(record["initialized"].as_str().unwrap().contains("notifications/initialized"), "{record}");
    assert_eq!(record["protocol_version"], "2025-06-18");
    // The `initialize` write is made as its stream ends; its answer reaches the root
    // context, which counts it (with the `initialized` update: 2 writes).
    assert_eq!(proxy.metric_reaching("control_writes", 2).await.unwrap(), 2);

    proxy.restart().unwrap(); // shared data is gone
    for i in 0..5 {
        assert_eq!(s.whoami().await.unwrap(), origin, "request {i} after the restart");
    }
    assert_eq!(proxy.metric("control_lookups").await.unwrap(), 1, "one lookup, then shared data");
    assert_eq!(proxy.metric("control_hits").await.unwrap(), 1);
    assert_eq!(proxy.metric("unknown_session").await.unwrap(), 0);
    assert_eq!(initializations(&pods).await, 1, "the restart and the lookup re-initialized nothing");
}

/// The same without control: after the restart the session is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_control_a_proxy_restart_loses_the_session() {
    let pods = pods(2).unwrap();
    let mut proxy = Proxy::start(&addrs(&pods), ProxyOptions::default()).unwrap();
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    s.whoami().await.unwrap();
    proxy.restart().unwrap();
    let err = s.whoami().await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
}

/// Two proxies share one Redis-backed control: sessions initialized through A continue
/// through B and alternate A/B, with zero errors and a stable `whoami`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_share_sessions_through_redis() {
    let redis = RedisServer::start().unwrap();
    let pods = pods(3).unwrap();
    let control = ControlService::start(&redis.url()).unwrap();
    let a = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    let b = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    let (url_a, url_b) = (a.url(), b.url());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (url_a, url_b) = (url_a.clone(), url_b.clone());
            tokio::spawn(async move {
                let s = mcp_client::connect(&url_a).await.expect("initialize through A");
                let origin = s.whoami().await.expect("whoami through A");
                let mut names = HashSet::new();
                for i in 0..6 {
                    let via = Session::with_id(if i % 2 == 0 { &url_b } else { &url_a }, &s.session_id);
                    names.insert(via.whoami().await.unwrap_or_else(|e| panic!("request {i}: {e}")));
                }
                assert_eq!(names, HashSet::from([origin]), "whoami moved");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.metric("unknown_session").await.unwrap(), 0);
    assert_eq!(b.metric("control_hits").await.unwrap(), b.metric("control_lookups").await.unwrap());
    assert!(b.metric("control_lookups").await.unwrap() >= 20, "B learned the sessions from control");
    assert_eq!(initializations(&pods).await, 20, "sharing re-initialized nothing");
}

/// Many requests of one session at once after a restart: at most one control lookup per
/// worker VM (the fixture runs Envoy with --concurrency 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_after_a_restart_share_lookups() {
    let pods = pods(2).unwrap();
    let control = ControlService::start("memory").unwrap();
    let mut proxy = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    let origin = s.whoami().await.unwrap();
    // The record's write is asynchronous: restart only once control has it.
    assert_eq!(control.get_session(&s.session_id).await.unwrap().0, 200);
    proxy.restart().unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            // Clones share the JSON-RPC id counter: ids stay unique within the session.
            let s = s.clone();
            tokio::spawn(async move { s.echo(&format!("hello {i}")).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(s.whoami().await.unwrap(), origin);
    let lookups = proxy.metric("control_lookups").await.unwrap();
    assert!((1..=2).contains(&lookups), "{lookups} lookups for one session on 2 workers");
    assert_eq!(initializations(&pods).await, 1);
}

/// Control stops mid-test: cached pins keep working, new sessions still initialize, and
/// nothing hangs past the configured timeout; a silent control (no answer) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_down_or_silent_does_not_break_traffic() {
    let pods = pods(2).unwrap();
    let mut control = ControlService::start("memory").unwrap();
    // The log is flushed at once, so that it can be read for panics below.
    let flushed = ProxyOptions { extra: vec!["--file-flush-interval-msec".into(), "1".into()], ..with_control(&control) };
    let proxy = Proxy::start(&addrs(&pods), flushed).unwrap();
    let cached = mcp_client::connect(&proxy.url()).await.unwrap();
    let origin = cached.whoami().await.unwrap();

    control.kill();
    // The root context's calls to control fail now (the draining-list poll, every second;
    // Envoy's HTTP client answers a refused connection with a local 503). The filter counts
    // them and does not panic (a panic kills the VM).
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.metric("drain_poll_errors").await.unwrap() < 2 {
        assert!(Instant::now() < deadline, "no failed draining-list poll was seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!proxy.log().contains("panicked"), "the filter panicked on a failed call:\n{}", proxy.log());
    let start = Instant::now();
    assert_eq!(cached.whoami().await.unwrap(), origin, "cached pin still routes");
    let fresh = mcp_client::connect(&proxy.url()).await.expect("initialize without control");
    let fresh_origin = fresh.whoami().await.unwrap();
    assert_eq!(fresh.whoami().await.unwrap(), fresh_origin, "pinned from shared data");
    // Unknown session while control is down: passed through unpinned at once (a refused
    // connection), so the pod itself answers.
    forwarded_unpinned_by_the_pod(&proxy, "unknown-while-control-is-down").await;
    assert!(start.elapsed() < Duration::from_secs(10), "requests hung: {:?}", start.elapsed());

    // A control that accepts connections and never answers: control.timeout_ms applies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_proxy = Proxy::start(
        &addrs(&pods),
        ProxyOptions { clusters: vec![("mcp_affinity_control".into(), silent.local_addr().unwrap())], ..with_control(&control) },
    )
    .unwrap();
    let start = Instant::now();
    let s = mcp_client::connect(&silent_proxy.url()).await.expect("initialize with a silent control");
    let o = s.whoami().await.unwrap();
    assert_eq!(s.whoami().await.unwrap(), o);
    // A lookup waits for the silent control until the timeout, then goes on unpinned. (The
    // initialize write is asynchronous: its failure is not waited for, and it is not
    // counted once the stream it came from has ended.)
    forwarded_unpinned_by_the_pod(&silent_proxy, "unknown-with-a-silent-control").await;
    assert!(start.elapsed() < Duration::from_secs(10), "requests hung: {:?}", start.elapsed());
}

/// A request of session `id`, unknown to `proxy`'s shared data, while control cannot answer
/// (down, or silent past `control.timeout_ms`, 1000 ms in these fixtures, the shipped value: control
/// itself may wait 250 ms for a record still being written): the filter gives
/// up on control within that timeout and forwards it unpinned, so the answer is the pod's
/// own `404` (not the filter's JSON-RPC one), `control_errors` and `requests_unpinned` rise.
async fn forwarded_unpinned_by_the_pod(proxy: &Proxy, id: &str) {
    let errors = proxy.metric("control_errors").await.unwrap();
    let unpinned = proxy.metric("requests_unpinned").await.unwrap();
    let t = Instant::now();
    let r = Session::with_id(&proxy.url(), id).post_raw(&[], r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).await.unwrap();
    let took = t.elapsed();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (404, mcp_affinity_harness::demo_server::SPEC_UNKNOWN_SESSION_BODY), "the pod's own answer");
    // The filter's part is bounded by control.timeout_ms; the margin covers a loaded machine.
    assert!(took < Duration::from_millis(1000) + Duration::from_secs(2), "{id}: took {took:?}, control.timeout_ms is 1000");
    assert!(proxy.metric("control_errors").await.unwrap() > errors, "{id}: the failed lookup is counted");
    // Per-request counters reach Envoy once per tick (sweep_period_ms).
    assert!(proxy.metric_reaching("requests_unpinned", unpinned + 1).await.unwrap() > unpinned, "{id}: counted as unpinned");
}

/// A new session's record that control could not take (control down) is sent again on
/// the periodic tick, and reaches control once it is back: the session can then be found
/// through another proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_while_control_is_down_reach_it_when_it_is_back() {
    let pods = pods(2).unwrap();
    let mut control = ControlService::start("memory").unwrap();
    // Retries come every sweep_period_ms: 4 of them leave 12 s to bring control back.
    let options = ProxyOptions { filter_config: ControlService::filter_config(r#","sweep_period_ms":3000"#), ..with_control(&control) };
    let proxy = Proxy::start(&addrs(&pods), options).unwrap();
    control.kill();
    let s = mcp_client::connect(&proxy.url()).await.expect("initialize while control is down");
    let origin = s.whoami().await.unwrap();
    // At least once: another tick may retry again before this read (the record is retried
    // every sweep_period_ms, up to 5 times).
    assert!(proxy.metric_reaching("control_write_retries", 1).await.unwrap() >= 1, "the batch failed and waits for the periodic tick");
    assert_eq!(proxy.metric("control_writes").await.unwrap(), 0);
    control.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, record) = control.get_session(&s.session_id).await.unwrap();
        if status == 200 {
            let pod = pods.iter().find(|p| p.name == origin).unwrap();
            assert_eq!(record["upstream"], pod.addr.to_string(), "{record}");
            break;
        }
        assert!(Instant::now() < deadline, "the record never reached control: {status} {record}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.metric_reaching("control_writes", 1).await.unwrap(), 1);
    // Another proxy finds the session through control, on its pod.
    let other = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    assert_eq!(Session::with_id(&other.url(), &s.session_id).whoami().await.unwrap(), origin);
}

/// A session nobody knows gets 404 with a JSON-RPC error; the rmcp client re-initializes
/// on it and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sessions_get_404_and_rmcp_reinitializes() {
    let pods = pods(2).unwrap();
    let mut control = ControlService::start("memory").unwrap();
    let mut proxy = Proxy::start(&addrs(&pods), with_control(&control)).unwrap();
    let nobody = Session::with_id(&proxy.url(), "never-issued-anywhere");
    let err = nobody.whoami().await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
    assert_eq!(err.jsonrpc_code(), Some(-32001));

    let client = RmcpClient::connect(&proxy.url()).await.unwrap();
    client.whoami().await.unwrap();
    // Both writes (the batched record, `notifications/initialized`) answered: the proxy
    // has nothing left to send again, which would write the record into the new control.
    assert_eq!(proxy.metric_reaching("control_writes", 2).await.unwrap(), 2);
    // Forget the session everywhere: restart control (its embedded store empties) and the
    // proxy (its shared data empties).
    control.restart().unwrap();
    proxy.restart().unwrap();
    let again = client.whoami().await.expect("rmcp re-initializes after 404 and retries");
    assert!(!again.is_empty());
    assert_eq!(proxy.metric("unknown_session").await.unwrap(), 1);
    assert_eq!(proxy.metric("sessions_pinned").await.unwrap(), 1, "the new session is pinned");
    client.close().await.unwrap();
}

