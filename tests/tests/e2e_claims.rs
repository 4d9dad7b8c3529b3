//! README and docs/configuration.md claims that no other end-to-end test guards, each through
//! real Envoy: what the filter does with DELETE, with recovery turned off, with
//! `unknown_session: pass_through`, and with a client's pin header where no early header
//! mutation strips it first (the Istio shape, as under a `WasmPlugin`).

use mcp_affinity_harness::demo_server::SPEC_UNKNOWN_SESSION_BODY;
use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions, initializations, sessions_on};

const TOOLS_LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

/// Two pods, control with them as its endpoints, and Envoy on `envoy/envoy.yaml` whose
/// filter configuration adds `extra` to the control fixture's.
fn mesh(extra: &str) -> (Vec<Pod>, ControlService, Proxy) {
    mesh_with(&ControlService::filter_config(extra), |_| true)
}

/// The control fixture's plugin configuration with `fields` added to its `control` object.
fn with_control_fields(fields: &str) -> String {
    format!(r#"{{"control":{{"cluster":"mcp_affinity_control","token_env":"MCP_AFFINITY_CONTROL_TOKEN","timeout_ms":1000{fields}}}}}"#)
}

/// Two pods, control with the pods `endpoint` accepts (by index) as its `--endpoints`, and
/// Envoy on `envoy/envoy.yaml` with the plugin configuration `config`.
fn mesh_with(config: &str, endpoint: impl Fn(usize) -> bool) -> (Vec<Pod>, ControlService, Proxy) {
    let pods: Vec<Pod> = (0..2).map(|i| Pod::start(&format!("pod-{i}")).unwrap()).collect();
    let endpoints = pods.iter().enumerate().filter(|(i, _)| endpoint(*i)).map(|(_, p)| p.addr.to_string()).collect::<Vec<_>>().join(",");
    let control = ControlService::start_with("memory", &["--endpoints".into(), endpoints]).unwrap();
    let proxy = proxy_for(&pods, &control, config);
    (pods, control, proxy)
}

fn proxy_for(pods: &[Pod], control: &ControlService, config: &str) -> Proxy {
    Proxy::start(
        &pods.iter().map(|p| p.addr).collect::<Vec<_>>(),
        control.proxy_options(config.to_string()),
    )
    .unwrap()
}

/// Sends `session`'s requests until `proxy` counts a failed drain move: each must be served
/// by `pod` (the draining pod still serves). The draining list reaches each worker VM on its
/// own tick, so the first requests may still find no drain in their VM's copy.
async fn served_by_the_draining_pod_until_a_move_fails(proxy: &Proxy, session: &mcp_affinity_harness::mcp_client::Session, pod: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        assert_eq!(session.whoami_keeping_id().await, pod, "served by the draining pod");
        if proxy.metric("drain_moves_failed").await.unwrap() >= 1 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no drain move was tried within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Both worker VMs of `proxy` (`--concurrency 2`) adopted a change of the draining list.
async fn both_vms_adopted_the_drain(proxy: &Proxy) {
    let adopted = proxy.metric_reaching("drain_list_updates", 2).await.unwrap();
    assert!(adopted >= 2, "the worker VMs did not adopt the draining list: {adopted} updates");
}

/// "DELETE is never recovered": the pinned pod is gone; the DELETE gets the router's 503,
/// control re-initializes nothing, and the pin stays (a later request is recovered).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_to_a_dead_pod_is_not_recovered() {
    let (mut pods, control, proxy) = mesh("");
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    let s = &victims[0];
    pods[0].kill();
    let r = s.delete().await.unwrap();
    assert_eq!(r.status, 503, "the router's answer, not a recovery: {}", r.text());
    assert_eq!(control.reinitializations().await, 0.0, "DELETE is never recovered");
    assert_eq!(proxy.metric("sessions_forgotten").await.unwrap(), 0, "a failed DELETE keeps the pin");
    assert_ne!(s.whoami_keeping_id().await, "pod-0", "the next request is recovered");
    assert_eq!(control.reinitializations().await, 1.0);
}

/// "A 2xx (or 404) answer to DELETE forgets the pin (and the control record)": the pod
/// restarted in place and answers 404; the session is forgotten here and in control, so its
/// next request is the filter's own 404 and nothing is re-initialized.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_answered_404_forgets_the_session() {
    let (mut pods, control, proxy) = mesh("");
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    let s = &victims[0];
    pods[0].restart().unwrap();
    let r = s.delete().await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(proxy.metric("sessions_forgotten").await.unwrap(), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while control.get_session(&s.session_id).await.unwrap().0 != 404 {
        assert!(std::time::Instant::now() < deadline, "control still has the record");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let next = s.post_raw(&[], TOOLS_LIST).await.unwrap();
    assert_eq!(next.status, 404);
    assert_eq!(next.json().unwrap()["error"]["code"], -32001, "the filter's own answer: {}", next.text());
    assert_eq!(control.reinitializations().await, 0.0);
}

/// `recovery.enabled: false`: a request to a dead pod gets the router's 503; nothing is
/// re-initialized.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_turned_off_recovers_nothing() {
    let (mut pods, control, proxy) = mesh(r#","recovery":{"enabled":false}"#);
    let (victims, others) = sessions_on(&proxy, "pod-0", 1).await;
    pods[0].kill();
    let r = victims[0].post_raw(&[], TOOLS_LIST).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(control.reinitializations().await, 0.0);
    assert_eq!(proxy.metric("recoveries_replayed").await.unwrap(), 0);
    assert_eq!(initializations(&pods[1..]).await, others as u64, "no session was moved");
}

/// `unknown_session: pass_through`: a session id nobody knows is forwarded unpinned, and the
/// pod answers it (its own 404), not the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pass_through_forwards_an_unknown_session_to_a_pod() {
    let (_pods, _control, proxy) = mesh(r#","unknown_session":"pass_through""#);
    let r = mcp_affinity_harness::mcp_client::Session::with_id(&proxy.url(), "nobody-knows-me").post_raw(&[], TOOLS_LIST).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (404, SPEC_UNKNOWN_SESSION_BODY), "the pod's own answer");
    assert_eq!(proxy.metric("unknown_session").await.unwrap(), 0);
    assert!(proxy.metric_reaching("requests_unpinned", 1).await.unwrap() >= 1, "counted as unpinned");
}

/// "Any client-sent pin header is removed" by the filter itself, where no early header
/// mutation strips it first (the Istio shape: a `WasmPlugin` gateway has none): `initialize`
/// requests that all name pod-1 in `x-session-pod` are load-balanced as usual (some land on
/// pod-0), and a pinned session's request that names pod-1 still reaches its own pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_filter_itself_removes_a_client_s_pin_header() {
    use base64::Engine as _;
    let pods: Vec<Pod> = (0..2).map(|i| Pod::start(&format!("pod-{i}")).unwrap()).collect();
    let proxy = Proxy::start(
        &pods.iter().map(|p| p.addr).collect::<Vec<_>>(),
        ProxyOptions { filter_config: r#"{"pin_encoding":"base64"}"#.into(), istio: true, ..Default::default() },
    )
    .unwrap();
    let pod1 = base64::engine::general_purpose::STANDARD.encode(pods[1].addr.to_string());
    let spoof = [("x-session-pod", pod1.as_str())];
    // Each Envoy worker round-robins over both pods: of 6 new sessions, a worker that takes
    // two or more sends one to pod-0.
    let mut landed = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let s = mcp_affinity_harness::mcp_client::initialize_with(&proxy.url(), mcp_affinity_harness::mcp_client::DEFAULT_PROTOCOL_VERSION, &spoof).await.unwrap();
        s.notify_initialized().await.unwrap();
        landed.insert(s.whoami_keeping_id().await);
    }
    assert!(landed.contains("pod-0"), "every initialize went where the client's header said: {landed:?}");
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#;
    let r = victims[0].post_raw(&spoof, body).await.unwrap();
    let text = r.messages().into_iter().find_map(|m| m["result"]["content"][0]["text"].as_str().map(str::to_string));
    assert_eq!(text.as_deref(), Some("pod-0"), "a pinned request went where the client's header said: {}", r.text());
    assert_eq!(proxy.metric("client_pin_header_removed").await.unwrap(), 6 + 1, "the 6 initialize requests and the pinned request carried it");
}

