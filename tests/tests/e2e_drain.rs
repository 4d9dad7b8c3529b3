//! Zero-error rolling updates through real Envoy: every demo pod is replaced one by one
//! (drain → wait for in-flight calls → stop → start a new pod) while 20 sessions make
//! continuous `tools/call`s. With draining no call fails and every session moves exactly
//! once per replaced pod it was on; the same rolling update without draining shows the
//! failures draining prevents.
//!
//! Nothing waits for time to pass: a pod is stopped once every session has been answered
//! by another pod after its drain began (calls of one session are sequential, so none is
//! left on the draining pod) and the pod reports no tool call in flight.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_affinity_harness::fixtures::control::ControlService;
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy};
use mcp_affinity_harness::mcp_client::{self, Session};
use mcp_affinity_harness::process::free_addr;
use serde_json::json;

const SESSIONS: usize = 20;

/// How long a traffic `echo` holds its call open in the pod, so that calls are in flight
/// whenever a pod is drained or stopped.
const CALL_MS: u64 = 100;

/// Upper bound of one wait in the test (a bug shows as a failure, not a hang).
const WAIT: Duration = Duration::from_secs(90);

/// What the sessions saw.
#[derive(Default)]
struct Seen {
    /// Per session: `(when the whoami was sent, the pod that answered)`.
    pods: Vec<Vec<(Instant, String)>>,
    /// Failed calls: `(session, error)`.
    failures: Vec<(usize, String)>,
}

struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Each session in its own task: `echo` (held [`CALL_MS`]) then `whoami`, until stopped.
    fn start(sessions: Vec<Session>, first: Vec<String>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let seen = Arc::new(Mutex::new(Seen { pods: first.into_iter().map(|p| vec![(start, p)]).collect(), failures: Vec::new() }));
        let tasks = sessions
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let (stop, seen) = (stop.clone(), seen.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = s.call_tool_text("echo", json!({"text": "x", "sleep_ms": CALL_MS})).await {
                            seen.lock().unwrap().failures.push((i, format!("echo: {e}")));
                        }
                        let sent = Instant::now();
                        match s.whoami().await {
                            Ok(pod) => seen.lock().unwrap().pods[i].push((sent, pod)),
                            Err(e) => seen.lock().unwrap().failures.push((i, format!("whoami: {e}"))),
                        }
                    }
                })
            })
            .collect();
        Traffic { stop, seen, tasks }
    }

    /// Waits until every session was answered by a pod other than `pod` on a `whoami` sent
    /// after `since`.
    async fn wait_all_off(&self, pod: &str, since: Instant) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left: Vec<usize> = {
                let seen = self.seen.lock().unwrap();
                (0..seen.pods.len()).filter(|&i| !seen.pods[i].iter().any(|(t, p)| *t > since && p != pod)).collect()
            };
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "sessions {left:?} were not moved off {pod}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.seen).ok().unwrap().into_inner().unwrap()
    }
}

