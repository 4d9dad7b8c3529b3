//! The demo MCP server binary, driven over real HTTP on 127.0.0.1 by the raw test client
//! and by the rmcp client.

use std::net::SocketAddr;
use std::process::Command;

use mcp_affinity_harness::demo_server::{SPEC_UNKNOWN_SESSION_BODY, TS_SDK_UNKNOWN_SESSION_BODY};
use mcp_affinity_harness::mcp_client::{self, CallError, Session};
use mcp_affinity_harness::process::{Child, free_addr, workspace_bin};
use mcp_affinity_harness::rmcp_client::{self, RmcpClient};
use serde_json::{Value, json};

/// Starts the demo server on `addr` and waits until it listens.
fn start_on(addr: SocketAddr, name: &str, unknown_session: &str) -> Child {
    let mut cmd = Command::new(workspace_bin("mcp-affinity-demo-server"));
    cmd.args(["--listen", &addr.to_string(), "--name", name, "--unknown-session", unknown_session]);
    Child::spawn_listening(name, cmd, addr).expect("start demo server")
}

/// Starts the demo server on a free port; returns it and its MCP URL.
fn start(name: &str, unknown_session: &str) -> (Child, String) {
    let addr = free_addr();
    let child = start_on(addr, name, unknown_session);
    (child, format!("http://{addr}/mcp"))
}

