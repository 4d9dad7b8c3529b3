//! End-to-end transparent recovery: demo pods + Envoy (filter) + control with an
//! endpoint list. A pinned pod that dies, restarts in place, or answers like a
//! TypeScript-SDK server is recovered without the client seeing an error or a new id.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::demo_server::GENUINE_BAD_REQUEST_BODY;
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, initializations, sessions_on};
use mcp_affinity_harness::fixtures::redis::RedisServer;
use mcp_affinity_harness::mcp_client::{self, Session};
use serde_json::json;

fn addrs(pods: &[Pod]) -> Vec<SocketAddr> {
    pods.iter().map(|p| p.addr).collect()
}

fn control_for(pods: &[Pod], store: &str) -> ControlService {
    let endpoints = addrs(pods).iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    ControlService::start_with(store, &["--endpoints".into(), endpoints]).unwrap()
}

fn proxy_for(pods: &[Pod], control: &ControlService) -> Proxy {
    Proxy::start(
        &addrs(pods),
        control.proxy_options(ControlService::filter_config("")),
    )
    .unwrap()
}

fn start_pods(n: usize, flags: &[&str]) -> Vec<Pod> {
    (0..n).map(|i| Pod::start_with(&format!("pod-{i}"), flags).unwrap()).collect()
}

/// Issue scenario 1 (+7): the pod holding 10 sessions is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_pinned_pod_moves_each_session_once() {
    let mut pods = start_pods(3, &[]);
    let control = control_for(&pods, "memory");
    let proxy = proxy_for(&pods, &control);
    let (victims, others) = sessions_on(&proxy, "pod-0", 10).await;
    pods[0].kill();
    for s in &victims {
        let moved = s.whoami_keeping_id().await;
        assert_ne!(moved, "pod-0");
        assert_eq!(s.whoami_keeping_id().await, moved, "stays on its new pod");
        assert_eq!(s.echo("still here").await.unwrap(), "still here");
    }
    assert_eq!(control.reinitializations().await, 10.0, "exactly one re-initialization per session");
    assert_eq!(proxy.metric("recoveries_replayed").await.unwrap(), 10);
    assert_eq!(initializations(&pods[1..]).await, others as u64 + 10, "the live pods saw their own sessions and the 10 moves");
}

/// Restarts in place (same address, sessions lost) the pod holding `expected` sessions
/// (others elsewhere); each is recovered once, through the pods' way of saying "session
/// unknown".
async fn restart_in_place_recovers(pod_flags: &[&str], victim: usize, expected: usize) {
    let mut pods = start_pods(2, pod_flags);
    let control = control_for(&pods, "memory");
    let proxy = proxy_for(&pods, &control);
    let (victims, others) = sessions_on(&proxy, &format!("pod-{victim}"), expected).await;
    pods[victim].restart().unwrap();
    for s in &victims {
        let now = s.whoami_keeping_id().await;
        assert_eq!(s.whoami_keeping_id().await, now);
    }
    assert_eq!(control.reinitializations().await, expected as f64);
    // The lost sessions were re-created once each; nobody else was.
    assert_eq!(initializations(&pods).await, (others + expected) as u64);
}

/// Issue scenario 2: a pod restarts in place: the 404 path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_restarted_in_place_is_recovered_via_404() {
    restart_in_place_recovers(&[], 0, 3).await;
}

/// Issue scenario 3: TypeScript-SDK style servers answer unknown sessions with
/// 400 / -32000 "Bad Request: No valid session ID provided".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ts_sdk_style_session_errors_are_recovered() {
    restart_in_place_recovers(&["--unknown-session", "ts-sdk"], 1, 2).await;
}

/// Two pods, control and a proxy; one session pinned to pod-0, which is then killed.
async fn one_session_on_a_dead_pod() -> (Vec<Pod>, ControlService, Proxy, Session, usize) {
    // (also returns how many sessions landed on the live pod meanwhile)
    let mut pods = start_pods(2, &[]);
    let control = control_for(&pods, "memory");
    let proxy = proxy_for(&pods, &control);
    let (victims, others) = sessions_on(&proxy, "pod-0", 1).await;
    let s = victims.into_iter().next().unwrap();
    pods[0].kill();
    (pods, control, proxy, s, others)
}

/// Issue scenario 4: 20 concurrent requests of one session hit a dead pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_to_a_dead_pod_reinitialize_once() {
    let (pods, control, _proxy, s, others) = one_session_on_a_dead_pod().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone(); // clones share the JSON-RPC id counter
            tokio::spawn(async move { s.echo(&format!("m{i}")).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), format!("m{i}"));
    }
    assert_eq!(control.reinitializations().await, 1.0);
    assert_eq!(s.whoami_keeping_id().await, "pod-1");
    assert_eq!(initializations(&pods[1..]).await, others as u64 + 1, "its own sessions and the one move");
}