/// The pods a session was on, in order, without repeats of the same pod in a row.
fn runs(seen: &[(Instant, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, p) in seen {
        if out.last() != Some(p) {
            out.push(p.clone());
        }
    }
    out
}

async fn wait_until<F: AsyncFn() -> bool>(what: &str, f: F) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Mesh {
    pods: Vec<Pod>,
    /// Addresses of the pods that replace `pods[i]`, known to control from the start (as
    /// a Kubernetes headless Service would resolve them once they run).
    next: Vec<SocketAddr>,
    control: ControlService,
    proxy: Proxy,
}

fn mesh() -> Mesh {
    let pods: Vec<Pod> = (0..3).map(|i| Pod::start(&format!("pod-{i}")).unwrap()).collect();
    let next: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let endpoints: Vec<String> = pods.iter().map(|p| p.addr).chain(next.iter().copied()).map(|a| a.to_string()).collect();
    let control = ControlService::start_with("memory", &["--endpoints".into(), endpoints.join(",")]).unwrap();
    let proxy = Proxy::start(
        &pods.iter().map(|p| p.addr).collect::<Vec<_>>(),
        control.proxy_options(ControlService::filter_config(r#","sweep_period_ms":200"#)),
    )
    .unwrap();
    Mesh { pods, next, control, proxy }
}

/// Replaces the three pods one by one under traffic, draining each first when `drain`.
async fn rolling_update(m: &mut Mesh, drain: bool) -> Seen {
    let mut sessions = Vec::new();
    let mut first = Vec::new();
    for _ in 0..SESSIONS {
        let s = mcp_client::connect(&m.proxy.url()).await.unwrap();
        first.push(s.whoami().await.unwrap());
        sessions.push(s);
    }
    let traffic = Traffic::start(sessions, first);
    for i in 0..3 {
        let old = &m.pods[i];
        if drain {
            // What a preStop hook does.
            assert_eq!(m.control.drain(old.addr, false).await.unwrap(), 200);
            let since = Instant::now();
            traffic.wait_all_off(&old.name, since).await;
            wait_until("the draining pod has no call in flight", async || old.in_flight().await.unwrap() == 0).await;
        } else {
            wait_until("a call is in flight on the pod", async || old.in_flight().await.unwrap() > 0).await;
        }
        m.pods[i].terminate().unwrap();
        m.pods[i] = Pod::start_at(&format!("pod-{}", 3 + i), m.next[i], &[]).unwrap();
    }
    // Every session makes one more round on its final pod.
    let since = Instant::now();
    traffic.wait_all_off("none", since).await;
    traffic.finish().await
}

/// Issue 13, done when: 0 failed calls of any method, and every session's `whoami` moves
/// exactly once per replaced pod it was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_with_draining_costs_clients_nothing() {
    let mut m = mesh();
    let seen = rolling_update(&mut m, true).await;
    assert!(seen.failures.is_empty(), "{} calls failed: {:?}", seen.failures.len(), seen.failures);
    let old: HashSet<&str> = ["pod-0", "pod-1", "pod-2"].into();
    let mut moves = 0;
    for (i, pods) in seen.pods.iter().enumerate() {
        let runs = runs(pods);
        let distinct: HashSet<&String> = runs.iter().collect();
        assert_eq!(distinct.len(), runs.len(), "session {i} came back to a pod it had left: {runs:?}");
        let on_old = runs.iter().filter(|p| old.contains(p.as_str())).count();
        assert_eq!(runs.len() - 1, on_old, "session {i} must move exactly once per replaced pod it was on: {runs:?}");
        assert!(!old.contains(runs.last().unwrap().as_str()), "session {i} ended on a replaced pod: {runs:?}");
        moves += runs.len() - 1;
    }
    assert!(moves >= SESSIONS, "every session was on at least one replaced pod");
    eprintln!("{SESSIONS} sessions, 3 pods replaced with draining: 0 failed calls, {moves} moves");
    let metric = |name: &'static str| {
        let proxy = &m.proxy;
        async move { proxy.metric(name).await.unwrap() }
    };
    assert_eq!(metric("sessions_moved_by_drain").await, moves as i64);
    assert_eq!(metric("drain_moves_failed").await, 0);
    for after_the_fact in ["recoveries_replayed", "recoveries_not_replayed", "recoveries_failed", "unknown_session"] {
        assert_eq!(metric(after_the_fact).await, 0, "{after_the_fact}: nothing had to be recovered");
    }
    assert_eq!(m.control.metric("drain_moves_total", "moved").await.unwrap(), moves as f64);
    let drains = m.control.draining().await.unwrap();
    let moved: u64 = drains["draining"].as_array().unwrap().iter().map(|d| d["moved"].as_u64().unwrap()).sum();
    assert_eq!(moved, moves as u64, "{drains}");
    for d in drains["draining"].as_array().unwrap() {
        let (since, last) = (d["since_ms"].as_u64().unwrap(), d["last_move_ms"].as_u64().unwrap_or(0));
        eprintln!("drain of {}: {} sessions moved, last {} ms after the drain", d["upstream"], d["moved"], last.saturating_sub(since));
    }
}

/// An open GET (SSE) stream on a pod that starts draining is ended; the client reopens it
/// and the session is moved to a live pod first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_get_stream_on_a_draining_pod_is_ended_and_reopened_on_a_live_pod() {
    let m = mesh();
    let s = mcp_client::connect(&m.proxy.url()).await.unwrap();
    let pod = s.whoami().await.unwrap();
    let old = m.pods.iter().find(|p| p.name == pod).unwrap();
    // No client timeout: the stream stays open until someone ends it.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let open = || client.get(m.proxy.url()).headers(s.default_headers()).header("accept", "text/event-stream").send();
    let mut stream = open().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(m.control.drain(old.addr, false).await.unwrap(), 200);
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the GET stream on the draining pod was not ended");
    assert_eq!(m.proxy.metric("streams_ended_by_drain").await.unwrap(), 1);
    assert_eq!(m.proxy.metric("sessions_moved_by_drain").await.unwrap(), 0, "ending the stream moves nothing yet");
    let reopened = open().await.unwrap();
    assert_eq!(reopened.status(), 200);
    assert_eq!(m.proxy.metric("sessions_moved_by_drain").await.unwrap(), 1, "reopening moved the session");
    assert_ne!(s.whoami().await.unwrap(), pod);
    assert_eq!(old.in_flight().await.unwrap(), 0);
}

/// The same rolling update without draining: calls in flight on a stopped pod fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_rolling_update_without_draining_fails_calls() {
    let mut m = mesh();
    let seen = rolling_update(&mut m, false).await;
    assert!(!seen.failures.is_empty(), "stopping pods with calls in flight must fail some of them");
    eprintln!("{} calls failed without draining, e.g. {:?}", seen.failures.len(), &seen.failures[..seen.failures.len().min(3)]);
}