fn http_status(err: &CallError) -> u16 {
    err.status().map(|s| s.as_u16()).unwrap_or_else(|| panic!("expected an HTTP answer, got {err}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn initialize_whoami_echo_list_tools() {
    let (_pod, url) = start("pod-a", "spec");
    let session = mcp_client::initialize(&url).await.expect("initialize");
    assert!(!session.session_id.is_empty());
    assert!(session.session_id.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{}", session.session_id);
    // Stateful rmcp answers requests with SSE (documented in demo_server.rs).
    assert!(session.initialize_response.is_sse(), "{:?}", session.initialize_response.headers);
    assert_eq!(session.server_name(), Some("mcp-affinity-demo-server/pod-a"));
    session.notify_initialized().await.expect("initialized");

    assert_eq!(session.whoami().await.expect("whoami"), "pod-a");
    assert_eq!(session.echo("hello, pod").await.expect("echo"), "hello, pod");
    let mut tools = session.list_tools().await.expect("tools/list");
    tools.sort();
    assert_eq!(tools, ["echo", "whoami"]);

    // Many calls on one session from several tasks at once.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = session.clone();
        tasks.push(tokio::spawn(async move { s.echo(&format!("msg-{i}")).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().expect("echo"), format!("msg-{i}"));
    }

    // echo's optional sleep_ms holds the request and still answers.
    let held = session.call_tool_text("echo", json!({"text": "late", "sleep_ms": 50})).await;
    assert_eq!(held.expect("echo with sleep_ms"), "late");

    // Unknown tool: a JSON-RPC error or an isError result, never a success.
    match session.call_tool("no-such-tool", json!({})).await {
        Err(CallError::JsonRpc { .. }) => {}
        Ok(result) => assert_eq!(result.get("isError"), Some(&Value::Bool(true)), "{result}"),
        Err(e) => panic!("unexpected error for unknown tool: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_independent_and_have_distinct_ids() {
    let (_pod, url) = start("pod-b", "spec");
    let a = mcp_client::connect(&url).await.expect("session a");
    let b = mcp_client::connect(&url).await.expect("session b");
    assert_ne!(a.session_id, b.session_id);
    assert_eq!(a.whoami().await.unwrap(), "pod-b");
    assert_eq!(b.whoami().await.unwrap(), "pod-b");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_session_is_404_in_spec_style() {
    let (_pod, url) = start("pod-spec", "spec");
    // A live session on the same server, to show only the unknown id is refused.
    let live = mcp_client::connect(&url).await.expect("connect");

    let ghost = Session::with_id(&url, "no-such-session-0123");
    let err = ghost.whoami().await.expect_err("unknown session must fail");
    assert_eq!(http_status(&err), 404, "{err}");
    match &err {
        CallError::Http { body, .. } => assert_eq!(body, SPEC_UNKNOWN_SESSION_BODY),
        other => panic!("{other}"),
    }

    // Notifications, GET and DELETE with an unknown id: 404 as well.
    let resp = ghost
        .post_raw(&[], json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string())
        .await
        .unwrap();
    assert_eq!(resp.status.as_u16(), 404, "{}", resp.text());
    let get = mcp_client::send_raw(
        &mcp_client::http_client(),
        reqwest::Method::GET,
        &url,
        &{
            let mut h = ghost.default_headers();
            h.insert("accept", "text/event-stream".parse().unwrap());
            h
        },
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(get.status.as_u16(), 404, "{}", get.text());
    let del = ghost.delete().await.unwrap();
    assert_eq!(del.status.as_u16(), 404, "{}", del.text());

    assert_eq!(live.whoami().await.expect("live session still works"), "pod-spec");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_session_is_400_minus_32000_in_ts_sdk_style() {
    let (_pod, url) = start("pod-ts", "ts-sdk");
    let live = mcp_client::connect(&url).await.expect("connect");
    assert_eq!(live.whoami().await.expect("whoami"), "pod-ts");
    // Like TypeScript-SDK servers, every answer to a known session names it.
    let resp = live.post_raw(&[], json!({"jsonrpc": "2.0", "id": 7, "method": "ping"}).to_string()).await.unwrap();
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    assert_eq!(resp.header("mcp-session-id"), Some(live.session_id.as_str()));

    let ghost = Session::with_id(&url, "no-such-session-0123");
    let err = ghost.echo("x").await.expect_err("unknown session must fail");
    assert_eq!(http_status(&err), 400, "{err}");
    assert_eq!(err.jsonrpc_code(), Some(-32000));
    match &err {
        CallError::Http { body, headers, .. } => {
            assert_eq!(body, TS_SDK_UNKNOWN_SESSION_BODY);
            assert_eq!(headers.get("content-type").unwrap(), "application/json");
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"]["message"], "Bad Request: No valid session ID provided");
            assert_eq!(v["id"], Value::Null);
        }
        other => panic!("{other}"),
    }
    let del = ghost.delete().await.unwrap();
    assert_eq!(del.status.as_u16(), 400, "{}", del.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_ends_the_session() {
    let (_pod, url) = start("pod-del", "spec");
    let doomed = mcp_client::connect(&url).await.expect("connect");
    let other = mcp_client::connect(&url).await.expect("connect");
    assert_eq!(doomed.whoami().await.unwrap(), "pod-del");

    let resp = doomed.delete().await.expect("DELETE");
    assert!(resp.status.is_success(), "DELETE: {} {}", resp.status, resp.text());

    let err = doomed.whoami().await.expect_err("deleted session must be gone");
    assert_eq!(http_status(&err), 404, "{err}");
    let again = doomed.delete().await.unwrap();
    assert_eq!(again.status.as_u16(), 404, "second DELETE: {}", again.text());
    assert_eq!(other.whoami().await.expect("other session unaffected"), "pod-del");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_session_or_with_bad_accept() {
    let (_pod, url) = start("pod-raw", "spec");
    // A tools/call without a session id: 400 (not a new session).
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    let resp = mcp_client::post_raw(
        &url,
        &[("accept", mcp_client::ACCEPT_BOTH), ("content-type", "application/json")],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status.as_u16(), 400, "{}", resp.text());
    assert!(resp.header("mcp-session-id").is_none());
    // Accept without text/event-stream: 406 from rmcp.
    let resp = mcp_client::post_raw(&url, &[("accept", "application/json"), ("content-type", "application/json")], body)
        .await
        .unwrap();
    assert_eq!(resp.status.as_u16(), 406, "{}", resp.text());
    // Other paths are not the MCP endpoint.
    let other = url.replace("/mcp", "/other");
    let resp = mcp_client::post_raw(
        &other,
        &[("accept", mcp_client::ACCEPT_BOTH), ("content-type", "application/json")],
        mcp_client::initialize_body(0, mcp_client::DEFAULT_PROTOCOL_VERSION).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status.as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn rmcp_client_lists_tools_and_calls_them() {
    let (_pod, url) = start("pod-rmcp", "spec");
    let report = rmcp_client::check(&url, "through rmcp").await.expect("rmcp client check");
    assert_eq!(report.tools, ["echo", "whoami"]);
    assert_eq!(report.whoami, "pod-rmcp");
    assert_eq!(report.echo, "through rmcp");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_in_place_loses_sessions_and_rmcp_reinitializes() {
    let addr = free_addr();
    let url = format!("http://{addr}/mcp");
    let mut pod = start_on(addr, "pod-r", "spec");
    let raw = mcp_client::connect(&url).await.expect("connect");
    let rmcp = RmcpClient::connect(&url).await.expect("rmcp connect");
    assert_eq!(rmcp.whoami().await.unwrap(), "pod-r");

    // Restart in place: kill (the port is closed when kill returns), bind the same port.
    pod.kill();
    let _pod = start_on(addr, "pod-r", "spec");

    let err = raw.whoami().await.expect_err("session lost by the restart");
    assert_eq!(http_status(&err), 404, "{err}");
    let fresh = mcp_client::connect(&url).await.expect("new session after restart");
    assert_eq!(fresh.whoami().await.unwrap(), "pod-r");

    // rmcp's client gets 404 for its old session, re-initializes and retries by itself.
    assert_eq!(rmcp.echo("after restart").await.expect("rmcp after restart"), "after restart");
    assert_eq!(rmcp.whoami().await.unwrap(), "pod-r");
    rmcp.close().await.unwrap();
}
