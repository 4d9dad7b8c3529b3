//! End-to-end pinning on real processes: demo MCP pods behind real Envoy running the
//! filter `.wasm`.

use std::collections::HashSet;

use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions, initializations, pods};
use mcp_affinity_harness::mcp_client::{self, Session};
use mcp_affinity_harness::rmcp_client;
use serde_json::json;

const SESSIONS: usize = 20;
const CALLS: usize = 10;

/// What happened to `SESSIONS` concurrent sessions of `CALLS` `tools/call` each.
#[derive(Debug, Default)]
struct Outcome {
    ok_calls: usize,
    failed: Vec<String>,
    /// Sessions whose `whoami` changed between calls.
    moved: usize,
}

async fn run_sessions(url: &str) -> Outcome {
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let s = match mcp_client::connect(&url).await {
                    Ok(s) => s,
                    Err(e) => {
                        out.failed.push(format!("session {i}: connect: {e:#}"));
                        return out;
                    }
                };
                let mut seen = HashSet::new();
                for c in 0..CALLS {
                    let r = if c % 2 == 0 { s.whoami().await } else { s.echo(&format!("{i}/{c}")).await.map(|_| String::new()) };
                    match r {
                        Ok(name) => {
                            out.ok_calls += 1;
                            if !name.is_empty() {
                                seen.insert(name);
                            }
                        }
                        Err(e) => out.failed.push(format!("session {i} call {c}: {e}")),
                    }
                }
                if seen.len() > 1 {
                    out.moved += 1;
                }
                out
            })
        })
        .collect();
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.unwrap();
        total.ok_calls += o.ok_calls;
        total.failed.extend(o.failed);
        total.moved += o.moved;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_sessions_ten_calls_each_stay_on_their_pod() {
    let pods = pods(3).unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions::default()).unwrap();
    let outcome = run_sessions(&proxy.url()).await;
    assert!(outcome.failed.is_empty(), "failures: {:#?}", outcome.failed);
    assert_eq!(outcome.ok_calls, SESSIONS * CALLS);
    assert_eq!(outcome.moved, 0, "a session's whoami changed");
    assert_eq!(proxy.metric("sessions_pinned").await.unwrap(), SESSIONS as i64);
    // initialized notification + CALLS calls per session, all routed by pin.
    let expected = (SESSIONS * (CALLS + 1)) as i64;
    assert_eq!(proxy.metric_reaching("requests_pinned", expected).await.unwrap(), expected);
    assert_eq!(proxy.metric("unknown_session").await.unwrap(), 0);
    assert_eq!(initializations(&pods).await, SESSIONS as u64, "only the clients' own initialize requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_filter_the_same_scenario_fails() {
    let pods = pods(3).unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions { no_filter: true, ..Default::default() }).unwrap();
    let outcome = run_sessions(&proxy.url()).await;
    assert!(!outcome.failed.is_empty(), "round robin over 3 pods must break stateful sessions: {outcome:?}");
    assert!(outcome.failed.iter().any(|f| f.contains("404")), "pods answer unknown sessions with 404: {:#?}", &outcome.failed[..3.min(outcome.failed.len())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sent_pin_header_cannot_choose_the_upstream() {
    let pods = pods(2).unwrap();
    let decoy = Pod::start("decoy").unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions::default()).unwrap();
    let decoy_addr = decoy.addr.to_string();
    let spoof = [("x-session-pod", decoy_addr.as_str())];
    for _ in 0..4 {
        // initialize carrying a spoofed header: still load-balanced over the service.
        let s = mcp_client::initialize_with(&proxy.url(), "2025-06-18", &spoof).await.unwrap();
        let server = s.server_name().unwrap().to_string();
        assert!(!server.ends_with("decoy"), "initialize reached {server}");
        s.notify_initialized().await.unwrap();
        let pinned = s.whoami().await.unwrap();
        // Later requests with the spoofed header still go to the pinned pod.
        let r = s.post_raw(&spoof, json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"whoami","arguments":{}}}).to_string()).await.unwrap();
        assert_eq!(r.status, 200);
        let messages = r.messages();
        let answer = messages.iter().find(|m| m["id"] == 9).unwrap_or_else(|| panic!("no answer in {}", r.text()));
        let text = answer["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
        assert_eq!(text, pinned, "spoofed pin header was obeyed");
        assert_ne!(text, "decoy");
    }
    // Envoy's early header mutation (envoy/envoy.yaml) drops the client's header before any
    // HTTP filter runs, so the filter's own removal (its second line of defence) never fires.
    assert_eq!(proxy.metric("client_pin_header_removed").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_results() {
    let pods = pods(2).unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions { filter_config: r#"{"max_body_bytes":4096}"#.into(), ..Default::default() }).unwrap();
    let url = proxy.url();
    let accept = ("accept", "application/json, text/event-stream");
    let ctype = ("content-type", "application/json");

    // Invalid session id: 400 with a JSON-RPC error from the filter; nothing forwarded.
    let r = mcp_client::post_raw(&url, &[accept, ctype, ("mcp-session-id", "not valid")], "{}").await.unwrap();
    assert_eq!(r.status, 400);
    let body = r.json().unwrap();
    assert_eq!(body["error"]["code"], -32600, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("0x20"), "{body}");

    // Unknown (well-formed) session id: 404 JSON-RPC -32001, the MCP signal to re-initialize.
    let r = mcp_client::post_raw(&url, &[accept, ctype, ("mcp-session-id", "never-issued")], "{}").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["error"]["code"], -32001);

    // Malformed JSON and an oversized body: passed through unpinned; the upstream answers.
    // Without control the filter never reads a body (only control's record keeps the
    // `initialize`), so neither is counted; with control they are (filter unit tests).
    let r = mcp_client::post_raw(&url, &[accept, ctype], "{not json").await.unwrap();
    assert!(r.status.is_client_error(), "the MCP server rejects it itself: {}", r.status);
    let big = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"x".repeat(8000),"version":"1"}}});
    let r = mcp_client::post_raw(&url, &[accept, ctype], big.to_string()).await.unwrap();
    assert_eq!(r.status, 200, "forwarded whole to the upstream");
    for counter in ["malformed_body", "body_too_large", "initialize_seen"] {
        assert_eq!(proxy.metric(counter).await.unwrap(), 0, "{counter}: no body is read without control");
    }
    // Its session is still pinned from the response (the upstream issued an id).
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let s = Session::with_id(&url, &sid);
    s.notify_initialized().await.unwrap();
    let first = s.whoami().await.unwrap();
    assert_eq!(s.whoami().await.unwrap(), first);

    // MCP 2026-07-28 style traffic (no initialize, no session id) passes through untouched
    // and pins nothing: the stateful demo server itself refuses it.
    let before = proxy.metric("sessions_pinned").await.unwrap();
    let r = mcp_client::post_raw(&url, &[accept, ctype, ("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/list")], json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string()).await.unwrap();
    assert!(r.header("mcp-session-id").is_none());
    assert!(!r.text().contains("Session not found"), "not the filter's answer: {}", r.text());
    assert_eq!(proxy.metric("sessions_pinned").await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_ends_the_session_at_the_proxy_too() {
    let pods = pods(2).unwrap();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions::default()).unwrap();
    let s = mcp_client::connect(&proxy.url()).await.unwrap();
    s.whoami().await.unwrap();
    let r = s.delete().await.unwrap();
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(proxy.metric("sessions_forgotten").await.unwrap(), 1);
    let err = s.whoami().await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
    assert_eq!(err.jsonrpc_code(), Some(-32001), "answered by the filter: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rmcp_client_works_through_the_proxy() {
    let pods = pods(3).unwrap();
    let names: HashSet<_> = pods.iter().map(|p| p.name.clone()).collect();
    let proxy = Proxy::start(&pods.iter().map(|p| p.addr).collect::<Vec<_>>(), ProxyOptions::default()).unwrap();
    for _ in 0..3 {
        let report = rmcp_client::check(&proxy.url(), "hello").await.unwrap();
        assert_eq!(report.tools, vec!["echo".to_string(), "whoami".to_string()]);
        assert!(names.contains(&report.whoami), "{report:?}");
        assert_eq!(report.echo, "hello");
    }
    assert_eq!(proxy.metric("unknown_session").await.unwrap(), 0);
}

/// Shipped in its response matcher (`envoy/envoy.yaml`), the filter is not called for the
/// 2xx answers to a session's POSTs: Envoy decides that natively, and the answer costs no
/// call into the VM. `initialize` and DELETE answers still reach it (they pin and forget).
/// Loaded plainly (`no_response_matcher`, as an Istio WasmPlugin loads it), every answer
/// reaches it; pinning works the same both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_answers_skip_the_filter_in_its_response_matcher() {
    const CALLS: i64 = 8;
    let pods = pods(2).unwrap();
    let addrs: Vec<_> = pods.iter().map(|p| p.addr).collect();
    for no_response_matcher in [false, true] {
        // One worker VM: its per-request counters are flushed together, in order.
        let proxy = Proxy::start(&addrs, ProxyOptions { no_response_matcher, concurrency: Some(1), ..Default::default() }).unwrap();
        let a = mcp_client::connect(&proxy.url()).await.unwrap();
        let pod = a.whoami().await.unwrap();
        for _ in 1..CALLS {
            assert_eq!(a.whoami().await.unwrap(), pod, "pinned");
        }
        assert!(a.delete().await.unwrap().status.is_success());
        // B's notifications/initialized is counted (requests_pinned) after every answer
        // above was: once it shows, so do they.
        let _b = mcp_client::connect(&proxy.url()).await.unwrap();
        let pinned = 1 + CALLS + 1 + 1;
        assert_eq!(proxy.metric_reaching("requests_pinned", pinned).await.unwrap(), pinned);
        let seen = proxy.metric("response_headers_seen").await.unwrap();
        // Seen in both: A's and B's initialize answers, A's DELETE answer.
        if no_response_matcher {
            assert!(seen >= 3 + 1 + CALLS, "every answer reaches a plainly loaded filter: {seen}");
        } else {
            assert_eq!(seen, 3, "only initialize and DELETE answers reach the filter in its matcher");
        }
        assert_eq!(proxy.metric("sessions_forgotten").await.unwrap(), 1);
    }
}
