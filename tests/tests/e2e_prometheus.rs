//! The dashboard's queries (envoy/observability/queries.yaml, docs/dashboard.md) against a
//! real Prometheus scraping real Envoy (`--concurrency 2`, the filter, `envoy/envoy.yaml`)
//! and control in front of 3 demo pods: after pinning, a pod kill and a drain, every query
//! gives the series the scenario produced. The checked-in Grafana dashboard is what the
//! query list generates, and every panel query is one of the list.
//!
//! Nothing waits for time to pass: each assertion polls its query until it holds (the
//! scrape that carries the step's counts came in), up to a bound far above the 1 s scrape
//! interval; zeros are read after a count of the same scrape target reached its value.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mcp_affinity_harness::{dashboard, era2026_client};
use mcp_affinity_harness::fixtures::deployment::{Bootstrap, Deployment};
use mcp_affinity_harness::fixtures::mesh::sessions_on;
use mcp_affinity_harness::fixtures::prometheus::{Prometheus, Series};
use mcp_affinity_harness::mcp_client::Session;

/// The dashboard's queries by name, run on a Prometheus; remembers which were asserted.
struct Queries {
    prom: Prometheus,
    exprs: HashMap<String, String>,
    asserted: Mutex<BTreeSet<String>>,
}

impl Queries {
    fn expr(&self, name: &str) -> &str {
        self.asserted.lock().unwrap().insert(name.to_string());
        self.exprs.get(name).unwrap_or_else(|| panic!("no query {name} in {}", dashboard::QUERIES))
    }

