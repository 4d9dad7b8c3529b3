//! A rolling update of every pod while MCP 2026-07-28 tasks run and `subscriptions/listen`
//! streams are open, through real Envoy (`--concurrency 2`) with control: tasks cannot
//! move, so a draining pod must get no new `tools/call` yet keep serving its tasks' polls
//! until they finish; its listen streams are ended so that clients re-listen elsewhere.
//!
//! Each of the three dual-era demo pods is replaced in turn the way Kubernetes does it: the
//! `preStop` hook runs the operator command `mcp-affinity-control drain POD --wait
//! --settle`, which returns once control counts no unfinished task on the pod; then the pod
//! is stopped, a new one starts at the same address (a new name), and the drain is undone.
//! Meanwhile [`WORKERS`] clients create tasks and poll each until it is done (taking turns
//! at the request shapes: one write, headers then body, chunked, HTTP/2), and
//! [`LISTENERS`] clients hold listen streams, re-listening whenever one ends — raw ones
//! (`era2026_client::listen`) and [`TS_LISTENERS`] official TypeScript SDK v2 clients
//! (`@modelcontextprotocol/client`, whose `listen()` leaves the re-listen to the
//! application, which the script does).
//!
//! Nothing waits for time to pass: each step waits for a condition (both worker VMs
//! adopted the draining list, the hook returned, every listen stream is open again).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_affinity_harness::era2026_client;
use mcp_affinity_harness::fixtures::control::ControlService;
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy};
use mcp_affinity_harness::mcp_client::Shape;
use mcp_affinity_harness::ts_client::TsListener;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Clients creating tasks, one at a time each.
const WORKERS: usize = 6;
/// How long each task runs in its pod.
const TASK_MS: u64 = 1500;
/// Clients holding a listen stream.
const LISTENERS: usize = 6;
/// Official TypeScript SDK v2 clients holding a listen stream.
const TS_LISTENERS: usize = 2;
/// Upper bound of one wait (a bug shows as a failure, not a hang).
const WAIT: Duration = Duration::from_secs(90);
/// The filter's VMs in an Envoy with `--concurrency 2`: one per worker thread, one on the
/// main thread (each adopts a change of the draining list and counts `drain_list_updates`).
const VMS: i64 = 3;
/// `drain --settle`: seconds without a change before the hook returns.
const SETTLE_SECS: u64 = 1;

/// One task as its client saw it.
struct TaskRun {
    /// When its `tools/call` was sent.
    sent: Instant,
    /// The pod that ran it (its result names the pod), or why it failed.
    outcome: Result<String, String>,
}

/// One listen stream as its client saw it.
#[derive(Default)]
struct ListenRuns {
    /// Streams established (acknowledged).
    established: usize,
    /// Streams that ended while the test ran (cut by the proxy, or ended by the pod).
    ended: usize,
    /// Listen attempts that failed.
    failures: Vec<String>,
}

#[derive(Default)]
struct Seen {
    tasks: Vec<TaskRun>,
    /// Per listener.
    listens: Vec<ListenRuns>,
    /// Listen streams open now.
    open: usize,
}