/// `session_ttl_secs`: an idle pin is removed by the root context's sweep on the tick
/// (`sessions_expired`); without control, the session's next request is then unknown
/// (404, the MCP signal to start anew). Small numbers so that one tick sweeps every bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_pin_expires_through_the_sweep() {
    let pods: Vec<Pod> = (0..2).map(|i| Pod::start(&format!("pod-{i}")).unwrap()).collect();
    // local_pins 0: every request reads shared data (a worker VM's own copy may serve an idle
    // pin until its own clock, refreshed on its tick, passes the TTL).
    let config = r#"{"session_ttl_secs":2,"touch_interval_secs":1,"sweep_period_ms":100,"shared_data_buckets":64,"local_pins":0}"#;
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions { filter_config: config.into(), ..Default::default() }).unwrap();
    let s = mcp_affinity_harness::mcp_client::connect(&proxy.url()).await.unwrap();
    let pod = s.whoami_keeping_id().await;
    assert_eq!(s.whoami_keeping_id().await, pod, "pinned");
    assert_eq!(proxy.metric("sessions_expired").await.unwrap(), 0);
    // Idle past the TTL (2 s, in whole seconds of the VM's clock): the sweep removes it.
    assert!(proxy.metric_reaching("sessions_expired", 1).await.unwrap() >= 1, "the sweep removed no pin");
    let r = s.post_raw(&[], TOOLS_LIST).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], -32001, "the filter's own answer: the pin is gone");
}

