//! Session recovery by the control service (`POST /v1/sessions/{id}/recover`), against
//! real demo MCP server pods (processes on free loopback ports) and, for the cross-instance
//! single flight, a real `redis-server`.
//!
//! Control runs in-process (the `mcp_affinity_control` library on a free port, with
//! `--endpoints` = the pods). Each test plays the filter: it creates a real session on a
//! pod with the raw MCP client, writes the record as the filter's write-through would
//! (PUT with the `initialize` and `notifications/initialized` bodies), breaks the pod, and
//! asks control to recover. Nothing depends on timing: single flight is checked by
//! counting re-initializations (`mcp_affinity_control_reinitializations_total`), which
//! must be exactly one per session however many recoveries race.
//!
//! `session_suspect` (the filter held a 400 + JSON answer it could not read) is checked
//! against pods that answer unknown sessions like TypeScript-SDK servers
//! (`--unknown-session ts-sdk`: 400 / -32000): control's probe decides between `alive`
//! (counted in `mcp_affinity_control_probes_total`) and a normal recovery.
//!
//! Drain-moves (reason `draining`: the pinned pod is draining, the filter asks before
//! sending the request) are checked the same way: drains are made through the API
//! (`POST /v1/upstreams/{upstream}/drain`), and the pods' own counters of sessions created
//! (`/demo/stats`) show that exactly one re-initialization happened and where.

use std::net::SocketAddr;
use std::time::Duration;

use mcp_affinity_harness::fixtures::mesh::{Pod, pods};
use mcp_affinity_proto::sessions::encode_segment as encode;
use mcp_affinity_harness::fixtures::control::InProcessControl;
use mcp_affinity_harness::fixtures::redis::RedisServer;
use mcp_affinity_harness::mcp_client::{self, Session};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN: &str = "recover-token-0123456789";
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// A control service running in this process, stopped when dropped.
struct Control {
    base: String,
    http: reqwest::Client,
    _server: InProcessControl,
}

impl Control {
    /// Starts control with `store` (`memory` or a Redis URL) and `--endpoints` = `endpoints`.
    async fn start(store: &str, endpoints: &[SocketAddr], extra: &[&str]) -> Control {
        let mut args = vec!["mcp-affinity-control".to_string(), "--token".into(), TOKEN.into(), "--store".into(), store.into()];
        if !endpoints.is_empty() {
            let list: Vec<String> = endpoints.iter().map(SocketAddr::to_string).collect();
            args.extend(["--endpoints".into(), list.join(",")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = InProcessControl::start(&args[1..]).await;
        let base = server.base.clone();
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
        Control { base, http, _server: server }
    }

    fn session_url(&self, id: &str) -> String {
        format!("{}/v1/sessions/{}", self.base, encode(id))
    }

    /// The filter's write-through after `initialize` and `notifications/initialized`: the
    /// record of `session`, pinned to `pod` at generation 1.
    async fn put_record(&self, session: &Session, pod: &Pod) {
        let body = json!({
            "upstream": pod.addr.to_string(),
            "initialize": mcp_client::initialize_body(0, mcp_client::DEFAULT_PROTOCOL_VERSION).to_string(),
            "initialized": INITIALIZED,
            "protocol_version": session.protocol_version,
        });
        let resp = self.http.put(self.session_url(&session.session_id)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", resp.text().await.unwrap());
    }

    async fn get_record(&self, id: &str) -> (StatusCode, Value) {
        let resp = self.http.get(self.session_url(id)).bearer_auth(TOKEN).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or_default())
    }

    /// `POST /v1/sessions/{id}/recover` with `body`: status and JSON answer.
    async fn recover(&self, id: &str, body: &Value) -> (StatusCode, Value) {
        self.recover_with_token(id, body, Some(TOKEN)).await
    }

    async fn recover_with_token(&self, id: &str, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}/recover", self.session_url(id))).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer {text:?}: {e}")))
    }

    /// A sample (counter or gauge) from `/metrics`, 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    async fn reinitializations(&self) -> f64 {
        self.metric("mcp_affinity_control_reinitializations_total").await
    }

    /// `POST /v1/upstreams/{upstream}/drain` (a pod's preStop hook): the drain.
    async fn drain(&self, upstream: SocketAddr) -> Value {
        let resp = self.http.post(format!("{}/v1/upstreams/{upstream}/drain", self.base)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// `DELETE /v1/upstreams/{upstream}/drain`: the status.
    async fn undrain(&self, upstream: SocketAddr) -> StatusCode {
        self.http.delete(format!("{}/v1/upstreams/{upstream}/drain", self.base)).bearer_auth(TOKEN).send().await.unwrap().status()
    }

    /// The drain of `upstream` from `GET /v1/upstreams/draining` (`Null` when not draining).
    async fn drain_of(&self, upstream: SocketAddr) -> Value {
        let resp = self.http.get(format!("{}/v1/upstreams/draining", self.base)).bearer_auth(TOKEN).send().await.unwrap();
        let list: Value = resp.json().await.unwrap();
        list["draining"].as_array().unwrap().iter().find(|d| d["upstream"] == upstream.to_string()).cloned().unwrap_or(Value::Null)
    }
}


/// Sessions each of `pods` created so far (`/demo/stats`), in order.
async fn initializations_per_pod(pods: &[Pod]) -> Vec<u64> {
    let mut out = Vec::new();
    for p in pods {
        out.push(p.initializations().await.unwrap());
    }
    out
}

fn pod_url(addr: SocketAddr) -> String {
    format!("http://{addr}/mcp")
}

/// A `tools/call` JSON-RPC body with id `id`.
fn tool_call(id: u64, tool: &str, arguments: Value) -> String {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}}).to_string()
}

