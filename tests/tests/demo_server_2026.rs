//! The demo server's 2026-07-28 eras (`--era 2026|dual`) and the tasks extension, driven
//! by the raw 2026 client (`era2026_client`) over real HTTP on 127.0.0.1. Pods run in
//! this process (`demo_server::serve_with_shutdown`), except one test of the binary's
//! `--era` flag.

use std::process::Command;
use std::time::Duration;

use mcp_affinity_harness::demo_server::{self, DemoServerOptions, Era};
use mcp_affinity_harness::era2026_client::{self as era, Options, ToolAnswer};
use mcp_affinity_harness::mcp_client;
use mcp_affinity_harness::process::{Child, free_addr, workspace_bin};
use serde_json::{Value, json};

/// A demo pod served in this process; stopped when dropped.
struct Pod {
    url: String,
    stats_url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn pod(name: &str, era: Era, sse_2026: bool) -> Pod {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = DemoServerOptions { name: name.to_string(), era, sse_2026, ..DemoServerOptions::default() };
    tokio::spawn(demo_server::serve_with_shutdown(options, listener, async move {
        let _ = stopped.await;
    }));
    Pod {
        url: format!("http://{addr}/mcp"),
        stats_url: format!("http://{addr}{}", demo_server::STATS_PATH),
        _stop: stop,
    }
}

impl Pod {
    async fn stats(&self) -> Value {
        mcp_client::http_client().get(&self.stats_url).send().await.unwrap().json().await.unwrap()
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn task_lives_on_the_pod_that_created_it() {
    let a = pod("pod-a", Era::Dual, false).await;
    let b = pod("pod-b", Era::Dual, false).await;

    // The raw answer: application/json, a CreateTaskResult.
    let (_, raw) = era::send_raw(
        &a.url,
        "tools/call",
        json!({"name": "slow_task", "arguments": {"ms": 600}}),
        &Options::tasks(),
    )
    .await
    .unwrap();
    assert_eq!(raw.status.as_u16(), 200, "{}", raw.text());
    assert_eq!(raw.header("content-type"), Some("application/json"), "{:?}", raw.headers);
    assert!(raw.header("mcp-session-id").is_none(), "no sessions in 2026-07-28");
    let result = raw.json().expect("JSON body")["result"].clone();
    assert_eq!(result["resultType"], "task", "{result}");
    assert_eq!(result["status"], "working", "{result}");
    eprintln!("tools/call task answer: {}", raw.text());

    let task = match era::call_tool_as_task(&a.url, "slow_task", json!({"ms": 600})).await.unwrap() {
        ToolAnswer::Task(t) => t,
        other => panic!("expected a task: {other:?}"),
    };
    assert_eq!(task.status, "working");
    assert_eq!(task.ttl_ms, Some(demo_server::era2026::TASK_TTL_MS));
    assert_eq!(task.poll_interval_ms, Some(demo_server::era2026::TASK_POLL_INTERVAL_MS));

    let working = era::get_task(&a.url, &task.task_id).await.expect("tasks/get on the creating pod");
    assert_eq!((working.task_id.as_str(), working.status.as_str()), (task.task_id.as_str(), "working"));
    assert!(working.result.is_none());
    let stats = a.stats().await;
    assert_eq!((stats["tasks_created"].as_u64(), stats["tasks_running"].as_u64()), (Some(2), Some(2)), "{stats}");
    assert_eq!(stats["initializations"], 0, "2026 requests create no sessions: {stats}");
    let stats_b = b.stats().await;
    assert_eq!((stats_b["tasks_created"].as_u64(), stats_b["tasks_running"].as_u64()), (Some(0), Some(0)));

    // Another pod does not know the task: -32602 (HTTP 200, JSON).
    let err = era::get_task(&b.url, &task.task_id).await.expect_err("pod-b must not know pod-a's task");
    assert_eq!(err.rpc_code(), Some(era::INVALID_PARAMS), "{err}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(200), "{err}");
    let err = era::cancel_task(&b.url, &task.task_id).await.expect_err("nor cancel it");
    assert_eq!(err.rpc_code(), Some(era::INVALID_PARAMS), "{err}");

    let done = era::wait_task(&a.url, &task.task_id, WAIT).await.expect("task completes");
    assert_eq!(done.status, "completed", "{:?}", done.raw);
    assert_eq!(done.result_text(), Some("pod-a"), "{:?}", done.raw);
    assert_eq!(done.raw["resultType"], "complete", "{}", done.raw);
    eprintln!("tasks/get completed answer: {}", done.raw);
    // The terminal task stays readable (for a TTL).
    assert_eq!(era::get_task(&a.url, &task.task_id).await.unwrap().status, "completed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = a.stats().await;
    assert_eq!((stats["tasks_created"].as_u64(), stats["tasks_running"].as_u64()), (Some(2), Some(0)), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_update_are_served_by_the_task_manager() {
    let a = pod("pod-c", Era::Dual, false).await;
    let task = era::call_tool_as_task(&a.url, "slow_task", json!({"ms": 60_000})).await.unwrap().task().unwrap();
    // No input requests outstanding: tasks/update is acknowledged and ignored.
    era::update_task(&a.url, &task.task_id, json!({})).await.expect("tasks/update ack");
    let ack = era::cancel_task(&a.url, &task.task_id).await.expect("tasks/cancel ack");
    assert!(ack.is_object(), "{ack}");
    let state = era::wait_task(&a.url, &task.task_id, WAIT).await.unwrap();
    assert_eq!(state.status, "cancelled", "{:?}", state.raw);
    assert_eq!(a.stats().await["tasks_running"], 0);
    let err = era::update_task(&a.url, "no-such-task", json!({})).await.expect_err("unknown id");
    assert_eq!(err.rpc_code(), Some(era::INVALID_PARAMS), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_extension_tools_answer_synchronously() {
    let a = pod("pod-d", Era::Dual, false).await;
    let answer = era::call_tool(&a.url, "slow_task", json!({"ms": 50}), &Options::default()).await.unwrap();
    assert!(matches!(answer, ToolAnswer::Complete(_)), "{answer:?}");
    assert_eq!(answer.text(), Some("pod-d"));
    // echo/whoami are never tasks, even when the request declares the extension.
    let who = era::call_tool_as_task(&a.url, "whoami", json!({})).await.unwrap();
    assert_eq!(who.text(), Some("pod-d"), "{who:?}");
    assert_eq!(a.stats().await["tasks_created"], 0);

    // tasks/* from a request that does not declare the extension: -32021 (HTTP 400).
    let err = era::request(&a.url, "tasks/get", json!({"taskId": "x"}), &Options::default()).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(era::MISSING_REQUIRED_CLIENT_CAPABILITY), "{err}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_name_must_match_the_task_id() {
    let a = pod("pod-e", Era::Dual, false).await;
    let task = era::call_tool_as_task(&a.url, "slow_task", json!({"ms": 100})).await.unwrap().task().unwrap();
    let wrong = Options::tasks().header("Mcp-Name", "some-other-task");
    let err = era::get_task_with(&a.url, &task.task_id, &wrong).await.expect_err("wrong Mcp-Name");
    assert_eq!((err.rpc_code(), err.status().map(|s| s.as_u16())), (Some(era::HEADER_MISMATCH), Some(400)), "{err}");
    let err = era::get_task_with(&a.url, &task.task_id, &Options::tasks().without("Mcp-Name")).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(era::HEADER_MISMATCH), "{err}");
    // Extra (routing) headers are passed along and change nothing.
    let ok = era::get_task_with(&a.url, &task.task_id, &Options::tasks().header("x-mcp-affinity-route", "pod-e")).await;
    assert_eq!(ok.expect("extra header").task_id, task.task_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_era_serves_2025_sessions_on_the_same_endpoint() {
    let a = pod("pod-f", Era::Dual, false).await;
    let session = mcp_client::connect(&a.url).await.expect("2025 initialize on a dual pod");
    assert!(session.initialize_response.is_sse(), "2025 answers stay SSE");
    assert_eq!(session.whoami().await.unwrap(), "pod-f");
    let mut tools = session.list_tools().await.unwrap();
    tools.sort();
    assert_eq!(tools, ["echo", "slow_task", "whoami"]);
    // A 2025 session that did not declare tasks gets slow_task synchronously.
    assert_eq!(session.call_tool_text("slow_task", json!({"ms": 10})).await.unwrap(), "pod-f");

    // Interleaved 2026 traffic on the same process.
    let task = era::call_tool_as_task(&a.url, "slow_task", json!({"ms": 50})).await.unwrap().task().unwrap();
    assert_eq!(era::wait_task(&a.url, &task.task_id, WAIT).await.unwrap().result_text(), Some("pod-f"));
    assert_eq!(session.echo("still here").await.unwrap(), "still here");
    let stats = a.stats().await;
    assert_eq!((stats["initializations"].as_u64(), stats["tasks_created"].as_u64()), (Some(1), Some(1)), "{stats}");

    let discover = era::server_discover(&a.url).await.expect("server/discover");
    assert!(discover.pointer("/capabilities/extensions/io.modelcontextprotocol~1tasks").is_some(), "{discover}");
    eprintln!("server/discover: {discover}");
}

#[tokio::test(flavor = "multi_thread")]
async fn era_2025_offers_no_tasks() {
    let a = pod("pod-g", Era::V2025, false).await;
    let mut tools = era::list_tools(&a.url).await.expect("rmcp serves 2026 requests statelessly anyway");
    tools.sort();
    assert_eq!(tools, ["echo", "whoami"]);
    let err = era::get_task(&a.url, "x").await.expect_err("no tasks extension");
    assert_eq!(err.rpc_code(), Some(-32601), "{err}");
    let stats = a.stats().await;
    assert_eq!((stats["tasks_created"].as_u64(), stats["tasks_running"].as_u64()), (Some(0), Some(0)), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn era_2026_only_and_sse_answers() {
    let a = pod("pod-h", Era::V2026, true).await;
    let (_, raw) = era::send_raw(&a.url, "tools/call", json!({"name": "slow_task", "arguments": {"ms": 50}}), &Options::tasks())
        .await
        .unwrap();
    assert!(raw.is_sse(), "--sse-2026: {:?}", raw.headers);
    eprintln!("SSE tools/call task answer: {:?}", raw.text());
    let task = era::call_tool_as_task(&a.url, "slow_task", json!({"ms": 50})).await.unwrap().task().expect("task over SSE");
    let done = era::wait_task(&a.url, &task.task_id, WAIT).await.unwrap();
    assert_eq!(done.result_text(), Some("pod-h"));
    let err = era::get_task(&a.url, "no-such-task").await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(era::INVALID_PARAMS), "{err}");
    // No sessions: an initialize gets no Mcp-Session-Id.
    let init = mcp_client::post_raw(
        &a.url,
        &[("content-type", "application/json"), ("accept", mcp_client::ACCEPT_BOTH)],
        mcp_client::initialize_body(1, mcp_client::DEFAULT_PROTOCOL_VERSION).to_string(),
    )
    .await
    .unwrap();
    assert!(init.header("mcp-session-id").is_none(), "{:?}", init.headers);
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_takes_the_era_flag() {
    let addr = free_addr();
    let mut cmd = Command::new(workspace_bin("mcp-affinity-demo-server"));
    cmd.args(["--listen", &addr.to_string(), "--name", "pod-bin", "--era", "dual"]);
    let _pod = Child::spawn_listening("pod-bin", cmd, addr).expect("start demo server");
    let url = format!("http://{addr}/mcp");
    let task = era::call_tool_as_task(&url, "slow_task", json!({"ms": 20})).await.unwrap().task().expect("a task");
    assert_eq!(era::wait_task(&url, &task.task_id, WAIT).await.unwrap().result_text(), Some("pod-bin"));
    assert_eq!(mcp_client::connect(&url).await.unwrap().whoami().await.unwrap(), "pod-bin");
}