fn start_traffic(url: &str, seen: &Arc<Mutex<Seen>>, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (url, seen, stop) = (url.to_string(), seen.clone(), stop.clone());
        // Workers take turns at the client shapes: one write, headers then body, chunked, HTTP/2.
        let options = era2026_client::Options { shape: Shape::ALL[w % Shape::ALL.len()], ..era2026_client::Options::tasks() };
        handles.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let sent = Instant::now();
                let outcome = run_task(&url, &options).await;
                seen.lock().unwrap().tasks.push(TaskRun { sent, outcome });
            }
        }));
    }
    seen.lock().unwrap().listens = (0..LISTENERS).map(|_| ListenRuns::default()).collect();
    for i in 0..LISTENERS {
        let (url, seen, stop) = (url.to_string(), seen.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match era2026_client::listen(&url, json!({"toolsListChanged": true}), Duration::from_secs(10)).await {
                    Ok(stream) => {
                        {
                            let mut s = seen.lock().unwrap();
                            s.listens[i].established += 1;
                            s.open += 1;
                        }
                        tokio::select! {
                            _ = stream.ended() => {
                                let mut s = seen.lock().unwrap();
                                s.listens[i].ended += 1;
                                s.open -= 1;
                            }
                            _ = stop.cancelled() => return,
                        }
                    }
                    Err(e) => {
                        seen.lock().unwrap().listens[i].failures.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    handles
}

/// Creates one `slow_task` task through Envoy and polls it until it is done, every request
/// sent with `options`: the pod that ran it.
async fn run_task(url: &str, options: &era2026_client::Options) -> Result<String, String> {
    let created = era2026_client::call_tool(url, "slow_task", json!({"ms": TASK_MS}), options).await.map_err(|e| format!("tools/call: {e}"))?;
    let task = created.task().ok_or("a synchronous result, not a task")?;
    let state = era2026_client::wait_task_with(url, &task.task_id, WAIT, options).await.map_err(|e| format!("task {}: {e}", task.task_id))?;
    state.result_text().map(str::to_string).ok_or_else(|| format!("task {} ended without a result", task.task_id))
}

async fn wait_until<F: AsyncFn() -> bool>(what: &str, f: F) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dual_era_pod(name: &str, addr: SocketAddr) -> Pod {
    Pod::start_at(name, addr, &["--era", "dual"]).unwrap()
}

/// Issue 25, done when: "A rolling update of all pods while tasks run and listen streams
/// are open: 0 tasks lost that finish within the deadline, every listen stream
/// re-established, counted."
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_loses_no_task_and_every_listen_stream_comes_back() {
    let mut pods: Vec<Pod> = (0..3).map(|i| dual_era_pod(&format!("pod-{i}"), mcp_affinity_harness::process::free_addr())).collect();
    let endpoints: Vec<String> = pods.iter().map(|p| p.addr.to_string()).collect();
    let control = ControlService::start_with("memory", &["--endpoints".into(), endpoints.join(",")]).unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), control.proxy_options(ControlService::filter_config(r#","sweep_period_ms":200"#))).unwrap();
    let (seen, stop) = (Arc::new(Mutex::new(Seen::default())), CancellationToken::new());
    let mut ts = Vec::new();
    for _ in 0..TS_LISTENERS {
        ts.push(TsListener::start(&proxy.url(), Duration::from_secs(30)).await.unwrap());
    }
    let handles = start_traffic(&proxy.url(), &seen, &stop);
    wait_until("every listen stream is open", async || seen.lock().unwrap().open == LISTENERS).await;

    // (old pod, when every VM had adopted its drain)
    let mut drained: Vec<(String, Instant)> = Vec::new();
    #[allow(clippy::needless_range_loop)] // pods[i] is replaced inside
    for i in 0..3 {
        let addr = pods[i].addr;
        // The hook drains the pod and waits for its tasks; Kubernetes stops the pod after
        // it. Meanwhile: each drain and undrain is one change of the draining list, adopted
        // by each VM of the filter: one per worker thread and one on the main thread.
        let want = (2 * i as i64 + 1) * VMS;
        let (hook, (adopted, at)) = tokio::join!(control.pre_stop(addr, WAIT.as_secs(), SETTLE_SECS), async {
            let n = proxy.metric_reaching("drain_list_updates", want).await.unwrap();
            (n, Instant::now())
        });
        assert_eq!(adopted, want, "every VM adopted the drain of {}", pods[i].name);
        drained.push((pods[i].name.clone(), at));
        let (code, output) = hook.unwrap();
        assert_eq!(code, 0, "the preStop hook settled: {output}");
        assert!(output.contains(": settled, no move for"), "{output}");
        // What control said is true: nothing runs there any more, no listen stream is open.
        assert_eq!(pods[i].stat("tasks_running").await.unwrap(), 0, "{} still runs a task after its hook returned", pods[i].name);
        wait_until("the draining pod holds no listen stream", async || pods[i].stat("listens_open").await.unwrap() == 0).await;
        pods[i].terminate().unwrap();
        pods[i] = dual_era_pod(&format!("pod-{}", 3 + i), addr);
        assert_eq!(control.drain(addr, true).await.unwrap(), 204);
        proxy.metric_reaching("drain_list_updates", (2 * i as i64 + 2) * VMS).await.unwrap();
    }
    // Every listener is back, and every worker finished a task on the new pods.
    let after = Instant::now();
    wait_until("every listen stream is open again", async || seen.lock().unwrap().open == LISTENERS && ts.iter().all(TsListener::listening)).await;
    wait_until("every worker finished a task after the update", async || seen.lock().unwrap().tasks.iter().filter(|t| t.sent > after).count() >= WORKERS).await;
    stop.cancel();
    for h in handles {
        h.await.unwrap();
    }

    let seen = Arc::try_unwrap(seen).ok().expect("the traffic tasks ended").into_inner().unwrap();
    let failed: Vec<&String> = seen.tasks.iter().filter_map(|t| t.outcome.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} tasks lost or failed: {failed:?}", failed.len(), seen.tasks.len());
    for (pod, adopted) in &drained {
        let late: Vec<_> = seen.tasks.iter().filter(|t| t.sent > *adopted && t.outcome.as_deref() == Ok(pod.as_str())).collect();
        assert!(late.is_empty(), "{} tasks created on {pod} after its drain was adopted", late.len());
    }
    let on_old_pods = seen.tasks.iter().filter(|t| t.outcome.as_ref().is_ok_and(|p| drained.iter().any(|(old, _)| old == p))).count();
    assert!(on_old_pods >= WORKERS, "the first round of tasks ran on the old pods: {on_old_pods}");
    let listen_failures: Vec<&String> = seen.listens.iter().flat_map(|l| &l.failures).collect();
    assert!(listen_failures.is_empty(), "re-listening failed: {listen_failures:?}");
    for (i, l) in seen.listens.iter().enumerate() {
        // Every first stream was on an old pod, and every old pod was drained.
        assert!(l.ended >= 1, "listener {i}: its stream was never ended by a drain");
        assert_eq!(l.established, l.ended + 1, "listener {i}: every ended stream was re-established");
    }
    for (i, l) in ts.iter().enumerate() {
        let closed: Vec<_> = l.events().into_iter().filter(|e| e["event"] == "closed").collect();
        assert!(!closed.is_empty() && closed.iter().all(|e| e["cause"] == "remote"), "TypeScript listener {i}: ended by the drains (cause remote): {:?}", l.events());
        assert_eq!(l.count("error"), 0, "TypeScript listener {i} listened again without an error: {:?}", l.events());
    }
    let ended: usize = seen.listens.iter().map(|l| l.ended).sum::<usize>() + ts.iter().map(|l| l.count("closed")).sum::<usize>();
    let by_drain = proxy.metric("streams_ended_by_drain").await.unwrap();
    assert_eq!(by_drain, ended as i64, "every listen stream that ended was ended by a drain, counted");
    let counters = ["tasks_terminal", "requests_steered_by_drain", "tasks_lost"];
    let mut values = Vec::new();
    for c in counters {
        values.push(proxy.metric(c).await.unwrap());
    }
    println!("{} tasks, {ended} listen streams re-established; filter: {counters:?} = {values:?}", seen.tasks.len());
    assert!(values[0] >= seen.tasks.len() as i64 - WORKERS as i64, "terminal statuses written through: {values:?}");
    assert!(values[1] > 0, "new tasks and listens were steered off draining pods");
    assert_eq!(values[2], 0, "no task lost");
}
