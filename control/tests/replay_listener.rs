//! The replay listener (`--replay-listen`) end to end: the real service on free loopback
//! ports ([`mcp_affinity_control::serve_listeners`], and [`mcp_affinity_control::serve`]
//! binding the flag's address), fake MCP pods on free loopback ports, records written
//! through the `/v1` API, and the requests Envoy would retry sent to the replay listener
//! as Envoy sends them (the client's headers and body, `x-session-pod`, no control token).
//! Every pod and control started here is stopped when its test ends.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use clap::Parser;
use mcp_affinity_control::config::Config;
use mcp_affinity_control::replay_listener::{CLIENT_SESSION_HEADER, PIN_HEADER, POD_HEADER, SESSION_HEADER};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const TOOL_CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo"}}"#;
const FAILING_CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"fail"}}"#;

/// A fake MCP server pod on a free loopback port, stopped when dropped. `initialize`
/// creates session `re-1`; a request in a session it does not know gets 404 + JSON-RPC
/// -32001; `tools/call` of tool `fail` gets a genuine 400 + JSON-RPC -32602; any other
/// request a JSON result naming its session. Every request is logged as `method session
/// authorization`.
struct Pod {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pod {
    async fn start(known: &[&str]) -> Pod {
        let log = Arc::new(Mutex::new(Vec::new()));
        let known: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(known.iter().map(|s| s.to_string()).collect()));
        let seen = log.clone();
        let handler = move |headers: HeaderMap, body: String| {
            let (seen, known) = (seen.clone(), known.clone());
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                let method = v["method"].as_str().unwrap_or("").to_string();
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                let sid = h("mcp-session-id");
                seen.lock().unwrap().push(format!("{method} {sid} {}", h("authorization")));
                let json_ct = [("content-type", "application/json")];
                if method == "initialize" {
                    known.lock().unwrap().insert("re-1".into());
                    let result = json!({"jsonrpc": "2.0", "id": v["id"], "result": {"protocolVersion": "2025-06-18"}});
                    return (json_ct, [("mcp-session-id", "re-1")], result.to_string()).into_response();
                }
                if !known.lock().unwrap().contains(&sid) {
                    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32001, "message": "Session not found"}});
                    return (StatusCode::NOT_FOUND, json_ct, body.to_string()).into_response();
                }
                if method.starts_with("notifications/") {
                    return StatusCode::ACCEPTED.into_response();
                }
                if v["params"]["name"] == "fail" {
                    let body = json!({"jsonrpc": "2.0", "id": v["id"], "error": {"code": -32602, "message": "Unknown tool: fail"}});
                    return (StatusCode::BAD_REQUEST, json_ct, body.to_string()).into_response();
                }
                let result = json!({"jsonrpc": "2.0", "id": v["id"], "result": {"session": sid, "method": method}});
                (json_ct, result.to_string()).into_response()
            }
        };
        let app = axum::Router::new().route("/mcp", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Pod { addr, log, task }
    }

    /// The log, each line cut to `method session`.
    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
    }
}

