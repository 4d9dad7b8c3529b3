//! Redis outage: control keeps running while its Redis is down, answers 503
//! `store_unavailable` quickly (never hangs), reports not ready, and works again — without
//! a restart — once Redis is back on the same port, with every record intact.
//!
//! Redis runs with an append-only file (`appendfsync always`), so a SIGKILL loses no
//! acknowledged write: any difference after the restart is control's fault.

use std::time::{Duration, Instant};

use clap::Parser;
use mcp_affinity_control::config::Config;
use mcp_affinity_harness::fixtures::redis::RedisServer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const TOKEN: &str = "outage-token";
/// `--redis-timeout-ms` of the control instance under test.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value, Duration) {
        let start = Instant::now();
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let resp = req.send().await.expect("control must answer");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).expect("JSON answer") };
        (status, value, start.elapsed())
    }
}

fn record_body(i: usize) -> Value {
    json!({
        "upstream": format!("10.1.0.{i}:8080"),
        "backend_session_id": format!("backend-{i}"),
        "initialize": format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"initialize","params":{{}}}}"#),
        "protocol_version": "2025-06-18",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_gives_503_and_recovers_without_restart() {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let data_dir = std::env::temp_dir().join(format!("mcp-affinity-redis-outage-{}-{nanos}", std::process::id()));
    let mut redis = RedisServer::start_persistent(&data_dir).expect("start redis-server");

    let config = Config::try_parse_from([
        "mcp-affinity-control",
        "--token",
        TOKEN,
        "--store",
        &redis.url(),
        "--redis-timeout-ms",
        &STORE_TIMEOUT.as_millis().to_string(),
    ])
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = Api {
        base: format!("http://{}", listener.local_addr().unwrap()),
        http: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(mcp_affinity_control::serve(config, listener, async move {
        let _ = stopped.await;
    }));

    // Records written while Redis is up.
    let mut stored = Vec::new();
    for i in 0..20 {
        let (status, record, _) = api.call(Method::PUT, &format!("/v1/sessions/s-{i}"), Some(record_body(i))).await;
        assert_eq!(status, StatusCode::CREATED, "{record}");
        stored.push(record);
    }
    let (status, patched, _) = api
        .call(Method::PATCH, "/v1/sessions/s-0", Some(json!({"initialized": r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#})))
        .await;
    assert_eq!(status, StatusCode::OK);
    stored[0] = patched;

    // Outage.
    redis.kill();
    let outage_calls = [
        (Method::GET, "/v1/sessions/s-1", None),
        (Method::PUT, "/v1/sessions/s-2", Some(json!({"upstream": "10.9.9.9:1", "initialize": "{}"}))),
        (Method::PUT, "/v1/sessions/new-during-outage", Some(record_body(99))),
        (Method::PATCH, "/v1/sessions/s-3", Some(json!({"protocol_version": "2099-01-01"}))),
        (Method::DELETE, "/v1/sessions/s-4", None),
        (Method::GET, "/v1/sessions/s-1", None),
    ];
    for (method, path, body) in outage_calls {
        let (status, answer, elapsed) = api.call(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}: {answer}");
        assert_eq!(answer["code"], "store_unavailable", "{answer}");
        assert!(
            elapsed < STORE_TIMEOUT + Duration::from_secs(1),
            "{method} {path} took {elapsed:?}; must fail within the store timeout"
        );
    }
    let ready = api.http.get(format!("{}/readyz", api.base)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json::<Value>().await.unwrap()["code"], "store_unavailable");
    let health = api.http.get(format!("{}/healthz", api.base)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "the process itself is fine");

    // Redis returns on the same port; control recovers by itself.
    redis.restart().expect("restart redis-server");
    let start = Instant::now();
    loop {
        let ready = api.http.get(format!("{}/readyz", api.base)).send().await.unwrap();
        if ready.status() == StatusCode::OK {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "control did not become ready after Redis returned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every record is intact, byte for byte; nothing attempted during the outage landed.
    for (i, expected) in stored.iter().enumerate() {
        let (status, got, _) = api.call(Method::GET, &format!("/v1/sessions/s-{i}"), None).await;
        assert_eq!(status, StatusCode::OK, "s-{i} lost");
        assert_eq!(&got, expected, "s-{i} changed");
    }
    let (status, _, _) = api.call(Method::GET, "/v1/sessions/new-during-outage", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a write refused during the outage must not appear later");

    // And the service works normally again.
    let (status, _, _) = api.call(Method::PUT, "/v1/sessions/after", Some(record_body(7))).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut repin = record_body(8);
    repin["generation"] = json!(2);
    let (status, repinned, _) = api.call(Method::PUT, "/v1/sessions/s-5?if_generation=1", Some(repin)).await;
    assert_eq!(status, StatusCode::OK, "{repinned}");
    assert_eq!(repinned["created_at_ms"], stored[5]["created_at_ms"]);
    let (status, _, _) = api.call(Method::DELETE, "/v1/sessions/s-4", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    drop(redis);
    let _ = std::fs::remove_dir_all(&data_dir);
}