/// `control.drain_poll_ms: 0` turns drain moves off: while another Envoy on the same control
/// adopts the draining list, this one never fetches it and keeps its sessions where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_poll_ms_zero_turns_drain_moves_off() {
    let (pods, control, off) = mesh_with(&with_control_fields(r#","drain_poll_ms":0"#), |_| true);
    let on = proxy_for(&pods, &control, &ControlService::filter_config(""));
    let (victims, _) = sessions_on(&off, "pod-0", 1).await;
    assert_eq!(control.drain(pods[0].addr, false).await.unwrap(), 200);
    both_vms_adopted_the_drain(&on).await;
    // Two more poll periods (1 s each): an Envoy that polled would have adopted it by now.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(victims[0].whoami_keeping_id().await, "pod-0", "not moved");
    assert_eq!((off.metric("drain_list_updates").await.unwrap(), off.metric("sessions_moved_by_drain").await.unwrap()), (0, 0));
}

/// A drain move control cannot make (no live, non-draining endpoint: `stayed`) leaves the
/// session on its draining pod, which still serves, and is counted (`drain_moves_failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_move_that_cannot_be_made_stays_on_the_draining_pod() {
    let (pods, control, proxy) = mesh_with(&ControlService::filter_config(""), |i| i == 0);
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    assert_eq!(control.drain(pods[0].addr, false).await.unwrap(), 200);
    both_vms_adopted_the_drain(&proxy).await;
    served_by_the_draining_pod_until_a_move_fails(&proxy, &victims[0], "pod-0").await;
    assert_eq!(proxy.metric("sessions_moved_by_drain").await.unwrap(), 0);
}

/// A drain move while control is down: the request goes to the draining pod, which still
/// serves (`drain_moves_failed`); nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_move_with_control_down_goes_to_the_draining_pod() {
    let (pods, mut control, proxy) = mesh("");
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    assert_eq!(control.drain(pods[0].addr, false).await.unwrap(), 200);
    both_vms_adopted_the_drain(&proxy).await;
    control.kill();
    served_by_the_draining_pod_until_a_move_fails(&proxy, &victims[0], "pod-0").await;
}

/// Control unreachable during a recovery: the pod's own answer goes to the client unchanged
/// (here the 404 of a pod restarted in place), and the failed call is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_without_control_passes_the_pod_s_answer_through() {
    let (mut pods, mut control, proxy) = mesh("");
    let (victims, _) = sessions_on(&proxy, "pod-0", 1).await;
    pods[0].restart().unwrap();
    control.kill();
    let errors = proxy.metric("control_errors").await.unwrap();
    let r = victims[0].post_raw(&[], TOOLS_LIST).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (404, SPEC_UNKNOWN_SESSION_BODY), "the pod's own answer");
    assert!(proxy.metric("control_errors").await.unwrap() > errors);
}

/// `initialize_write: sync`: the record is in control when the client has the `initialize`
/// answer (a lookup that does not wait finds it). With `async` (the default) it would wait in
/// the VM for the next flush (`record_flush_ms`), and a lookup right after the answer would
/// mostly miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initialize_write_sync_records_before_the_answer() {
    let no_wait = |control: &ControlService, id: &str| {
        let url = format!("{}/v1/sessions/{id}", control.base_url());
        async move { reqwest::Client::new().get(url).bearer_auth(TEST_TOKEN).send().await.unwrap().status().as_u16() }
    };
    let (_pods, control, proxy) = mesh_with(&with_control_fields(r#","initialize_write":"sync""#), |_| true);
    for _ in 0..3 {
        let s = mcp_affinity_harness::mcp_client::initialize(&proxy.url()).await.unwrap();
        assert_eq!(no_wait(&control, &s.session_id).await, 200, "sync: recorded before the answer");
    }
}

/// `max_body_bytes` with control: a POST body over it passes through uninspected
/// (`body_too_large`); the session it opens still works and is pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_body_over_max_body_bytes_passes_through_uninspected() {
    let (_pods, _control, proxy) = mesh(r#","max_body_bytes":64"#);
    let s = mcp_affinity_harness::mcp_client::connect(&proxy.url()).await.unwrap();
    assert_eq!(proxy.metric("body_too_large").await.unwrap(), 1, "the initialize body (over 64 bytes) was not read");
    assert_eq!(proxy.metric("initialize_seen").await.unwrap(), 0);
    let pod = s.whoami_keeping_id().await;
    assert_eq!(s.whoami_keeping_id().await, pod, "pinned all the same");
}