    /// Polls query `name` until `done` holds of its series; panics (with the last result)
    /// when it never does.
    async fn wait(&self, name: &str, what: &str, done: impl Fn(&[Series]) -> bool) -> Vec<Series> {
        let expr = self.expr(name);
        self.prom.wait_for(expr, &format!("{name}: {what}"), done).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Query `name` now.
    async fn now(&self, name: &str) -> Vec<Series> {
        self.prom.query(self.expr(name)).await.unwrap()
    }

    /// Prints what every panel query answers now, after `phase` (shown with `--nocapture`):
    /// `name {labels} value …`, the `job` label left out.
    async fn print_all(&self, phase: &str) {
        println!("-- the dashboard's queries after {phase}");
        let names: BTreeSet<&String> = self.exprs.keys().collect();
        for name in names {
            let series = self.prom.query(&self.exprs[name]).await.unwrap();
            let shown: Vec<String> = series
                .iter()
                .map(|s| {
                    let labels: Vec<String> = s.labels.iter().filter(|(k, _)| *k != "job").map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{{{}}} {:.4}", labels.join(","), s.value)
                })
                .collect();
            println!("{name:<30} {}", shown.join("  "));
        }
    }
}

/// Creates a `slow_task` task (MCP 2026-07-28, tasks extension) through `url` and polls it
/// until it completed.
async fn run_task(url: &str) {
    let task = era2026_client::call_tool_as_task(url, "slow_task", serde_json::json!({"ms": 50})).await.unwrap().task().expect("a task");
    let state = era2026_client::wait_task(url, &task.task_id, std::time::Duration::from_secs(30)).await.unwrap();
    assert!(state.result_text().is_some(), "task {} completed", task.task_id);
}

/// The value of the series whose label `key` is `value`.
fn at(series: &[Series], key: &str, value: &str) -> Option<f64> {
    series.iter().find(|s| s.label(key) == value).map(|s| s.value)
}

/// The value of a result of exactly one series.
fn only(series: &[Series]) -> Option<f64> {
    match series {
        [s] => Some(s.value),
        _ => None,
    }
}

/// Exactly one series, with label `key` = `value` and the value `want`.
fn is(key: &'static str, value: String, want: f64) -> impl Fn(&[Series]) -> bool {
    move |s| s.len() == 1 && at(s, key, &value) == Some(want)
}

/// Some series has a finite value above 0.
fn positive(series: &[Series]) -> bool {
    series.iter().any(|s| s.value.is_finite() && s.value > 0.0)
}

/// Calls `whoami` on `session` until a pod other than `pod` answers (the filter's VMs
/// adopt the draining list on their tick); the new pod.
async fn moved_off(session: &Session, pod: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = session.whoami_keeping_id().await;
        if now != pod {
            return now;
        }
        assert!(Instant::now() < deadline, "session {} stayed on draining {pod}", session.session_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 26: 3 pods, control and Envoy scraped by Prometheus; after pinning, a pod kill and
/// a drain, each dashboard query gives the series and values the step produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_queries_show_pinning_recovery_and_draining() {
    // Dual-era pods: 2025-era sessions and MCP 2026-07-28 tasks on one endpoint.
    let mut d = Deployment::start(Bootstrap::OriginalDst, 3, &["--era", "dual"], "");
    let prom = Prometheus::start(&[d.proxy.admin], &[d.control.addr]).await.unwrap();
    let exprs = dashboard::queries().unwrap().into_iter().map(|q| (q.name, q.expr)).collect();
    let q = Queries { prom, exprs, asserted: Mutex::new(BTreeSet::new()) };
    let envoy = d.proxy.admin.to_string();
    let control = d.control.addr.to_string();
    let in_envoy = |want: f64| is("instance", envoy.clone(), want);

    // Before any session.
    q.wait("control_up", "control is up", is("instance", control.clone(), 1.0)).await;
    q.wait("upstreams_draining", "no drain", |s| only(s) == Some(0.0)).await;
    q.wait("sessions_pinned_total", "nothing pinned yet", in_envoy(0.0)).await;

    // Pinning: sessions created and used; one request with an id nobody issued.
    let (on0, others0) = sessions_on(&d.proxy, "pod-0", 3).await;
    let (on1, others1) = sessions_on(&d.proxy, "pod-1", 2).await;
    let pinned = (on0.len() + on1.len() + others0 + others1) as f64;
    for s in on0.iter().chain(&on1) {
        assert_eq!(s.echo("pinned").await.unwrap(), "pinned");
    }
    assert!(Session::with_id(&d.proxy.url(), "never-issued-0123456789").whoami().await.is_err());
    q.wait("sessions_pinned_total", "every session pinned", in_envoy(pinned)).await;
    q.wait("unknown_sessions_total", "one unknown session", in_envoy(1.0)).await;
    q.wait("sessions_pinned_rate", "sessions pinned lately", positive).await;
    q.wait("requests_pinned_rate", "requests routed to their pin lately", positive).await;
    q.wait("unknown_sessions_rate", "an unknown session lately", positive).await;
    q.wait("control_requests_rate", "the filter's calls to control", |s| s.iter().any(|s| s.label("route").starts_with("/v1/") && s.value > 0.0)).await;
    q.wait("control_latency_p99", "control's store latency", |s| s.iter().any(|s| s.label("op") != "" && s.value.is_finite())).await;
    assert_eq!(only(&q.now("control_5xx_rate").await), Some(0.0), "control answered no 5xx");
    assert_eq!(at(&q.now("filter_control_errors_rate").await, "instance", &envoy), Some(0.0), "no failed call to control");
    assert_eq!(at(&q.now("sessions_recovered_total").await, "instance", &envoy), Some(0.0), "nothing recovered yet");
    assert!(q.now("recoveries_by_outcome_total").await.iter().all(|s| s.value == 0.0), "control decided no recovery yet");

    // Tasks: created on their pods and polled there until done.
    for _ in 0..3 {
        run_task(&d.proxy.url()).await;
    }
    q.wait("tasks_pinned_total", "three tasks pinned", in_envoy(3.0)).await;
    q.wait("tasks_terminal_total", "three tasks seen completed", in_envoy(3.0)).await;

    // A pod kill: each of its sessions is recovered on its next request, once.
    d.pods[0].kill();
    let mut now_on = Vec::new();
    for s in on0.iter().chain(&on1) {
        let pod = s.whoami_keeping_id().await;
        assert_ne!(pod, "pod-0");
        now_on.push(pod);
    }
    let recovered = on0.len() as f64;
    q.wait("sessions_recovered_total", "the killed pod's sessions recovered", in_envoy(recovered)).await;
    q.wait("recoveries_by_outcome_total", "control replayed each once", is("outcome", "replayed".into(), recovered)).await;
    q.wait("recoveries_by_outcome_rate", "recoveries by outcome", |s| at(s, "outcome", "replayed").is_some()).await;
    q.wait("recovery_duration_p99", "recoveries took time", positive).await;
    assert_eq!(at(&q.now("recoveries_failed_total").await, "instance", &envoy), Some(0.0), "no recovery failed");
    q.print_all("a pod kill (pod-0)").await;

    // A drain: pod-1's sessions move off it on their next request, once each.
    assert_eq!(d.control.drain(d.pods[1].addr, false).await.unwrap(), 200);
    q.wait("upstreams_draining", "pod-1 draining", |s| only(s) == Some(1.0)).await;
    // Every VM of the filter (2 workers and the main thread) adopted the drain: a new task
    // now goes to a serving pod.
    d.proxy.metric_reaching("drain_list_updates", 3).await.unwrap();
    run_task(&d.proxy.url()).await;
    q.wait("requests_steered_by_drain_total", "the new task steered off pod-1", in_envoy(1.0)).await;
    assert_eq!(at(&q.now("tasks_lost_total").await, "instance", &envoy), Some(0.0), "no task lost");
    let mut moves = 0.0;
    for (s, pod) in on0.iter().chain(&on1).zip(&now_on) {
        if pod == "pod-1" {
            assert_eq!(moved_off(s, "pod-1").await, "pod-2", "the only live pod left");
            moves += 1.0;
        }
    }
    assert!(moves >= on1.len() as f64, "pod-1 held at least its own {} sessions", on1.len());
    q.wait("sessions_moved_by_drain_total", "pod-1's sessions moved", in_envoy(moves)).await;
    q.wait("drain_moves_total", "control moved them", is("outcome", "moved".into(), moves)).await;
    q.wait("drain_move_delay_p99", "moves took time after the drain", positive).await;
    assert_eq!(at(&q.now("sessions_recovered_total").await, "instance", &envoy), Some(recovered), "a drain move is no recovery");
    assert_eq!(only(&q.now("control_5xx_rate").await), Some(0.0), "control answered no 5xx");
    assert_eq!(at(&q.now("filter_control_errors_rate").await, "instance", &envoy), Some(0.0), "no failed call to control");
    assert_eq!(at(&q.now("unknown_sessions_total").await, "instance", &envoy), Some(1.0), "no session lost");
    q.print_all("a drain (pod-1)").await;

    let all: BTreeSet<String> = q.exprs.keys().cloned().collect();
    assert_eq!(*q.asserted.lock().unwrap(), all, "every dashboard query is asserted");
}

/// The checked-in dashboard is what the query list generates. `UPDATE_DASHBOARD=1`
/// regenerates it first.
#[test]
fn the_dashboard_is_generated_from_the_query_list() {
    if std::env::var_os("UPDATE_DASHBOARD").is_some() {
        dashboard::write().unwrap();
    }
    assert!(
        dashboard::checked_in().unwrap() == dashboard::render(&dashboard::panels().unwrap()),
        "{} differs from {}: UPDATE_DASHBOARD=1 cargo test -p mcp-affinity-harness --test e2e_prometheus the_dashboard_is_generated",
        dashboard::DASHBOARD,
        dashboard::QUERIES
    );
}

/// Every target of every panel of the checked-in dashboard is a query of the list (so a
/// query the end-to-end test asserts), and the Grafana provisioning files point at it.
#[test]
fn every_panel_query_is_a_tested_query() {
    let json: serde_json::Value = serde_json::from_str(&dashboard::checked_in().unwrap()).unwrap();
    let listed: BTreeSet<String> = dashboard::queries().unwrap().into_iter().map(|q| q.expr).collect();
    let mut used = BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(listed.contains(expr), "panel {}: {expr} is not in {}", panel["title"], dashboard::QUERIES);
            used.insert(expr.to_string());
        }
    }
    assert_eq!(used, listed, "every listed query is on a panel");
    let root = mcp_affinity_harness::envoy::workspace_root();
    let provisioning = std::fs::read_to_string(root.join("envoy/observability/grafana/provisioning/dashboards.yaml")).unwrap();
    let name = std::path::Path::new(dashboard::DASHBOARD).file_name().unwrap().to_str().unwrap();
    assert!(provisioning.contains("/var/lib/grafana/dashboards/mcp-affinity"), "{provisioning}");
    assert!(std::fs::read_to_string(root.join("docs/dashboard.md")).unwrap().contains(name));
}
