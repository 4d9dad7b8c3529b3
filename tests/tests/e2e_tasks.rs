//! Task affinity through real Envoy (MCP 2026-07-28 era, tasks extension): dual-era demo
//! pods keep their tasks in process memory (rmcp's `TaskManager`), so `tasks/get` must reach
//! the pod whose `tools/call` answer created the task. A 2026-era client (raw requests with
//! the SEP-2243 headers, `tests/src/era2026_client.rs`) creates tasks through Envoy and polls
//! them through Envoy: with the filter every poll reaches the right pod, on every shipped
//! bootstrap; plain Envoy's round robin, the control case, answers "unknown task".

use std::time::{Duration, Instant};

use futures::future::join_all;
use mcp_affinity_harness::era2026_client::{self, INVALID_PARAMS};
use mcp_affinity_harness::fixtures::control::ControlService;
use mcp_affinity_harness::fixtures::deployment::{Bootstrap, Deployment};
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions};
use mcp_affinity_harness::mcp_client::Shape;
use serde_json::{Value, json};

const TASKS: usize = 100;
/// How many tasks are created (and later polled) at once.
const AT_ONCE: usize = 10;
/// Longest a task's poll loop waits for it to finish.
const WAIT: Duration = Duration::from_secs(60);

fn dual_era_pods(n: usize) -> Vec<Pod> {
    (0..n).map(|i| Pod::start_with(&format!("pod-{i}"), &["--era", "dual"]).unwrap()).collect()
}

/// `tasks_created` of a pod's `/demo/stats`.
async fn tasks_created(pod: &Pod) -> u64 {
    let v: Value = reqwest::get(format!("http://{}/demo/stats", pod.addr)).await.unwrap().json().await.unwrap();
    v["tasks_created"].as_u64().unwrap()
}

/// Creates `n` tasks of `ms` milliseconds through `url`; their ids.
async fn create_tasks(url: &str, n: usize, ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(AT_ONCE) {
        let created = join_all(chunk.iter().map(|_| era2026_client::call_tool_as_task(url, "slow_task", json!({"ms": ms})))).await;
        for c in created {
            ids.push(c.expect("tools/call").task().expect("a task, not a synchronous result").task_id);
        }
    }
    ids
}

/// Polls every task through `url` until it is done: the pods that ran them (the completed
/// result names its pod), and the polls answered "unknown task" (-32602).
async fn poll_all(url: &str, ids: &[String]) -> (Vec<String>, usize) {
    let (mut ran_on, mut unknown) = (Vec::new(), 0);
    for chunk in ids.chunks(AT_ONCE) {
        for r in join_all(chunk.iter().map(|id| era2026_client::wait_task(url, id, WAIT))).await {
            match r {
                Ok(state) => ran_on.push(state.result_text().unwrap_or_default().to_string()),
                Err(e) if e.rpc_code() == Some(INVALID_PARAMS) => unknown += 1,
                Err(e) => panic!("tasks/get failed otherwise: {e}"),
            }
        }
    }
    (ran_on, unknown)
}