/// The recover request the filter sends for `body` on `session`, pinned at generation
/// `failed_generation` to `failed_upstream`.
fn recover_body(session: &Session, failed_generation: u64, failed_upstream: SocketAddr, reason: &str, method: &str, body: &str) -> Value {
    json!({
        "failed_generation": failed_generation,
        "failed_upstream": failed_upstream.to_string(),
        "reason": reason,
        "request": {
            "method": method,
            "path": "/mcp",
            "authority": "mcp.local",
            "content_type": if method == "POST" { Some("application/json") } else { None },
            "accept": if method == "POST" { mcp_client::ACCEPT_BOTH } else { "text/event-stream" },
            "protocol_version": session.protocol_version,
            "authorization": "Bearer client-secret-do-not-store",
            "body": body,
        }
    })
}

/// The JSON-RPC messages of a `response` object of a recover answer (SSE or JSON).
fn response_messages(response: &Value) -> Vec<Value> {
    let body = response["body"].as_str().unwrap();
    let sse = response["content_type"].as_str().is_some_and(|c| c.starts_with("text/event-stream"));
    if sse {
        mcp_client::sse_data(body).iter().filter_map(|d| serde_json::from_str(d).ok()).collect()
    } else {
        vec![serde_json::from_str(body).unwrap()]
    }
}

/// The text of the tool result answering JSON-RPC id `id` in a recover answer.
fn tool_text(answer: &Value, id: u64) -> String {
    let messages = response_messages(&answer["response"]);
    let m = messages.iter().find(|m| m["id"] == json!(id)).unwrap_or_else(|| panic!("no response to {id} in {answer}"));
    m.pointer("/result/content/0/text").and_then(Value::as_str).unwrap_or_else(|| panic!("no tool text: {m}")).to_string()
}

/// The pod whose address is `upstream`.
fn pod_at<'a>(pods: &'a [Pod], upstream: &str) -> &'a Pod {
    pods.iter().find(|p| p.addr.to_string() == upstream).unwrap_or_else(|| panic!("no pod at {upstream}"))
}

/// A session on `pod`, checked to be served there, with its record in `control`.
async fn pinned_session(control: &Control, pod: &Pod) -> Session {
    let session = mcp_client::connect(&pod_url(pod.addr)).await.expect("connect");
    assert_eq!(session.whoami().await.unwrap(), pod.name);
    control.put_record(&session, pod).await;
    session
}

/// Every answer is 200 `replayed` on the same pin, and answer `i` carries the tool text
/// `expected(i).1` for JSON-RPC id `expected(i).0`. Returns that pin.
fn assert_replayed_on_one_pin(answers: &[(StatusCode, Value)], expected: impl Fn(u64) -> (u64, String)) -> Value {
    let first_pin = answers[0].1["pin"].clone();
    for (i, (status, answer)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "{answer}");
        assert_eq!(answer["outcome"], "replayed", "{answer}");
        assert_eq!(answer["pin"], first_pin, "every recovery sees the same pin");
        let (id, text) = expected(i as u64);
        assert_eq!(tool_text(answer, id), text);
    }
    first_pin
}

