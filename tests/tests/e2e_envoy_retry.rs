//! End-to-end recovery through Envoy's own retry (`recovery.replay_by: envoy_retry`,
//! `envoy/envoy-stateful-session.yaml`): demo pods at priority 0 of `mcp_service`, control's
//! replay listener at priority 1. A request of a session whose pod is gone (connect
//! failure) or has lost the session (404) is retried once by Envoy, body included, to
//! control, which re-initializes the session on a live pod and replays the request; the
//! filter learns the new pin from control's answer and never copies a request body. The
//! client keeps its session id and sees no error.


use mcp_affinity_harness::fixtures::control::ControlService;
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions, initializations, sessions_on};
use mcp_affinity_harness::mcp_client::Session;
use std::path::Path;

use mcp_affinity_harness::fixtures::replay_listener::ReplayListener;

/// Envoy's count of retries on the pods' cluster (each went to control).
const RETRIES: &str = "cluster.mcp_service.upstream_rq_retry";

struct Mesh {
    pods: Vec<Pod>,
    control: ControlService,
    replay: ReplayListener,
    proxy: Proxy,
}

impl Mesh {
    /// Another Envoy in front of the same pods and control (shared data of its own).
    fn another_proxy(&self) -> Proxy {
        proxy_for(&self.pods, &self.control, &self.replay)
    }
}

/// Envoy on the stateful-session bootstrap, the filter replaying through Envoy's retry.
fn proxy_for(pods: &[Pod], control: &ControlService, replay: &ReplayListener) -> Proxy {
    let config = ControlService::filter_config(r#","pin_encoding":"base64","recovery":{"replay_by":"envoy_retry"}"#);
    Proxy::start(
        &pods.iter().map(|p| p.addr).collect::<Vec<_>>(),
        ProxyOptions { replay: Some(replay.clone()), ..control.proxy_options(config) },
    )
    .unwrap()
}

/// `n` demo pods, control (memory store, the pods as its endpoints, a replay listener) and
/// Envoy on the stateful-session bootstrap with the filter replaying through Envoy's retry.
fn mesh(n: usize) -> Mesh {
    let pods: Vec<Pod> = (0..n).map(|i| Pod::start(&format!("pod-{i}")).unwrap()).collect();
    let endpoints = pods.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",");
    let replay = ReplayListener::new().unwrap();
    let mut args = vec!["--endpoints".to_string(), endpoints];
    args.extend(replay.control_args());
    let control = ControlService::start_with("memory", &args).unwrap();
    let proxy = proxy_for(&pods, &control, &replay);
    Mesh { pods, control, replay, proxy }
}

/// The pinned pod is killed: every session's next request is retried by Envoy to control,
/// which moves the session once; the requests after it go straight to the new pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pod_s_sessions_are_moved_by_envoy_s_retry_to_control() {
    let mut m = mesh(3);
    let (victims, others) = sessions_on(&m.proxy, "pod-0", 4).await;
    // Retries (and the pins they re-learn) before the kill: a pod's transient refusal under
    // load (a bodyless 4xx that closes the connection, seen on a loaded 2-core machine) is
    // retried to control like any other failure and answered there; only what the kill
    // causes is counted below.
    let before = m.proxy.stat(RETRIES).await.unwrap();
    let pins_before = m.proxy.metric("recovered_pins").await.unwrap();
    m.pods[0].kill();
    for s in &victims {
        let moved = s.whoami_keeping_id().await;
        assert_ne!(moved, "pod-0");
        assert_eq!(s.echo("still here").await.unwrap(), "still here");
        assert_eq!(s.whoami_keeping_id().await, moved, "stays on its new pod");
    }
    assert_eq!(m.control.reinitializations().await, 4.0, "exactly one re-initialization per session");
    assert_eq!(m.proxy.metric("recovered_pins").await.unwrap() - pins_before, 4, "the filter learned each new pin from control's answer");
    assert_eq!(m.proxy.stat(RETRIES).await.unwrap() - before, 4, "one retry per session: later requests went to the new pod directly");
    assert_eq!(m.proxy.metric("recovery_body_too_large").await.unwrap(), 0);
    assert_eq!(initializations(&m.pods[1..]).await, others as u64 + 4, "the live pods saw their own sessions and the 4 moves");
}

/// The pod restarts in place (same address, sessions lost) and answers 404: Envoy retries
/// the 404 to control, which finds the session unknown there and re-creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_restarted_in_place_is_recovered_from_its_404() {
    let mut m = mesh(2);
    let (victims, others) = sessions_on(&m.proxy, "pod-1", 2).await;
    let before = m.proxy.stat(RETRIES).await.unwrap();
    m.pods[1].restart().unwrap();
    for s in &victims {
        let now = s.whoami_keeping_id().await;
        assert_eq!(s.whoami_keeping_id().await, now);
    }
    assert_eq!(m.control.reinitializations().await, 2.0);
    assert_eq!(initializations(&m.pods).await, (others + 2) as u64, "each lost session re-created once, nobody else");
    assert_eq!(m.proxy.stat(RETRIES).await.unwrap() - before, 2);
}