async fn every_task_is_polled_on_its_pod(bootstrap: Bootstrap) {
    let mut d = Deployment::start(bootstrap, 3, &["--era", "dual"], "");
    let url = d.proxy.url();
    let ids = create_tasks(&url, TASKS, 300).await;
    let (ran_on, unknown) = poll_all(&url, &ids).await;
    assert_eq!((ran_on.len(), unknown), (TASKS, 0), "{bootstrap:?}: every task found by every poll");
    let created: Vec<u64> = join_all(d.pods.iter().map(tasks_created)).await;
    assert_eq!(created.iter().sum::<u64>(), TASKS as u64, "{bootstrap:?}: one task per tools/call");
    assert!(created.iter().filter(|c| **c > 0).count() > 1, "{bootstrap:?}: tasks were spread over the pods: {created:?}");
    for pod in &d.pods {
        assert_eq!(ran_on.iter().filter(|n| **n == pod.name).count() as u64, tasks_created(pod).await, "{bootstrap:?}: {}", pod.name);
    }
    assert_eq!(d.proxy.metric("tasks_pinned").await.unwrap(), TASKS as i64);
    assert!(d.proxy.metric("tasks_routed").await.unwrap() >= TASKS as i64);
    assert_eq!(d.proxy.metric("tasks_unpinned").await.unwrap(), 0);

    // The pod holding a running task dies: its next poll gets "unknown task" at once (no
    // retry elsewhere, no hang), counted, and the pin is forgotten.
    let id = create_tasks(&url, 1, 60_000).await.remove(0);
    let mut holder = None;
    for (i, pod) in d.pods.iter().enumerate() {
        if era2026_client::get_task(&format!("http://{}/mcp", pod.addr), &id).await.is_ok() {
            holder = Some(i);
        }
    }
    d.pods[holder.expect("one pod holds the task")].kill();
    let start = Instant::now();
    let err = era2026_client::get_task(&url, &id).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(INVALID_PARAMS), "{bootstrap:?}: {err}");
    assert!(start.elapsed() < Duration::from_secs(10), "{bootstrap:?}: answered at once, not after a hang: {:?}", start.elapsed());
    assert_eq!(d.proxy.metric("tasks_lost").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_every_task_is_polled_on_its_pod() {
    every_task_is_polled_on_its_pod(Bootstrap::StatefulSession).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn original_dst_every_task_is_polled_on_its_pod() {
    every_task_is_polled_on_its_pod(Bootstrap::OriginalDst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_shape_every_task_is_polled_on_its_pod() {
    every_task_is_polled_on_its_pod(Bootstrap::Istio).await;
}

/// Task pins are written through to control: a task created through one Envoy is polled
/// on its pod through another Envoy (sharing control, not shared data), and through the
/// first one after a restart emptied its shared data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_keep_their_pod_across_envoys_and_restarts() {
    let mut d = Deployment::start(Bootstrap::StatefulSession, 3, &["--era", "dual"], "");
    let addrs: Vec<_> = d.pods.iter().map(|p| p.addr).collect();
    let other = Proxy::start(&addrs, d.control.proxy_options(ControlService::filter_config(r#","recovery":{"replay_by":"filter"}"#))).unwrap();
    // Polled through the other Envoy at once: the pins reach control on the creating
    // Envoy's next tick (every 10 ms while any wait), and the other Envoy's lookup waits up
    // to `lookup_wait_ms` for one still on its way.
    for _ in 0..5 {
        // One task alone: no later answer's event wakes the creating Envoy's root context.
        let id = create_tasks(&d.proxy.url(), 1, 300).await.remove(0);
        let state = era2026_client::get_task(&other.url(), &id).await;
        assert!(state.is_ok(), "a task polled at once through the other Envoy: {:?}", state.err());
    }
    let ids = create_tasks(&d.proxy.url(), 30, 300).await;
    let (ran_on, unknown) = poll_all(&other.url(), &ids).await;
    assert_eq!((ran_on.len(), unknown), (ids.len(), 0), "through the other Envoy");
    assert_eq!(other.metric("tasks_pinned").await.unwrap(), 0, "it saw no task created");
    assert_eq!(other.metric("tasks_unpinned").await.unwrap(), 0, "control knew every task it was asked about");
    for id in &ids {
        assert_eq!(d.control.wait_for_task(id).await["task_id"], id.as_str());
    }
    assert!(other.metric("tasks_routed").await.unwrap() >= ids.len() as i64 + 5);
    d.proxy.restart().unwrap();
    let (ran_on, unknown) = poll_all(&d.proxy.url(), &ids).await;
    assert_eq!((ran_on.len(), unknown), (ids.len(), 0), "through the restarted Envoy");
    assert_eq!(d.proxy.metric("tasks_unpinned").await.unwrap(), 0);
}

/// Clients write requests in pieces (headers then body, chunked bodies, HTTP/2 HEADERS then
/// DATA): tasks created and polled in every such shape reach their pod, on the default
/// bootstrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_every_client_shape_are_polled_on_their_pod() {
    let d = Deployment::start(Bootstrap::StatefulSession, 3, &["--era", "dual"], "");
    let url = d.proxy.url();
    for shape in Shape::SPLIT {
        let options = era2026_client::Options { shape, ..era2026_client::Options::tasks() };
        for _ in 0..5 {
            let created = era2026_client::call_tool(&url, "slow_task", json!({"ms": 100}), &options).await.expect("tools/call");
            let id = created.task().expect("a task").task_id;
            let deadline = Instant::now() + WAIT;
            loop {
                let state = era2026_client::get_task_with(&url, &id, &options).await.unwrap_or_else(|e| panic!("{shape:?}: tasks/get: {e}"));
                if state.status == "completed" {
                    break;
                }
                assert!(Instant::now() < deadline, "{shape:?}: task {id} still {}", state.status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(d.proxy.metric("tasks_pinned").await.unwrap(), 15);
    assert_eq!(d.proxy.metric("tasks_unpinned").await.unwrap(), 0);
}

/// The control case: the same client and pods behind Envoy without the filter (round robin
/// over the pods) gets "unknown task" for the polls that reach another pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_filter_round_robin_loses_tasks() {
    let pods = dual_era_pods(3);
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions { no_filter: true, ..Default::default() }).unwrap();
    let ids = create_tasks(&proxy.url(), TASKS, 300).await;
    let mut unknown = 0;
    for id in &ids {
        if let Err(e) = era2026_client::get_task(&proxy.url(), id).await {
            assert_eq!(e.rpc_code(), Some(INVALID_PARAMS), "{e}");
            unknown += 1;
        }
    }
    assert!(unknown > TASKS / 4, "round robin over 3 pods: most polls miss; {unknown} of {TASKS} did");
}