/// `answer` says the session was re-initialized on `pod` (restarted in place: a new
/// backend session id, generation 2) and request `id` replayed there, answering `text`;
/// control counted one re-initialization.
#[allow(clippy::too_many_arguments)]
async fn assert_replayed_in_place(control: &Control, session: &Session, pod: &Pod, status: StatusCode, answer: &Value, id: u64, text: &str) {
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    assert_eq!(answer["pin"]["upstream"], pod.addr.to_string());
    assert_eq!(answer["pin"]["generation"], 2);
    let backend = answer["pin"]["backend_session_id"].as_str().unwrap();
    assert_ne!(backend, session.session_id);
    assert_eq!(tool_text(answer, id), text);
    assert_eq!(Session::with_id(&pod_url(pod.addr), backend).whoami().await.unwrap(), pod.name);
    assert_eq!(control.reinitializations().await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_the_pinned_pod_is_killed() {
    let mut pods = pods(3).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let body = tool_call(42, "whoami", json!({}));
    let (status, answer) = control.recover(&session.session_id, &recover_body(&session, 1, dead, "connect_failure", "POST", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    let pin = &answer["pin"];
    let upstream = pin["upstream"].as_str().unwrap();
    assert_ne!(upstream, dead.to_string(), "moved off the dead pod");
    let new_pod = pod_at(&pods, upstream);
    assert_eq!(pin["generation"], 2);
    let backend = pin["backend_session_id"].as_str().unwrap();
    assert_ne!(backend, session.session_id, "the new pod issued its own session id");
    // The replayed tools/call was answered by the new pod, as SSE (the demo pods' way).
    assert_eq!(answer["response"]["status"], 200);
    assert!(answer["response"]["content_type"].as_str().unwrap().starts_with("text/event-stream"), "{answer}");
    assert_eq!(tool_text(&answer, 42), new_pod.name);

    // The record now holds the new pin and never the client's Authorization.
    let (status, record) = control.get_record(&session.session_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((record["upstream"].as_str(), record["backend_session_id"].as_str()), (Some(upstream), Some(backend)));
    assert_eq!(record["generation"], 2);
    assert!(!record.to_string().contains("client-secret"), "{record}");

    // The re-initialized session is fully usable on the new pod (initialized was sent).
    let moved = Session::with_id(&pod_url(new_pod.addr), backend);
    assert_eq!(moved.whoami().await.unwrap(), new_pod.name);
    assert_eq!(moved.echo("still here").await.unwrap(), "still here");

    assert_eq!(control.reinitializations().await, 1.0);
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 1.0);
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="replayed"}"#).await, 1.0);
    assert_eq!(control.metric("mcp_affinity_control_recovery_duration_seconds_count").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_unknown_after_a_restart_in_place() {
    // One pod, restarted on the same address: it is alive but has lost the session. The
    // failed upstream is the last resort for `session_unknown`, so the session is
    // re-initialized on the same pod under a new backend id.
    let mut pods = pods(1).unwrap();
    let control = Control::start("memory", &[pods[0].addr], &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    pods[0].restart().unwrap();
    let err = session.whoami().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "the restarted pod lost the session");

    let body = tool_call(7, "echo", json!({"text": "after restart"}));
    let (status, answer) = control
        .recover(&session.session_id, &recover_body(&session, 1, pods[0].addr, "session_unknown", "POST", &body))
        .await;
    assert_replayed_in_place(&control, &session, &pods[0], status, &answer, 7, "after restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_recoveries_of_one_session_reinitialize_once() {
    let mut pods = pods(3).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let calls = (0..20u64).map(|i| {
        let body = recover_body(&session, 1, dead, "connect_failure", "POST", &tool_call(100 + i, "echo", json!({"text": format!("call {i}")})));
        let control = &control;
        let id = session.session_id.clone();
        async move { control.recover(&id, &body).await }
    });
    let answers = futures::future::join_all(calls).await;
    let first_pin = assert_replayed_on_one_pin(&answers, |i| (100 + i, format!("call {i}")));
    assert_eq!(first_pin["generation"], 2);
    assert_eq!(control.reinitializations().await, 1.0, "20 concurrent recoveries, one re-initialization");
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_instances_sharing_redis_reinitialize_once() {
    let redis = RedisServer::start().expect("start redis-server (Debian package redis-server)");
    let mut pods = pods(3).unwrap();
    let endpoints: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    let a = Control::start(&redis.url(), &endpoints, &[]).await;
    let b = Control::start(&redis.url(), &endpoints, &[]).await;
    let session = pinned_session(&a, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let calls = (0..10u64).map(|i| {
        let control = if i % 2 == 0 { &a } else { &b };
        let body = recover_body(&session, 1, dead, "connect_failure", "POST", &tool_call(200 + i, "echo", json!({"text": format!("r{i}")})));
        let id = session.session_id.clone();
        async move { control.recover(&id, &body).await }
    });
    let answers = futures::future::join_all(calls).await;
    assert_replayed_on_one_pin(&answers, |i| (200 + i, format!("r{i}")));
    let total = a.reinitializations().await + b.reinitializations().await;
    assert_eq!(total, 1.0, "one re-initialization across both instances");
    // The lease is released (no key left behind) and both instances read the new pin.
    let id = mcp_affinity_control::session_id::SessionId::parse(&session.session_id).unwrap();
    let lease_key = mcp_affinity_control::store::redis::lease_key("mcp-affinity:", &id);
    assert_eq!(redis.command(&["EXISTS", &lease_key]).unwrap(), ":0");
    let record_key = mcp_affinity_control::store::redis::record_key("mcp-affinity:", &id);
    assert_eq!(redis.command(&["EXISTS", &record_key]).unwrap(), ":1");
    assert_eq!(b.get_record(&session.session_id).await.1["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_send_of_a_tool_call_is_not_replayed_but_the_session_is_repinned() {
    let mut pods = pods(2).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let body = tool_call(9, "echo", json!({"text": "side effect"}));
    let (status, answer) =
        control.recover(&session.session_id, &recover_body(&session, 1, dead, "reset_after_send", "POST", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "not_replayed", "{answer}");
    let response = &answer["response"];
    assert_eq!((response["status"].as_u64(), response["content_type"].as_str()), (Some(200), Some("application/json")));
    let error: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    assert_eq!(error["jsonrpc"], "2.0");
    assert_eq!(error["id"], 9);
    assert_eq!(error["error"]["code"], -32003);
    assert!(error["error"]["message"].as_str().unwrap().contains("not retried"), "{error}");
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 0.0);
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="not_replayed"}"#).await, 1.0);

    // Re-pinned: the next request through the new pin works.
    let pin = &answer["pin"];
    assert_eq!(pin["upstream"], pods[1].addr.to_string());
    let moved = Session::with_id(&pod_url(pods[1].addr), pin["backend_session_id"].as_str().unwrap());
    assert_eq!(moved.whoami().await.unwrap(), pods[1].name);

    // A second filter still holding generation 1: a replay-safe method after a reset is
    // replayed on the current pin without a second re-initialization.
    let list = json!({"jsonrpc":"2.0","id":10,"method":"tools/list","params":{}}).to_string();
    let (_, answer) = control.recover(&session.session_id, &recover_body(&session, 1, dead, "reset_after_send", "POST", &list)).await;
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    assert_eq!(answer["pin"], *pin);
    let tools = &response_messages(&answer["response"])[0]["result"]["tools"];
    assert!(tools.as_array().unwrap().iter().any(|t| t["name"] == "whoami"), "{answer}");

    // A GET (the SSE stream) is never replayed: an SSE stream that ends at once.
    let (_, answer) = control.recover(&session.session_id, &recover_body(&session, 1, dead, "connect_failure", "GET", "")).await;
    assert_eq!(answer["outcome"], "not_replayed");
    assert_eq!(answer["pin"], *pin);
    assert_eq!(answer["response"], json!({"status": 200, "content_type": "text/event-stream", "body": "retry: 1000\n\n"}));
    assert_eq!(control.reinitializations().await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_endpoint_fails_with_404_and_deletes_the_record() {
    let mut pods = pods(1).unwrap();
    let control = Control::start("memory", &[pods[0].addr], &["--recovery-timeout-ms", "5000"]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let body = tool_call(5, "whoami", json!({}));
    let (status, answer) = control.recover(&session.session_id, &recover_body(&session, 1, dead, "connect_failure", "POST", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "failed");
    assert!(answer["pin"].is_null());
    assert_eq!((answer["response"]["status"].as_u64(), answer["response"]["content_type"].as_str()), (Some(404), Some("application/json")));
    let error: Value = serde_json::from_str(answer["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(error, json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":5}));
    assert_eq!(control.get_record(&session.session_id).await.0, StatusCode::NOT_FOUND, "record deleted");
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="failed"}"#).await, 1.0);
    assert_eq!(control.reinitializations().await, 0.0);

    // Now the session is unknown to control: the API's 404.
    let (status, answer) = control.recover(&session.session_id, &recover_body(&session, 1, dead, "connect_failure", "POST", &body)).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::NOT_FOUND, Some("session_not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_request_errors() {
    let pods = pods(1).unwrap();
    let control = Control::start("memory", &[pods[0].addr], &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let ok = recover_body(&session, 1, pods[0].addr, "connect_failure", "POST", "{}");
    let (status, answer) = control.recover_with_token(&session.session_id, &ok, None).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let delete = recover_body(&session, 1, pods[0].addr, "connect_failure", "DELETE", "");
    let (status, answer) = control.recover(&session.session_id, &delete).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{answer}");
    let mut bad = ok.clone();
    bad["reason"] = json!("gremlins");
    assert_eq!(control.recover(&session.session_id, &bad).await.0, StatusCode::BAD_REQUEST);
    let (status, answer) = control.recover("no-such-session", &ok).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::NOT_FOUND, Some("session_not_found")));
    // Nothing was recovered.
    assert_eq!(control.get_record(&session.session_id).await.1["generation"], 1);
    assert_eq!(control.reinitializations().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_waits_for_the_lease_of_another_instance_and_uses_its_pin() {
    // Another control instance holds the recovery lease (set by hand in Redis). This
    // instance must not re-initialize: it polls until that instance's new pin appears
    // (written here by hand, as the other instance would), then replays on it.
    let redis = RedisServer::start().expect("start redis-server (Debian package redis-server)");
    let mut pods = pods(2).unwrap();
    let control = Control::start(&redis.url(), &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();
    let id = mcp_affinity_control::session_id::SessionId::parse(&session.session_id).unwrap();
    let lease_key = mcp_affinity_control::store::redis::lease_key("mcp-affinity:", &id);
    assert_eq!(redis.command(&["SET", &lease_key, "other-instance", "PX", "30000", "NX"]).unwrap(), "+OK");

    let body = recover_body(&session, 1, dead, "connect_failure", "POST", &tool_call(11, "whoami", json!({})));
    let waiting = {
        let control = &control;
        let id = session.session_id.clone();
        async move { control.recover(&id, &body).await }
    };
    let other_instance = async {
        // The other instance's result: a session on pod-1, stored as generation 2.
        let theirs = mcp_client::connect(&pod_url(pods[1].addr)).await.unwrap();
        let put = json!({
            "upstream": pods[1].addr.to_string(),
            "backend_session_id": theirs.session_id,
            "generation": 2,
            "initialize": mcp_client::initialize_body(0, mcp_client::DEFAULT_PROTOCOL_VERSION).to_string(),
        });
        let resp = control
            .http
            .put(format!("{}?if_generation=1", control.session_url(&session.session_id)))
            .bearer_auth(TOKEN)
            .json(&put)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "the waiting recovery did not re-pin on its own");
        theirs.session_id
    };
    let ((status, answer), theirs) = tokio::join!(waiting, other_instance);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    assert_eq!(answer["pin"], json!({"upstream": pods[1].addr.to_string(), "backend_session_id": theirs, "generation": 2}));
    assert_eq!(tool_text(&answer, 11), pods[1].name);
    assert_eq!(control.reinitializations().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_has_one_holder_is_released_by_its_owner_only_and_expires() {
    use mcp_affinity_control::session_id::SessionId;
    use mcp_affinity_control::store::SessionStore;
    use mcp_affinity_control::store::redis::{RedisStore, RedisStoreConfig};

    let redis = RedisServer::start().expect("start redis-server (Debian package redis-server)");
    let config = RedisStoreConfig {
        url: redis.url(),
        key_prefix: "lease-test:".into(),
        ttl: Duration::from_secs(60),
        timeout: Duration::from_secs(2),
    };
    // Two stores = two control instances.
    let (a, b) = (RedisStore::new(&config).unwrap(), RedisStore::new(&config).unwrap());
    let id = SessionId::parse("s-1").unwrap();
    let long = Duration::from_secs(30);
    assert!(a.try_acquire_lease(&id, "a", long).await.unwrap());
    // The lease has its own key, never the record's.
    assert_eq!(redis.command(&["EXISTS", &a.lease_key(&id)]).unwrap(), ":1");
    assert_eq!(redis.command(&["EXISTS", &a.record_key(&id)]).unwrap(), ":0");
    assert!(!b.try_acquire_lease(&id, "b", long).await.unwrap(), "one holder");
    assert!(b.try_acquire_lease(&SessionId::parse("s-2").unwrap(), "b", long).await.unwrap(), "per session");
    b.release_lease(&id, "b").await.unwrap(); // not the owner: no effect
    assert!(!b.try_acquire_lease(&id, "b", long).await.unwrap());
    a.release_lease(&id, "a").await.unwrap();
    assert!(b.try_acquire_lease(&id, "b", Duration::from_millis(50)).await.unwrap());
    // The lease expires on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.try_acquire_lease(&id, "a", long).await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "lease did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` pods named `pod-0` … that answer unknown sessions like TypeScript-SDK servers:
/// 400 + JSON-RPC -32000 "Bad Request: No valid session ID provided".
fn ts_sdk_pods(n: usize) -> Vec<Pod> {
    (0..n).map(|i| Pod::start_with(&format!("pod-{i}"), &["--unknown-session", "ts-sdk"]).unwrap()).collect()
}

/// `mcp_affinity_control_probes_total{result="<result>"}`.
async fn probes(control: &Control, result: &str) -> f64 {
    control.metric(&format!(r#"mcp_affinity_control_probes_total{{result="{result}"}}"#)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_suspect_on_a_live_session_is_alive_and_nothing_changes() {
    // The pod knows the session: its 400 was a genuine error. Control's probe (ping)
    // finds the session, answers `alive` with the unchanged pin and no response (the
    // filter passes the pod's original 400 through), and neither re-initializes nor
    // replays.
    let pods = ts_sdk_pods(2);
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;

    let body = tool_call(21, "echo", json!({"text": "not replayed"}));
    let (status, answer) = control
        .recover(&session.session_id, &recover_body(&session, 1, pods[0].addr, "session_suspect", "POST", &body))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({
            "outcome": "alive",
            "pin": {"upstream": pods[0].addr.to_string(), "backend_session_id": session.session_id, "generation": 1},
            "response": null,
        })
    );
    assert_eq!(control.reinitializations().await, 0.0);
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 0.0);
    assert_eq!(probes(&control, "alive").await, 1.0);
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="alive"}"#).await, 1.0);

    // The record is untouched and the session still works on its pod.
    let (_, record) = control.get_record(&session.session_id).await;
    assert_eq!((record["upstream"].as_str(), record["generation"].as_u64()), (Some(pods[0].addr.to_string().as_str()), Some(1)));
    assert_eq!(record["backend_session_id"], session.session_id);
    assert_eq!(session.whoami().await.unwrap(), pods[0].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_suspect_after_a_restart_in_place_reinitializes_once_and_replays() {
    // One TS-SDK-style pod, restarted on the same address: it answers the lost session
    // with 400 / -32000, so the filter asks `session_suspect`. The probe gets the same
    // answer, and the session is re-initialized on that pod and the request replayed.
    let mut pods = ts_sdk_pods(1);
    let control = Control::start("memory", &[pods[0].addr], &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    pods[0].restart().unwrap();
    let err = session.whoami().await.unwrap_err();
    assert_eq!((err.status(), err.jsonrpc_code()), (Some(StatusCode::BAD_REQUEST), Some(-32000)), "{err}");

    let body = tool_call(8, "echo", json!({"text": "suspect after restart"}));
    let (status, answer) = control
        .recover(&session.session_id, &recover_body(&session, 1, pods[0].addr, "session_suspect", "POST", &body))
        .await;
    assert_replayed_in_place(&control, &session, &pods[0], status, &answer, 8, "suspect after restart").await;
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 1.0);
    assert_eq!(probes(&control, "session_unknown").await, 1.0);
    assert_eq!(probes(&control, "alive").await, 0.0);
    assert_eq!(control.get_record(&session.session_id).await.1["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_suspect_with_the_pod_killed_moves_the_session() {
    // The pod is gone by the time control probes it: unreachable, so the session is
    // re-initialized on another pod and the request replayed there.
    let mut pods = ts_sdk_pods(3);
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let dead = pods[0].addr;
    pods[0].kill();

    let body = tool_call(31, "whoami", json!({}));
    let (status, answer) =
        control.recover(&session.session_id, &recover_body(&session, 1, dead, "session_suspect", "POST", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    let pin = answer["pin"].clone();
    let upstream = pin["upstream"].as_str().unwrap();
    assert_ne!(upstream, dead.to_string(), "moved off the dead pod");
    assert_eq!(pin["generation"], 2);
    let new_pod = pod_at(&pods, upstream);
    assert_eq!(tool_text(&answer, 31), new_pod.name);
    assert_eq!(control.reinitializations().await, 1.0);
    assert_eq!(probes(&control, "unreachable").await, 1.0);

    // A second filter still holding generation 1 gets the same answer from the dead pod's
    // address: the pin already moved, so there is no probe and no second
    // re-initialization; the request is replayed on the current pin.
    let body = tool_call(32, "echo", json!({"text": "stale filter"}));
    let (_, answer) =
        control.recover(&session.session_id, &recover_body(&session, 1, dead, "session_suspect", "POST", &body)).await;
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    assert_eq!(answer["pin"], pin);
    assert_eq!(tool_text(&answer, 32), "stale filter");
    assert_eq!(control.reinitializations().await, 1.0);
    assert_eq!(probes(&control, "unreachable").await + probes(&control, "session_unknown").await + probes(&control, "alive").await, 1.0);
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="replayed"}"#).await, 2.0);
}

/// The recover request of a drain-move, as the filter sends it: the pin it holds and the
/// request's headers, but no body (the filter asks before the body arrives).
fn draining_body(session: &Session, generation: u64, draining: SocketAddr, method: &str) -> Value {
    recover_body(session, generation, draining, "draining", method, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_moves_the_session_to_a_live_non_draining_pod_and_replays_nothing() {
    // pod-0 (the pin) and pod-1 drain; pod-2 is the only place the session may go.
    let pods = pods(3).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let session = pinned_session(&control, &pods[0]).await;
    let drain = control.drain(pods[0].addr).await;
    control.drain(pods[1].addr).await;
    assert_eq!(initializations_per_pod(&pods).await, [1, 0, 0]);

    let (status, answer) = control.recover(&session.session_id, &draining_body(&session, 1, pods[0].addr, "POST")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "moved", "{answer}");
    assert!(answer["response"].is_null(), "nothing replayed, nothing to answer: {answer}");
    let pin = answer["pin"].clone();
    assert_eq!((pin["upstream"].as_str(), pin["generation"].as_u64()), (Some(pods[2].addr.to_string().as_str()), Some(2)));
    let backend = pin["backend_session_id"].as_str().unwrap();
    assert_ne!(backend, session.session_id);
    // Exactly one session created, on pod-2 (initialize + notifications/initialized); no
    // replay; the session is usable there and the record holds the new pin.
    assert_eq!(initializations_per_pod(&pods).await, [1, 0, 1]);
    assert_eq!(control.metric("mcp_affinity_control_replays_total").await, 0.0);
    let moved = Session::with_id(&pod_url(pods[2].addr), backend);
    assert_eq!(moved.whoami().await.unwrap(), pods[2].name);
    let (_, record) = control.get_record(&session.session_id).await;
    assert_eq!((record["upstream"].as_str(), record["generation"].as_u64()), (Some(pods[2].addr.to_string().as_str()), Some(2)));
    // The drain counts the move.
    let after = control.drain_of(pods[0].addr).await;
    assert_eq!((after["moved"].as_u64(), after["failed"].as_u64(), &after["since_ms"]), (Some(1), Some(0), &drain["since_ms"]));
    assert!(after["last_move_ms"].as_u64() >= drain["since_ms"].as_u64(), "{after}");
    assert_eq!(control.metric(r#"mcp_affinity_control_drain_moves_total{outcome="moved"}"#).await, 1.0);
    assert_eq!(control.metric("mcp_affinity_control_drain_move_delay_seconds_count").await, 1.0);
    assert_eq!(control.reinitializations().await, 1.0);
    assert_eq!(control.metric("mcp_affinity_control_recovery_duration_seconds_count").await, 0.0, "not a recovery");
    assert_eq!(control.metric("mcp_affinity_control_upstreams_draining").await, 2.0);

    // A request of another stream of the session, still on generation 1 (a GET): already
    // moved — the same pin, nothing created, nothing counted again.
    let (_, again) = control.recover(&session.session_id, &draining_body(&session, 1, pods[0].addr, "GET")).await;
    assert_eq!(again, json!({"outcome": "moved", "pin": pin, "response": null}));
    assert_eq!(initializations_per_pod(&pods).await, [1, 0, 1]);
    assert_eq!(control.drain_of(pods[0].addr).await["moved"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_draining_calls_on_two_instances_move_the_session_once() {
    let redis = RedisServer::start().expect("start redis-server (Debian package redis-server)");
    let pods = pods(3).unwrap();
    let endpoints: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    let a = Control::start(&redis.url(), &endpoints, &[]).await;
    let b = Control::start(&redis.url(), &endpoints, &[]).await;
    let session = pinned_session(&a, &pods[0]).await;
    // Drained through one instance, seen by the other through the store.
    a.drain(pods[0].addr).await;
    assert!(b.drain_of(pods[0].addr).await.is_object());

    let calls = (0..10usize).map(|i| {
        let control = if i % 2 == 0 { &a } else { &b };
        let body = draining_body(&session, 1, pods[0].addr, if i % 3 == 0 { "GET" } else { "POST" });
        let id = session.session_id.clone();
        async move { control.recover(&id, &body).await }
    });
    let answers = futures::future::join_all(calls).await;
    let pin = answers[0].1["pin"].clone();
    for (status, answer) in &answers {
        assert_eq!(*status, StatusCode::OK, "{answer}");
        assert_eq!(*answer, json!({"outcome": "moved", "pin": pin, "response": null}), "every call sees the same pin");
    }
    assert_eq!(pin["generation"], 2);
    assert_ne!(pin["upstream"], pods[0].addr.to_string());
    assert_eq!(a.reinitializations().await + b.reinitializations().await, 1.0, "one re-initialization across both instances");
    assert_eq!(initializations_per_pod(&pods).await.iter().sum::<u64>(), 2, "the client's session and one move");
    let moved = r#"mcp_affinity_control_drain_moves_total{outcome="moved"}"#;
    assert_eq!(a.metric(moved).await + b.metric(moved).await, 1.0, "counted by the instance that moved it");
    let drain = b.drain_of(pods[0].addr).await;
    assert_eq!((drain["moved"].as_u64(), drain["failed"].as_u64()), (Some(1), Some(0)), "{drain}");
    // The drains hash is one key next to the session's record (the lease is released).
    assert_eq!(redis.command(&["EXISTS", "mcp-affinity:drains"]).unwrap(), ":1");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":2", "the drains hash and the record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_with_every_other_pod_draining_or_dead_stays_and_keeps_the_session() {
    let mut pods = pods(3).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &["--recovery-timeout-ms", "5000"]).await;
    let session = pinned_session(&control, &pods[0]).await;
    control.drain(pods[0].addr).await;
    control.drain(pods[1].addr).await;
    pods[2].kill();

    let (status, answer) = control.recover(&session.session_id, &draining_body(&session, 1, pods[0].addr, "POST")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let old_pin = json!({"upstream": pods[0].addr.to_string(), "backend_session_id": session.session_id, "generation": 1});
    assert_eq!(answer, json!({"outcome": "stayed", "pin": old_pin, "response": null}));
    // The record is kept (unlike a failed recovery) and the session still works on its
    // draining pod; nothing was created on the other draining pod.
    let (status, record) = control.get_record(&session.session_id).await;
    assert_eq!(status, StatusCode::OK, "the record must not be deleted");
    assert_eq!((record["upstream"].as_str(), record["generation"].as_u64()), (Some(pods[0].addr.to_string().as_str()), Some(1)));
    assert_eq!(session.whoami().await.unwrap(), pods[0].name);
    assert_eq!(initializations_per_pod(&pods[..2]).await, [1, 0]);
    let drain = control.drain_of(pods[0].addr).await;
    assert_eq!((drain["moved"].as_u64(), drain["failed"].as_u64(), &drain["last_move_ms"]), (Some(0), Some(1), &Value::Null));
    assert_eq!(control.metric(r#"mcp_affinity_control_drain_moves_total{outcome="stayed"}"#).await, 1.0);
    assert_eq!(control.metric(r#"mcp_affinity_control_recoveries_total{outcome="failed"}"#).await, 0.0, "not a recovery");
    assert_eq!(control.reinitializations().await, 0.0);

    // pod-1 stops draining: the next request of the session moves it there.
    assert_eq!(control.undrain(pods[1].addr).await, StatusCode::NO_CONTENT);
    let (_, answer) = control.recover(&session.session_id, &draining_body(&session, 1, pods[0].addr, "POST")).await;
    assert_eq!((answer["outcome"].as_str(), answer["pin"]["upstream"].as_str()), (Some("moved"), Some(pods[1].addr.to_string().as_str())));
    assert_eq!(initializations_per_pod(&pods[..2]).await, [1, 1]);
    let drain = control.drain_of(pods[0].addr).await;
    assert_eq!((drain["moved"].as_u64(), drain["failed"].as_u64()), (Some(1), Some(1)));

    // pod-0 no longer draining: a stale drain-move of another session stays, uncounted.
    let other = pinned_session(&control, &pods[0]).await;
    assert_eq!(control.undrain(pods[0].addr).await, StatusCode::NO_CONTENT);
    let (_, answer) = control.recover(&other.session_id, &draining_body(&other, 1, pods[0].addr, "POST")).await;
    assert_eq!((answer["outcome"].as_str(), answer["pin"]["generation"].as_u64()), (Some("stayed"), Some(1)));
    assert_eq!(control.metric(r#"mcp_affinity_control_drain_moves_total{outcome="stayed"}"#).await, 1.0);
    // And the API's usual errors: no record → 404; a failed_upstream that is no address → 400.
    let (status, body) = control.recover("no-such-session", &draining_body(&other, 1, pods[0].addr, "POST")).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("session_not_found")));
    let mut bad = draining_body(&other, 1, pods[0].addr, "POST");
    bad["failed_upstream"] = json!("pod-0:8080");
    let (status, body) = control.recover(&other.session_id, &bad).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_upstream")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoveries_never_prefer_a_draining_pod() {
    // pod-0 dies with four sessions; pod-1 drains. Rotation would spread the sessions over
    // pod-1 and pod-2: every one goes to pod-2. Once pod-2 is gone too, the draining pod-1
    // is still better than failing.
    let mut pods = pods(3).unwrap();
    let control = Control::start("memory", &pods.iter().map(|p| p.addr).collect::<Vec<_>>(), &[]).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(pinned_session(&control, &pods[0]).await);
    }
    control.drain(pods[1].addr).await;
    let dead = pods[0].addr;
    pods[0].kill();
    for (i, session) in sessions[..3].iter().enumerate() {
        let body = recover_body(session, 1, dead, "connect_failure", "POST", &tool_call(i as u64, "whoami", json!({})));
        let (_, answer) = control.recover(&session.session_id, &body).await;
        assert_eq!(answer["outcome"], "replayed", "{answer}");
        assert_eq!(tool_text(&answer, i as u64), pods[2].name, "session {i}");
    }
    pods[2].kill();
    let body = recover_body(&sessions[3], 1, dead, "connect_failure", "POST", &tool_call(9, "whoami", json!({})));
    let (_, answer) = control.recover(&sessions[3].session_id, &body).await;
    assert_eq!(answer["outcome"], "replayed", "{answer}");
    assert_eq!(tool_text(&answer, 9), pods[1].name, "the draining pod as the last resort");
    for outcome in ["moved", "stayed"] {
        let sample = format!(r#"mcp_affinity_control_drain_moves_total{{outcome="{outcome}"}}"#);
        assert_eq!(control.metric(&sample).await, 0.0, "recoveries are not drain-moves");
    }
}