/// 16 concurrent requests of one session hit its dead pod: Envoy retries each to control,
/// which re-initializes once and replays all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_session_reinitialize_it_once() {
    let mut m = mesh(2);
    let (victims, others) = sessions_on(&m.proxy, "pod-0", 1).await;
    let s = victims.into_iter().next().unwrap();
    m.pods[0].kill();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.echo(&format!("m{i}")).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), format!("m{i}"));
    }
    assert_eq!(m.control.reinitializations().await, 1.0);
    assert_eq!(s.whoami_keeping_id().await, "pod-1");
    assert_eq!(initializations(&m.pods[1..]).await, others as u64 + 1, "its own sessions and the one move");
}

/// A moved session runs under the new pod's session id; when that pod dies too, Envoy's
/// retry carries `x-mcp-affinity-session` (the client's id), by which control finds the
/// record and moves the session again. The client's id never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_moved_twice_keeps_the_client_s_id() {
    let mut m = mesh(3);
    let (victims, _) = sessions_on(&m.proxy, "pod-0", 1).await;
    let s = victims.into_iter().next().unwrap();
    let pins_before = m.proxy.metric("recovered_pins").await.unwrap();
    m.pods[0].kill();
    let second = s.whoami_keeping_id().await;
    assert_ne!(second, "pod-0");
    let at = m.pods.iter().position(|p| p.name == second).unwrap();
    m.pods[at].kill();
    let third = s.whoami_keeping_id().await;
    assert!(third != "pod-0" && third != second, "moved again, to the last live pod: {third}");
    assert_eq!(s.echo("twice").await.unwrap(), "twice");
    assert_eq!(m.control.reinitializations().await, 2.0);
    assert_eq!(m.proxy.metric("recovered_pins").await.unwrap() - pins_before, 2);
}

/// Two Envoys share control; the second holds a pin that went stale when the first moved
/// the session. Its retry reaches control, which finds the session already moved (the
/// failed pod is not the record's) and replays on the current pin: no second
/// re-initialization, and the second Envoy learns the new pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_envoy_with_a_stale_pin_does_not_reinitialize_again() {
    let mut m = mesh(2);
    let b = m.another_proxy();
    let (victims, _) = sessions_on(&m.proxy, "pod-0", 1).await;
    let via_a = victims.into_iter().next().unwrap();
    let via_b = Session::with_id(&b.url(), &via_a.session_id);
    assert_eq!(via_b.whoami_keeping_id().await, "pod-0", "B learned the pin from control");
    let b_before = b.stat(RETRIES).await.unwrap();
    let pins_before = (m.proxy.metric("recovered_pins").await.unwrap(), b.metric("recovered_pins").await.unwrap());
    m.pods[0].kill();
    assert_eq!(via_a.whoami_keeping_id().await, "pod-1", "A's retry moves the session");
    assert_eq!(via_b.whoami_keeping_id().await, "pod-1", "B's retry finds it moved");
    assert_eq!(via_b.whoami_keeping_id().await, "pod-1");
    assert_eq!(m.control.reinitializations().await, 1.0, "B's retry found the newer generation");
    let pins = (m.proxy.metric("recovered_pins").await.unwrap(), b.metric("recovered_pins").await.unwrap());
    assert_eq!((pins.0 - pins_before.0, pins.1 - pins_before.1), (1, 1));
    assert_eq!(b.stat(RETRIES).await.unwrap() - b_before, 1, "B's next request went to pod-1 directly");
}

/// One HTTP/1.1 POST to control's replay listener at `addr` over TLS, trusting the CA in
/// `server_ca`, presenting `client` (a directory with `envoy.crt` / `envoy.key`) or no
/// certificate: the status line, or why there was none.
async fn replay_over_tls(addr: std::net::SocketAddr, server_ca: &Path, client: Option<&Path>, session_id: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(server_ca.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots);
    let config = match client {
        Some(dir) => {
            let certs = CertificateDer::pem_file_iter(dir.join("envoy.crt")).unwrap().map(Result::unwrap).collect();
            builder.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(dir.join("envoy.key")).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut tls = connector.connect(ServerName::try_from("mcp-affinity-control").unwrap(), tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let request = format!("POST /mcp HTTP/1.1\r\nhost: mcp\r\ncontent-type: application/json\r\nmcp-session-id: {session_id}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    tls.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().filter(|l| l.starts_with("HTTP/1.1 ")).map(str::to_string).ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

/// The replay listener takes a client's request without a bearer token, so it serves only
/// Envoy: plain HTTP, TLS without a client certificate, and a client certificate of another
/// CA are all refused before any HTTP exchange (a pod, or anybody else who reaches the port,
/// gets nothing). Envoy's certificate gets an HTTP answer — the tests above go through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replay_listener_answers_envoy_s_certificate_only() {
    let m = mesh(2);
    let (victims, _) = sessions_on(&m.proxy, "pod-0", 1).await;
    let id = &victims[0].session_id;
    let (addr, dir) = (m.replay.addr, m.replay.tls_dir.as_path());
    let plain = mcp_affinity_harness::mcp_client::Session::with_id(&format!("http://{addr}/mcp"), id).post_raw(&[], "{}").await;
    assert!(plain.is_err(), "plain HTTP must get no answer: {plain:?}");
    let none = replay_over_tls(addr, dir, None, id).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let stranger = ReplayListener::new().unwrap();
    let other_ca = replay_over_tls(addr, dir, Some(&stranger.tls_dir), id).await;
    assert!(other_ca.is_err(), "a certificate of another CA: {other_ca:?}");
    let envoy = replay_over_tls(addr, dir, Some(dir), id).await;
    assert!(envoy.is_ok(), "Envoy's certificate gets an answer: {envoy:?}");
}