/// A loopback address nothing listens on (a pod that is gone).
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Control (memory store, token `t`, recovery `endpoints`) serving the API and the
/// replay listener on free loopback ports; stopped when dropped.
struct Control {
    api: SocketAddr,
    replay: SocketAddr,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn config(endpoints: &[SocketAddr], more: &[&str]) -> Config {
    let list = endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec!["mcp-affinity-control", "--token", "t", "--recovery-timeout-ms", "5000"];
    if !endpoints.is_empty() {
        args.extend(["--endpoints", list.as_str()]);
    }
    args.extend(more);
    Config::try_parse_from(args).unwrap()
}

impl Control {
    async fn start(endpoints: &[SocketAddr]) -> Control {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let replay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (api_addr, replay_addr) = (api.local_addr().unwrap(), replay.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(mcp_affinity_control::serve_listeners(config(endpoints, &[]), api, Some(replay), shutdown));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Control { api: api_addr, replay: replay_addr, http, stop: Some(stop), task }
    }

    /// Writes the record of `id` through the API: pinned to `upstream` as `backend` at
    /// `generation`.
    async fn put(&self, id: &str, upstream: SocketAddr, backend: &str, generation: u64) {
        let body = json!({
            "upstream": upstream.to_string(), "backend_session_id": backend, "generation": generation,
            "initialize": r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#, "protocol_version": "2025-06-18",
        });
        let url = format!("http://{}/v1/sessions/{id}", self.api);
        let response = self.http.put(url).bearer_auth("t").body(body.to_string()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 201);
    }

    /// The record of `id` (`None` on 404).
    async fn get(&self, id: &str) -> Option<Value> {
        let response = self.http.get(format!("http://{}/v1/sessions/{id}", self.api)).bearer_auth("t").send().await.unwrap();
        match response.status().as_u16() {
            404 => None,
            200 => Some(serde_json::from_str(&response.text().await.unwrap()).unwrap()),
            other => panic!("GET record: {other}"),
        }
    }

    async fn metrics(&self) -> String {
        self.http.get(format!("http://{}/metrics", self.api)).send().await.unwrap().text().await.unwrap()
    }

    /// Stops control gracefully and checks it ended without error.
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let task = &mut self.task;
        tokio::time::timeout(std::time::Duration::from_secs(10), task).await.expect("control stops").unwrap().unwrap();
    }
}

/// The answer of the replay listener: status, headers, body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// Sends `method /mcp?x=1` to `addr` as Envoy retries it: the client's headers (its own
/// `Authorization`, never control's token) plus `headers`, and `body`.
async fn retried(addr: SocketAddr, method: reqwest::Method, headers: &[(&str, &str)], body: &str) -> Answer {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = http
        .request(method, format!("http://{addr}/mcp?x=1"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .header("authorization", "Bearer client-token")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    Answer { status: response.status().as_u16(), headers: response.headers().clone(), body: response.text().await.unwrap() }
}

#[tokio::test]
async fn dead_pod_reinitializes_on_a_live_pod_and_replays() {
    let dead = closed_port();
    let live = Pod::start(&[]).await;
    let control = Control::start(&[dead, live.addr]).await;
    control.put("client-1", dead, "client-1", 1).await;
    let pod = dead.to_string();
    let answer =
        retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "client-1"), (POD_HEADER, &pod)], TOOL_CALL).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.json(), json!({"jsonrpc": "2.0", "id": 7, "result": {"session": "re-1", "method": "tools/call"}}));
    assert_eq!(answer.header(SESSION_HEADER), Some("client-1"));
    assert_eq!(answer.header(PIN_HEADER), Some(format!("{} re-1 2", live.addr).as_str()));
    assert_eq!(live.calls(), ["initialize -", "notifications/initialized re-1", "tools/call re-1"]);
    // The client's own Authorization reached the pod.
    assert!(live.log.lock().unwrap().iter().all(|l| l.ends_with("Bearer client-token")), "{:?}", live.log);
    let record = control.get("client-1").await.unwrap();
    assert_eq!((record["upstream"].as_str(), record["backend_session_id"].as_str(), record["generation"].as_u64()),
               (Some(live.addr.to_string().as_str()), Some("re-1"), Some(2)));
    let metrics = control.metrics().await;
    assert!(metrics.contains(r#"mcp_affinity_control_replay_listener_requests_total{result="replayed"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"mcp_affinity_control_recoveries_total{outcome="replayed"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"mcp_affinity_control_probes_total{result="unreachable"} 1"#), "{metrics}");
    control.stop().await;
}

#[tokio::test]
async fn live_session_error_is_sent_again_to_the_same_pod() {
    let pod = Pod::start(&["client-1"]).await;
    let other = Pod::start(&[]).await;
    let control = Control::start(&[pod.addr, other.addr]).await;
    control.put("client-1", pod.addr, "client-1", 1).await;
    let failed = pod.addr.to_string();
    let answer =
        retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "client-1"), (POD_HEADER, &failed)], FAILING_CALL).await;
    // The pod's genuine answer to the request sent once more, pin unchanged.
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.json(), json!({"jsonrpc": "2.0", "id": 7, "error": {"code": -32602, "message": "Unknown tool: fail"}}));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header(SESSION_HEADER), Some("client-1"));
    assert_eq!(answer.header(PIN_HEADER), Some(format!("{} client-1 1", pod.addr).as_str()));
    assert_eq!(pod.calls(), ["ping client-1", "tools/call client-1"], "probe, then the request once");
    assert!(other.calls().is_empty(), "no re-initialization");
    assert_eq!(control.get("client-1").await.unwrap()["generation"], 1);
    let metrics = control.metrics().await;
    assert!(metrics.contains(r#"mcp_affinity_control_replay_listener_requests_total{result="alive"} 1"#), "{metrics}");
    assert!(metrics.contains("mcp_affinity_control_reinitializations_total 0"), "{metrics}");
    control.stop().await;
}

/// The session was already moved from `old` (gone) to a live pod at generation 2 by
/// another instance; Envoy's retry names `old` as `pod_header(old)`: the request is
/// replayed on the current pin, with no probe and no re-initialization.
async fn moved_session_is_replayed_on_its_current_pin(pod_header: fn(SocketAddr) -> String) {
    let old = closed_port();
    let current = Pod::start(&["b-2"]).await;
    let control = Control::start(&[current.addr]).await;
    control.put("client-1", current.addr, "b-2", 2).await;
    let failed = pod_header(old);
    let answer =
        retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "client-1"), (POD_HEADER, &failed)], TOOL_CALL).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["result"], json!({"session": "b-2", "method": "tools/call"}));
    assert_eq!(answer.header(SESSION_HEADER), Some("client-1"));
    assert_eq!(answer.header(PIN_HEADER), Some(format!("{} b-2 2", current.addr).as_str()));
    assert_eq!(current.calls(), ["tools/call b-2"], "only the replay: no probe, no initialize");
    assert_eq!(control.get("client-1").await.unwrap()["generation"], 2);
    control.stop().await;
}