/// A genuine 400 on a live session — JSON-RPC -32000 whose message even mentions the
/// session — reaches the client untouched: Envoy gives the filter no body before the
/// headers are decided, so control probes the pinned pod, finds the session alive, and
/// the held answer goes on. Nothing is re-initialized or replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_genuine_400_on_a_live_session_passes_through_untouched() {
    let pods = start_pods(2, &["--unknown-session", "ts-sdk"]);
    let control = control_for(&pods, "memory");
    let proxy = proxy_for(&pods, &control);
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    let origin = s.whoami().await.unwrap();
    let call = json!({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}});
    let r = s.post_raw(&[("x-demo-reject", "1")], serde_json::to_vec(&call).unwrap()).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.text(), GENUINE_BAD_REQUEST_BODY, "the pod's own answer, byte for byte");
    assert_eq!(proxy.metric("sessions_verified").await.unwrap(), 1);
    assert_eq!(control.reinitializations().await, 0.0);
    assert_eq!(initializations(&pods).await, 1);
    assert_eq!(s.whoami().await.unwrap(), origin);
}

/// Issue scenario 5: two proxies, one Redis-backed control; B holds a stale pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_proxy_with_a_stale_pin_does_not_reinitialize_again() {
    let redis = RedisServer::start().unwrap();
    let mut pods = start_pods(2, &[]);
    let control = control_for(&pods, &redis.url());
    let a = proxy_for(&pods, &control);
    let b = proxy_for(&pods, &control);
    let (victims, _) = sessions_on(&a, "pod-0", 1).await;
    let via_a = victims.into_iter().next().unwrap();
    let via_b = Session::with_id(&b.url(), &via_a.session_id);
    assert_eq!(via_b.whoami_keeping_id().await, "pod-0", "B learned the pin from control");
    pods[0].kill();
    assert_eq!(via_a.whoami_keeping_id().await, "pod-1", "A recovers");
    assert_eq!(via_b.whoami_keeping_id().await, "pod-1", "B recovers onto the same pod");
    assert_eq!(control.reinitializations().await, 1.0, "B's recovery found the newer generation");
    assert_eq!(b.metric("recoveries_replayed").await.unwrap(), 1);
}

/// A fake upstream that reads one request and closes the connection without answering:
/// the connection resets after the request was sent.
fn black_hole() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))).unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            let _ = c.flush();
            drop(c); // closed without a response
        }
    });
    addr
}

/// Issue scenario 6: a `tools/call` whose connection resets after it was sent is not
/// replayed; the client gets the documented error and its next call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tools_call_reset_after_sending_is_not_replayed() {
    let pods = start_pods(2, &[]);
    let control = control_for(&pods, "memory");
    let mut proxy = proxy_for(&pods, &control);
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    s.whoami().await.unwrap();
    // Point the session at an upstream that resets after reading the request.
    let (_, record) = control.get_session(&s.session_id).await.unwrap();
    let mut moved = record.clone();
    moved["upstream"] = json!(black_hole().to_string());
    let put: serde_json::Map<String, serde_json::Value> = ["backend_session_id", "upstream", "generation", "initialize", "initialized", "protocol_version"]
        .iter()
        .map(|k| (k.to_string(), moved[*k].clone()))
        .collect();
    let r = reqwest::Client::new()
        .put(format!("{}/v1/sessions/{}", control.base_url(), s.session_id))
        .bearer_auth(TEST_TOKEN)
        .json(&put)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    proxy.restart().unwrap(); // forget the cached pin: the next request looks up control

    let err = s.echo("did this run?").await.unwrap_err();
    assert_eq!(err.jsonrpc_code(), Some(-32003), "outcome unknown, not replayed: {err}");
    assert_eq!(proxy.metric("recoveries_not_replayed").await.unwrap(), 1);
    // The session was re-pinned: the next call works.
    let now = s.whoami_keeping_id().await;
    assert!(now.starts_with("pod-"), "{now}");
    let names: HashSet<_> = [s.whoami_keeping_id().await, now].into();
    assert_eq!(names.len(), 1);
}

/// GET streams are not replayed: a GET whose pod is gone is answered with an SSE stream
/// that ends at once (`retry:` set), carrying the client's own session id, so a standard
/// client opens its GET stream again — on the new pod, since the session is re-pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_get_stream_to_a_dead_pod_is_answered_so_the_client_reopens_it() {
    let (_pods, control, proxy, s, _) = one_session_on_a_dead_pod().await;
    let mut headers = s.default_headers();
    headers.insert("accept", "text/event-stream".parse().unwrap());
    let r = mcp_client::send_raw(&mcp_client::http_client(), reqwest::Method::GET, &s.url, &headers, bytes::Bytes::new()).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.is_sse(), "{:?}", r.headers);
    assert!(r.text().contains("retry:"), "{}", r.text());
    assert_eq!(r.header("mcp-session-id"), Some(s.session_id.as_str()));
    assert_eq!(proxy.metric("recoveries_not_replayed").await.unwrap(), 1);
    // Re-pinned: the next request (and a reopened GET) goes to the live pod.
    assert_eq!(s.whoami_keeping_id().await, "pod-1");
    assert_eq!(control.reinitializations().await, 1.0);
}