#[tokio::test]
async fn moved_session_plain_pod_header() {
    moved_session_is_replayed_on_its_current_pin(|old| old.to_string()).await;
}

#[tokio::test]
async fn moved_session_base64_pod_header() {
    moved_session_is_replayed_on_its_current_pin(|old| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, old.to_string())).await;
}

#[tokio::test]
async fn unknown_session_is_404_session_not_found() {
    let pod = Pod::start(&[]).await;
    let control = Control::start(&[pod.addr]).await;
    let answer = retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "nobody")], TOOL_CALL).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.json(), json!({"jsonrpc": "2.0", "error": {"code": -32001, "message": "Session not found"}, "id": 7}));
    assert_eq!((answer.header(SESSION_HEADER), answer.header(PIN_HEADER)), (None, None));
    assert!(pod.calls().is_empty());
    let metrics = control.metrics().await;
    assert!(metrics.contains(r#"mcp_affinity_control_replay_listener_requests_total{result="session_not_found"} 1"#), "{metrics}");
    control.stop().await;
}

#[tokio::test]
async fn client_session_header_names_the_record_behind_a_backend_id() {
    // After an earlier recovery the pod knew the session as b-7; it restarted and lost it.
    let pod = Pod::start(&[]).await;
    let control = Control::start(&[pod.addr]).await;
    control.put("client-1", pod.addr, "b-7", 3).await;
    let failed = pod.addr.to_string();
    // Without the client's id, the backend id is no record.
    let alone = retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "b-7"), (POD_HEADER, &failed)], TOOL_CALL).await;
    assert_eq!(alone.status, 404);
    let headers = [(SESSION_HEADER, "b-7"), (CLIENT_SESSION_HEADER, "client-1"), (POD_HEADER, failed.as_str())];
    let answer = retried(control.replay, reqwest::Method::POST, &headers, TOOL_CALL).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["result"]["session"], "re-1");
    assert_eq!(answer.header(SESSION_HEADER), Some("client-1"), "the client's id, not a backend id");
    assert_eq!(answer.header(PIN_HEADER), Some(format!("{} re-1 4", pod.addr).as_str()));
    assert_eq!(pod.calls(), ["ping b-7", "initialize -", "notifications/initialized re-1", "tools/call re-1"]);
    control.stop().await;
}

#[tokio::test]
async fn delete_deletes_the_record() {
    let pod = Pod::start(&["client-1"]).await;
    let control = Control::start(&[pod.addr]).await;
    control.put("client-1", pod.addr, "client-1", 1).await;
    let answer = retried(control.replay, reqwest::Method::DELETE, &[(SESSION_HEADER, "client-1")], "").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "");
    assert_eq!((answer.header(SESSION_HEADER), answer.header(PIN_HEADER)), (Some("client-1"), None));
    assert!(control.get("client-1").await.is_none(), "record deleted");
    assert!(pod.calls().is_empty(), "no recovery, no call to the pod");
    let again = retried(control.replay, reqwest::Method::DELETE, &[(SESSION_HEADER, "client-1")], "").await;
    assert_eq!(again.status, 404);
    control.stop().await;
}

#[tokio::test]
async fn missing_or_invalid_session_id_is_400() {
    let control = Control::start(&[]).await;
    for headers in [&[][..], &[(SESSION_HEADER, "a b")], &[(SESSION_HEADER, "client-1"), (CLIENT_SESSION_HEADER, "")]] {
        let answer = retried(control.replay, reqwest::Method::POST, headers, TOOL_CALL).await;
        assert_eq!(answer.status, 400, "{headers:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let v = answer.json();
        assert_eq!((v["jsonrpc"].as_str(), v["id"].clone(), v["error"]["code"].as_i64()), (Some("2.0"), Value::Null, Some(-32600)), "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    control.stop().await;
}

#[tokio::test]
async fn serve_binds_the_replay_listen_address() {
    let pod = Pod::start(&["client-1"]).await;
    let replay = closed_port();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = api.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let flag = replay.to_string();
    let config = config(&[pod.addr], &["--replay-listen", &flag]);
    let task = tokio::spawn(mcp_affinity_control::serve(config, api, async move {
        let _ = stopped.await;
    }));
    let control = Control { api: api_addr, replay, http: reqwest::Client::builder().no_proxy().build().unwrap(), stop: Some(stop), task };
    control.put("client-1", pod.addr, "client-1", 1).await;
    let answer = retried(control.replay, reqwest::Method::POST, &[(SESSION_HEADER, "client-1")], TOOL_CALL).await;
    // The pod knew the session (probe alive): the request sent once more, pin unchanged.
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header(PIN_HEADER), Some(format!("{} client-1 1", pod.addr).as_str()));
    assert_eq!(pod.calls(), ["ping client-1", "tools/call client-1"]);
    control.stop().await;
}
