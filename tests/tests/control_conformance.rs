//! Conformance suite of the control service: one generic suite, run through the real
//! HTTP router against both stores (`memory` and a real `redis-server`).
//!
//! Each test starts its own control instance in-process on a free loopback port (and, for
//! Redis, its own `redis-server`). Timing-dependent checks (TTL expiry) poll with a
//! bounded deadline instead of sleeping once.
//!
//! Drains (`/v1/upstreams/…`) are checked through HTTP like the rest, and their store
//! semantics (idempotence, move counters, expiry) also through the `SessionStore` trait
//! directly, on both stores with one manual clock, so expiry needs no sleeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use mcp_affinity_control::clock::{Clock, ManualClock};
use mcp_affinity_control::store::memory::MemoryStore;
use mcp_affinity_control::store::redis::{RedisStore, RedisStoreConfig};
use mcp_affinity_control::store::{Drain, DrainSource, SessionStore};
use mcp_affinity_proto::sessions::encode_segment as encode;
use mcp_affinity_harness::fixtures::control::InProcessControl;
use mcp_affinity_harness::fixtures::redis::RedisServer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const TOKEN: &str = "conformance-token-0123456789";
const MAX_BODY: usize = 4096;

/// Which store a control instance uses.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
}

/// A control service running in this process, stopped (gracefully) when dropped.
struct Control {
    base: String,
    http: reqwest::Client,
    _server: InProcessControl,
    _redis: Option<RedisServer>,
}


impl Control {
    async fn start(backend: Backend, ttl_secs: u64) -> Control {
        Control::start_with(backend, ttl_secs, &[]).await
    }

    /// Like [`Control::start`] with more flags.
    async fn start_with(backend: Backend, ttl_secs: u64, extra: &[&str]) -> Control {
        let redis = match backend {
            Backend::Memory => None,
            Backend::Redis => Some(RedisServer::start().expect("start redis-server")),
        };
        let ttl = ttl_secs.to_string();
        // `extra` may set its own body limit.
        let max_body = extra.iter().position(|a| *a == "--max-body-bytes").map_or(MAX_BODY.to_string(), |i| extra[i + 1].to_string());
        let extra: Vec<&str> = extra.iter().enumerate().filter(|(i, a)| **a != "--max-body-bytes" && (*i == 0 || extra[i - 1] != "--max-body-bytes")).map(|(_, a)| *a).collect();
        let mut args = vec![
            "mcp-affinity-control".to_string(),
            "--token".into(),
            TOKEN.into(),
            "--session-ttl-secs".into(),
            ttl,
            "--max-body-bytes".into(),
            max_body,
        ];
        if let Some(r) = &redis {
            args.extend(["--store".into(), r.url(), "--redis-key-prefix".into(), "conformance:".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = InProcessControl::start(&args[1..]).await;
        let base = server.base.clone();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Control { base, http, _server: server, _redis: redis }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn session_url(&self, id: &str) -> String {
        self.url(&format!("/v1/sessions/{}", encode(id)))
    }

    /// Sends an authenticated request with an optional raw body; returns status and JSON
    /// (`Null` for an empty body).
    async fn call(&self, method: Method, url: &str, body: Option<String>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, url).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer {text:?}: {e}")) };
        (status, value)
    }

    async fn put(&self, id: &str, body: Value, if_generation: Option<u64>) -> (StatusCode, Value) {
        let mut url = self.session_url(id);
        if let Some(g) = if_generation {
            url.push_str(&format!("?if_generation={g}"));
        }
        self.call(Method::PUT, &url, Some(body.to_string())).await
    }

    async fn get(&self, id: &str) -> (StatusCode, Value) {
        self.call(Method::GET, &self.session_url(id), None).await
    }

    async fn patch(&self, id: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(Method::PATCH, &self.session_url(id), body.map(|b| b.to_string())).await
    }

    async fn delete(&self, id: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, &self.session_url(id), None).await
    }

    /// `POST /v1/upstreams/{upstream}/drain` (`upstream` as given, not encoded).
    async fn drain(&self, upstream: &str) -> (StatusCode, Value) {
        self.call(Method::POST, &self.url(&format!("/v1/upstreams/{upstream}/drain")), None).await
    }

    /// `DELETE /v1/upstreams/{upstream}/drain`.
    async fn undrain(&self, upstream: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, &self.url(&format!("/v1/upstreams/{upstream}/drain")), None).await
    }

    /// `GET /v1/upstreams/draining`: the upstreams listed, in order, after checking the shape.
    async fn draining(&self) -> Vec<String> {
        let (status, body) = self.call(Method::GET, &self.url("/v1/upstreams/draining"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.as_object().unwrap().keys().all(|k| k == "draining" || k == "serving"), "only `draining` and `serving`: {body}");
        body["draining"].as_array().unwrap().iter().map(|d| d["upstream"].as_str().unwrap().to_string()).collect()
    }

    fn redis(&self) -> Option<&RedisServer> {
        self._redis.as_ref()
    }
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

fn put_body(upstream: &str) -> Value {
    json!({"upstream": upstream, "initialize": INITIALIZE})
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "answer: {}", got.1);
    assert_eq!(got.1["code"], code, "answer: {}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "error needs a message: {}", got.1);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// The suite. Each function is one conformance case, run on every backend by `suite!`.
// ---------------------------------------------------------------------------------------

async fn crud(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let before = now_ms();
    let created = c.put("sess-1", put_body("127.0.0.1:8081"), None).await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    let r = &created.1;
    assert_eq!(r["version"], 1);
    assert_eq!(r["session_id"], "sess-1");
    assert_eq!(r["backend_session_id"], "sess-1", "backend id defaults to the client's");
    assert_eq!(r["upstream"], "127.0.0.1:8081");
    assert_eq!(r["generation"], 1);
    assert_eq!(r["initialize"], INITIALIZE);
    assert_eq!(r["initialized"], Value::Null);
    assert_eq!(r["protocol_version"], Value::Null);
    let created_at = r["created_at_ms"].as_u64().unwrap();
    assert!(created_at >= before && created_at <= now_ms(), "created_at_ms is Unix ms");
    assert_eq!(r["last_seen_ms"], r["created_at_ms"]);
    assert_eq!(r.as_object().unwrap().len(), 10, "exactly the documented fields: {r}");

    let got = c.get("sess-1").await;
    assert_eq!(got, (StatusCode::OK, created.1.clone()), "GET returns the stored record");

    // Replace: 200, created_at kept, every given field stored.
    let replaced = c
        .put(
            "sess-1",
            json!({"backend_session_id": "backend-2", "upstream": "127.0.0.1:8082", "generation": 2,
                   "initialize": INITIALIZE, "initialized": INITIALIZED, "protocol_version": "2025-06-18"}),
            None,
        )
        .await;
    assert_eq!(replaced.0, StatusCode::OK, "{}", replaced.1);
    assert_eq!(replaced.1["created_at_ms"], created_at);
    assert_eq!(replaced.1["backend_session_id"], "backend-2");
    assert_eq!(replaced.1["upstream"], "127.0.0.1:8082");
    assert_eq!(replaced.1["generation"], 2);
    assert_eq!(replaced.1["initialized"], INITIALIZED);
    assert_eq!(replaced.1["protocol_version"], "2025-06-18");
    assert_eq!(c.get("sess-1").await.1, replaced.1);

    // PATCH touches and fills in; an empty body only touches.
    let patched = c.patch("sess-1", Some(json!({"protocol_version": "2025-11-25"}))).await;
    assert_eq!(patched.0, StatusCode::OK, "{}", patched.1);
    assert_eq!(patched.1["protocol_version"], "2025-11-25");
    assert_eq!(patched.1["initialized"], INITIALIZED, "fields not given are kept");
    assert_eq!(patched.1["generation"], 2, "PATCH never changes the pin");
    assert!(patched.1["last_seen_ms"].as_u64() >= replaced.1["last_seen_ms"].as_u64());
    let touched = c.patch("sess-1", None).await;
    assert_eq!(touched.0, StatusCode::OK);
    assert_eq!(touched.1["protocol_version"], "2025-11-25");
    assert_eq!(c.get("sess-1").await.1, touched.1);

    // DELETE, then everything is 404.
    assert_eq!(c.delete("sess-1").await, (StatusCode::NO_CONTENT, Value::Null));
    assert_error(&c.get("sess-1").await, StatusCode::NOT_FOUND, "session_not_found");
    assert_error(&c.delete("sess-1").await, StatusCode::NOT_FOUND, "session_not_found");
    assert_error(&c.patch("sess-1", None).await, StatusCode::NOT_FOUND, "session_not_found");

    // Ids with URL-special characters round-trip when percent-encoded; ids are distinct keys.
    for id in ["a/b", "x%2Fy", "q?r#s", "{tag}:1", "~!*'()", &"z".repeat(256)] {
        let put = c.put(id, put_body("10.0.0.1:80"), None).await;
        assert_eq!(put.0, StatusCode::CREATED, "{id}: {}", put.1);
        let got = c.get(id).await;
        assert_eq!(got.0, StatusCode::OK, "{id}");
        assert_eq!(got.1["session_id"], id);
    }
    assert_error(&c.get("a%2Fb").await, StatusCode::NOT_FOUND, "session_not_found");
}

/// `POST /v1/sessions`: many records in one request, each created only where none exists;
/// bad records are rejected alone, a bad body or too many records reject the whole request.
async fn batch_writes(backend: Backend) {
    let c = Control::start_with(backend, 3600, &["--max-body-bytes", "1048576"]).await;
    let url = c.url("/v1/sessions");
    assert_eq!(c.put("old", json!({"upstream": "10.0.0.9:80", "initialize": INITIALIZE, "generation": 4}), None).await.0, StatusCode::CREATED);
    let batch = json!({"records": {
        "a/b": {"upstream": "10.0.0.1:80", "initialize": INITIALIZE},
        "old": {"upstream": "10.0.0.2:80", "initialize": INITIALIZE, "backend_session_id": "up-2"},
        "bad upstream": {"upstream": "10.0.0.3:80", "initialize": INITIALIZE},
        "no-json": {"upstream": "10.0.0.4:80", "initialize": "not json"},
    }});
    let (status, answer) = c.call(Method::POST, &url, Some(batch.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((answer["written"].clone(), answer["kept"].clone()), (json!(1), json!(1)), "{answer}");
    let rejected = answer["rejected"].as_object().unwrap();
    assert_eq!(rejected.keys().map(String::as_str).collect::<Vec<_>>(), ["bad upstream", "no-json"], "{answer}");
    assert_eq!(rejected["bad upstream"]["code"], "invalid_session_id");
    assert_eq!(rejected["no-json"]["code"], "invalid_request");
    let a = c.get("a/b").await;
    assert_eq!((a.0, a.1["upstream"].clone(), a.1["generation"].clone()), (StatusCode::OK, json!("10.0.0.1:80"), json!(1)));
    let old = c.get("old").await;
    assert_eq!((old.1["upstream"].clone(), old.1["backend_session_id"].clone(), old.1["generation"].clone()), (json!("10.0.0.9:80"), json!("old"), json!(4)), "an existing record is kept");
    // The same batch again (a retry): nothing is overwritten.
    let (status, again) = c.call(Method::POST, &url, Some(batch.to_string())).await;
    assert_eq!((status, again["written"].clone(), again["kept"].clone()), (StatusCode::OK, json!(0), json!(2)), "{again}");
    assert_error(&c.get("no-json").await, StatusCode::NOT_FOUND, "session_not_found");

    // The whole request is refused, nothing written: not JSON, unknown field, too many.
    assert_error(&c.call(Method::POST, &url, Some("{".into())).await, StatusCode::BAD_REQUEST, "malformed_json");
    let unknown = json!({"records": {"u": {"upstream": "10.0.0.1:80", "initialize": "{}", "extra": 1}}});
    assert_error(&c.call(Method::POST, &url, Some(unknown.to_string())).await, StatusCode::BAD_REQUEST, "unknown_field");
    let many: serde_json::Map<String, Value> = (0..1025).map(|i| (format!("m-{i}"), json!({"upstream": "10.0.0.1:80", "initialize": "{}"}))).collect();
    assert_error(&c.call(Method::POST, &url, Some(json!({"records": many}).to_string())).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&c.get("m-0").await, StatusCode::NOT_FOUND, "session_not_found");
    let empty = c.call(Method::POST, &url, Some(json!({"records": {}}).to_string())).await;
    assert_eq!(empty, (StatusCode::OK, json!({"written": 0, "kept": 0, "rejected": {}})));
}

async fn ttl_expiry(backend: Backend) {
    const TTL: Duration = Duration::from_secs(3);
    let c = Control::start(backend, TTL.as_secs()).await;
    // Measured from before the write: the record cannot expire before written + TTL.
    let written = Instant::now();
    assert_eq!(c.put("idle", put_body("h:1"), None).await.0, StatusCode::CREATED);
    assert_eq!(c.put("busy", put_body("h:1"), None).await.0, StatusCode::CREATED);
    assert_eq!(c.get("idle").await.0, StatusCode::OK);
    // Keep "busy" touched (every 100 ms: a touch would have to be 3 s late to miss) until
    // "idle" expires.
    loop {
        assert_eq!(c.patch("busy", None).await.0, StatusCode::OK, "a touched record must not expire");
        if c.get("idle").await.0 == StatusCode::NOT_FOUND {
            break;
        }
        assert!(written.elapsed() < TTL + Duration::from_secs(12), "idle record did not expire within 15 s (TTL 3 s)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 50 ms for the stores' clock granularity.
    assert!(written.elapsed() + Duration::from_millis(50) >= TTL, "expired too early: {:?} after the write", written.elapsed());
    assert_eq!(c.get("busy").await.0, StatusCode::OK);
    // An expired record is absent for every operation.
    assert_error(&c.patch("idle", None).await, StatusCode::NOT_FOUND, "session_not_found");
    assert_eq!(c.put("idle", put_body("h:2"), Some(0)).await.0, StatusCode::CREATED, "if_generation=0 after expiry");
    // GET does not refresh the TTL: without touches "busy" expires too.
    let start = Instant::now();
    while c.get("busy").await.0 == StatusCode::OK {
        assert!(start.elapsed() < TTL + Duration::from_secs(12), "GET kept the record alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn generation_conflict(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    // if_generation=0: only if absent.
    let first = c.put("s", put_body("h:1"), Some(0)).await;
    assert_eq!(first.0, StatusCode::CREATED);
    let again = c.put("s", put_body("h:9"), Some(0)).await;
    assert_error(&again, StatusCode::CONFLICT, "generation_conflict");
    assert_eq!(again.1["current"], first.1, "409 carries the current record");
    // Matching generation wins; the stale one gets 409 with the new record.
    let mut repin = put_body("h:2");
    repin["generation"] = json!(2);
    let won = c.put("s", repin.clone(), Some(1)).await;
    assert_eq!(won.0, StatusCode::OK, "{}", won.1);
    assert_eq!(won.1["generation"], 2);
    let stale = c.put("s", put_body("h:3"), Some(1)).await;
    assert_error(&stale, StatusCode::CONFLICT, "generation_conflict");
    assert_eq!(stale.1["current"]["generation"], 2);
    assert_eq!(stale.1["current"]["upstream"], "h:2");
    // Nothing was written by the losers.
    assert_eq!(c.get("s").await.1, won.1);
    // A condition on an absent record: 409 with current null.
    let absent = c.put("nobody", put_body("h:1"), Some(3)).await;
    assert_error(&absent, StatusCode::CONFLICT, "generation_conflict");
    assert!(absent.1.as_object().unwrap().contains_key("current") && absent.1["current"].is_null(), "{}", absent.1);
    assert_error(&c.get("nobody").await, StatusCode::NOT_FOUND, "session_not_found");
}

async fn concurrent_conditional_updates(backend: Backend) {
    const RACERS: usize = 16;
    let c = std::sync::Arc::new(Control::start(backend, 3600).await);

    // Creation race: exactly one if_generation=0 succeeds.
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.put("race", put_body(&format!("10.0.0.{i}:80")), Some(0)).await })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let winners: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::CREATED).collect();
    assert_eq!(winners.len(), 1, "exactly one creator: {results:?}");
    assert!(results.iter().all(|r| r.0 == StatusCode::CREATED || r.0 == StatusCode::CONFLICT), "{results:?}");

    // Re-pin race: 16 writers holding generation 1 → exactly one moves it to 2.
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut body = put_body(&format!("10.0.1.{i}:80"));
                body["generation"] = json!(2);
                c.put("race", body, Some(1)).await
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let winners: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1, "exactly one re-pin: {results:?}");
    let losers = results.iter().filter(|r| r.0 == StatusCode::CONFLICT).count();
    assert_eq!(losers, RACERS - 1, "{results:?}");
    let stored = c.get("race").await.1;
    assert_eq!(stored, winners[0].1, "the stored record is the winner's");
    for r in results.iter().filter(|r| r.0 == StatusCode::CONFLICT) {
        assert_eq!(r.1["current"]["generation"], 2);
    }

    // Touches racing a re-pin never lose the re-pin (nor the touch's record).
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            if i == RACERS / 2 {
                let mut body = put_body("10.0.2.1:80");
                body["generation"] = json!(3);
                c.put("race", body, Some(2)).await
            } else {
                c.patch("race", Some(json!({"protocol_version": "2025-06-18"}))).await
            }
        }));
    }
    for r in futures::future::join_all(tasks).await {
        assert_eq!(r.unwrap().0, StatusCode::OK);
    }
    let stored = c.get("race").await.1;
    assert_eq!(stored["generation"], 3);
    assert_eq!(stored["upstream"], "10.0.2.1:80");
}

async fn authentication(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let url = c.session_url("s");
    for (name, auth) in [
        ("no header", None),
        ("wrong token", Some(format!("Bearer {TOKEN}x"))),
        ("prefix of the token", Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]))),
        ("wrong scheme", Some(format!("Basic {TOKEN}"))),
        ("empty bearer", Some("Bearer ".to_string())),
    ] {
        for method in [Method::GET, Method::PUT, Method::PATCH, Method::DELETE] {
            let mut req = c.http.request(method.clone(), &url);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            if method == Method::PUT {
                req = req.body(put_body("h:1").to_string());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}, {method}");
            assert_error(&(status, body), StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }
    // Nothing was written by the rejected PUTs.
    assert_error(&c.get("s").await, StatusCode::NOT_FOUND, "session_not_found");
    // Health, readiness and metrics need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = c.http.get(c.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
}

async fn body_limits_and_validation(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    assert_eq!(c.put("s", put_body("h:1"), None).await.0, StatusCode::CREATED);
    let original = c.get("s").await.1;

    // Oversize: a body over --max-body-bytes is refused whole; just under is fine.
    let big = |n: usize| json!({"upstream": "h:2", "initialize": format!("\"{}\"", "x".repeat(n))});
    let small_enough = big(MAX_BODY - 100);
    assert!(small_enough.to_string().len() <= MAX_BODY);
    assert_eq!(c.put("fits", small_enough, None).await.0, StatusCode::CREATED);
    assert_error(&c.put("s", big(MAX_BODY), None).await, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert_error(
        &c.patch("s", Some(json!({"initialized": format!("\"{}\"", "y".repeat(MAX_BODY))}))).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    // A chunked body (no Content-Length) over the limit is refused too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(big(MAX_BODY).to_string().into_bytes())];
    let resp = c
        .http
        .put(c.session_url("s"))
        .bearer_auth(TOKEN)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let url = c.session_url("s");
    for (body, code) in [
        ("{", "malformed_json"),
        ("", "malformed_json"),
        ("not json", "malformed_json"),
        (r#"{"upstream":"h:1","initialize":"{}"} trailing"#, "malformed_json"),
        (r#"{"upstream":"h:1","initialize":"{}","extra":1}"#, "unknown_field"),
        (r#"{"upstream":"h:1","initialize":"{}","authorization":"Bearer x"}"#, "unknown_field"),
        (r#"{"initialize":"{}"}"#, "invalid_request"),
        (r#"{"upstream":"h:1"}"#, "invalid_request"),
        (r#"{"upstream":1,"initialize":"{}"}"#, "invalid_request"),
        (r#"[]"#, "invalid_request"),
        (r#"{"upstream":"h:1","initialize":"{}","generation":0}"#, "invalid_request"),
        (r#"{"upstream":"h:1","initialize":"{}","generation":-1}"#, "invalid_request"),
        (r#"{"upstream":"","initialize":"{}"}"#, "invalid_request"),
        (r#"{"upstream":"h 1","initialize":"{}"}"#, "invalid_request"),
        (r#"{"upstream":"h:1","initialize":"{nope"}"#, "invalid_request"),
        (r#"{"upstream":"h:1","initialize":"{}","backend_session_id":""}"#, "invalid_request"),
    ] {
        let got = c.call(Method::PUT, &url, Some(body.to_string())).await;
        assert_error(&got, StatusCode::BAD_REQUEST, code);
    }
    for (body, code) in [
        ("{", "malformed_json"),
        (r#"{"generation":2}"#, "unknown_field"),
        (r#"{"initialized":5}"#, "invalid_request"),
        (r#"{"initialized":"{bad"}"#, "invalid_request"),
    ] {
        let got = c.call(Method::PATCH, &url, Some(body.to_string())).await;
        assert_error(&got, StatusCode::BAD_REQUEST, code);
    }
    for query in ["?if_generation=abc", "?if_generation=-1", "?generation=1"] {
        let got = c.call(Method::PUT, &format!("{url}{query}"), Some(put_body("h:3").to_string())).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // None of the rejected requests changed anything.
    assert_eq!(c.get("s").await.1, original);
}

async fn invalid_session_ids(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let long = "x".repeat(257);
    for raw in ["%20", "a%20b", "a%09b", "%7F", "%C3%A9", "%00", "%FF", long.as_str()] {
        let url = c.url(&format!("/v1/sessions/{raw}"));
        for method in [Method::GET, Method::PUT, Method::PATCH, Method::DELETE] {
            let body = (method == Method::PUT).then(|| put_body("h:1").to_string());
            let got = c.call(method.clone(), &url, body).await;
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_session_id");
        }
    }
    assert_error(&c.call(Method::GET, &c.url("/v1/sessions/"), None).await, StatusCode::BAD_REQUEST, "invalid_session_id");
    // Backend ids follow the same rule.
    let got = c.put("ok", json!({"upstream": "h:1", "initialize": "{}", "backend_session_id": "a b"}), None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    // Unknown routes and methods answer JSON errors too.
    assert_error(&c.call(Method::GET, &c.url("/v2/sessions/x"), None).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&c.call(Method::POST, &c.session_url("x"), None).await, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

async fn health_and_metrics(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let health = c.http.get(c.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = c.http.get(c.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    c.put("m", put_body("h:1"), None).await;
    c.get("m").await;
    c.get("missing").await;
    let text = c.http.get(c.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        r#"mcp_affinity_control_http_requests_total{route="/v1/sessions/{id}",method="PUT",status="201"} 1"#,
        r#"mcp_affinity_control_http_requests_total{route="/v1/sessions/{id}",method="GET",status="200"} 1"#,
        r#"mcp_affinity_control_http_requests_total{route="/v1/sessions/{id}",method="GET",status="404"} 1"#,
        r#"mcp_affinity_control_store_operation_duration_seconds_count{op="get",outcome="ok"} 2"#,
        r#"mcp_affinity_control_store_operation_duration_seconds_count{op="put",outcome="ok"} 1"#,
        "# TYPE mcp_affinity_control_store_operation_duration_seconds histogram",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    assert!(!text.contains("missing"), "metrics must not carry session ids");
    if matches!(backend, Backend::Memory) {
        assert!(text.contains("mcp_affinity_control_store_records 1"), "{text}");
    }
}

async fn drains(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let before = now_ms();
    let first = c.drain("127.0.0.2:8080").await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let since = first.1["since_ms"].as_u64().unwrap();
    assert!(since >= before && since <= now_ms(), "since_ms is Unix ms");
    assert_eq!(
        first.1,
        json!({"upstream": "127.0.0.2:8080", "since_ms": since, "source": "admin", "moved": 0, "failed": 0, "last_move_ms": null, "tasks": 0})
    );
    // Idempotent: a later POST (a retried preStop hook) answers the same drain.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(c.drain("127.0.0.2:8080").await, first);
    assert_eq!(c.drain("127.0.0.2%3A8080").await, first, "percent-encoded");
    // IPv6, raw brackets or percent-encoded, stored canonically; the list is sorted.
    for raw in ["[::1]:8080", "%5B0%3A0%3A0%3A0%3A0%3A0%3A0%3A1%5D%3A8080", "10.0.0.10:80", "10.0.0.9:80"] {
        let got = c.drain(raw).await;
        assert_eq!(got.0, StatusCode::OK, "{raw}: {}", got.1);
    }
    assert_eq!(c.draining().await, ["10.0.0.10:80", "10.0.0.9:80", "127.0.0.2:8080", "[::1]:8080"]);
    if let Some(redis) = c.redis() {
        // One hash holds every drain; no other key was written.
        assert_eq!(redis.command(&["HEXISTS", "conformance:drains", "since:[::1]:8080"]).unwrap(), ":1");
        assert_eq!(redis.command(&["HLEN", "conformance:drains"]).unwrap(), ":16", "4 fields per drain before a move");
        assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":1");
    }
    // Undrain: 204, then 404 not_draining.
    assert_eq!(c.undrain("[::1]:8080").await, (StatusCode::NO_CONTENT, Value::Null));
    assert_error(&c.undrain("[::1]:8080").await, StatusCode::NOT_FOUND, "not_draining");
    assert_error(&c.undrain("10.1.1.1:1").await, StatusCode::NOT_FOUND, "not_draining");
    assert_eq!(c.draining().await, ["10.0.0.10:80", "10.0.0.9:80", "127.0.0.2:8080"]);
    // Drained again after an undrain: a new drain.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(c.drain("127.0.0.2:8080").await.1["since_ms"] == since, "still the first drain");
    c.undrain("127.0.0.2:8080").await;
    assert!(c.drain("127.0.0.2:8080").await.1["since_ms"].as_u64().unwrap() > since, "a new drain");
    // Bad upstreams and missing tokens change nothing.
    for raw in ["nope", "10.0.0.1", "pod-a:8080", "::1:80", "10.0.0.1:65536"] {
        assert_error(&c.drain(raw).await, StatusCode::BAD_REQUEST, "invalid_upstream");
        assert_error(&c.undrain(raw).await, StatusCode::BAD_REQUEST, "invalid_upstream");
    }
    for (method, path) in
        [(Method::POST, "/v1/upstreams/10.0.0.1:80/drain"), (Method::DELETE, "/v1/upstreams/10.0.0.9:80/drain"), (Method::GET, "/v1/upstreams/draining")]
    {
        let resp = c.http.request(method.clone(), c.url(path)).send().await.unwrap();
        let status = resp.status();
        assert_error(&(status, resp.json().await.unwrap()), StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(c.draining().await, ["10.0.0.10:80", "10.0.0.9:80", "127.0.0.2:8080"]);
    for up in ["10.0.0.10:80", "10.0.0.9:80", "127.0.0.2:8080"] {
        assert_eq!(c.undrain(up).await.0, StatusCode::NO_CONTENT);
    }
    assert!(c.draining().await.is_empty());
    if let Some(redis) = c.redis() {
        assert_eq!(redis.command(&["EXISTS", "conformance:drains"]).unwrap(), ":0", "nothing left behind");
    }
    let text = c.http.get(c.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("mcp_affinity_control_upstreams_draining 0"), "{text}");
}

async fn drain_ttl_expiry(backend: Backend) {
    let c = Control::start_with(backend, 3600, &["--drain-ttl-secs", "1"]).await;
    // Measured from before the drain was written: it cannot expire before that + 1 s.
    let start = Instant::now();
    let first = c.drain("10.0.0.1:80").await.1;
    assert_eq!(c.draining().await, ["10.0.0.1:80"]);
    while !c.draining().await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "drain did not expire within 10 s (TTL 1 s)");
        // Draining again does not extend it.
        assert_eq!(c.drain("10.0.0.1:80").await.1, first);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() + Duration::from_millis(50) >= Duration::from_secs(1), "expired too early: {:?} after the drain", start.elapsed());
    // Expired = not draining; drained again, it starts anew.
    assert_error(&c.undrain("10.0.0.1:80").await, StatusCode::NOT_FOUND, "not_draining");
    let again = c.drain("10.0.0.1:80").await.1;
    assert!(again["since_ms"].as_u64() > first["since_ms"].as_u64(), "{again}");
    if let Some(redis) = c.redis() {
        assert_eq!(redis.command(&["HLEN", "conformance:drains"]).unwrap(), ":4", "the expired drain's fields were replaced");
    }
}

/// Task pins (`/v1/tasks/{id}`): written, read back, replaced, deleted; expired after the
/// task's `ttl_ms`; ids that need encoding; invalid ids and bodies refused.
async fn task_pins(backend: Backend) {
    let c = Control::start(backend, 3600).await;
    let url = |id: &str| c.url(&mcp_affinity_proto::tasks::task_path("/v1", id));
    let (status, put) = c.call(Method::PUT, &url("t/1 ä"), Some(json!({"upstream": "10.0.0.1:80", "ttl_ms": 60_000}).to_string())).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!((put["task_id"].as_str(), put["upstream"].as_str()), (Some("t/1 ä"), Some("10.0.0.1:80")));
    assert_eq!(put["expires_at_ms"].as_u64().unwrap() - put["created_at_ms"].as_u64().unwrap(), 60_000);
    assert_eq!(c.call(Method::GET, &url("t/1 ä"), None).await, (StatusCode::OK, put));
    c.call(Method::PUT, &url("t/1 ä"), Some(json!({"upstream": "10.0.0.2:80"}).to_string())).await;
    let (_, again) = c.call(Method::GET, &url("t/1 ä"), None).await;
    assert_eq!(again["upstream"], "10.0.0.2:80", "replaced");
    assert!(again["expires_at_ms"].as_u64().unwrap() - again["created_at_ms"].as_u64().unwrap() <= 24 * 3600 * 1000, "an unlimited task is kept at most the cap");
    assert_eq!(c.call(Method::DELETE, &url("t/1 ä"), None).await.0, StatusCode::NO_CONTENT);
    assert_error(&c.call(Method::GET, &url("t/1 ä"), None).await, StatusCode::NOT_FOUND, "task_not_found");
    assert_error(&c.call(Method::DELETE, &url("t/1 ä"), None).await, StatusCode::NOT_FOUND, "task_not_found");
    // Expiry: the store forgets the pin after its ttl.
    c.call(Method::PUT, &url("short"), Some(json!({"upstream": "10.0.0.1:80", "ttl_ms": 200}).to_string())).await;
    let start = Instant::now();
    while c.call(Method::GET, &url("short"), None).await.0 == StatusCode::OK {
        assert!(start.elapsed() < Duration::from_secs(10), "the task pin did not expire within 10 s (ttl 200 ms)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A drain counts its upstream's unfinished tasks: created, not terminal, not deleted.
    let up = "10.0.0.7:80";
    for (id, upstream) in [("u1", up), ("u2", up), ("u3", up), ("other", "10.0.0.8:80")] {
        c.call(Method::PUT, &url(id), Some(json!({"upstream": upstream, "ttl_ms": 60_000}).to_string())).await;
    }
    assert_eq!(c.drain(up).await.1["tasks"], 3, "the drain's answer counts them");
    let (status, done) = c.call(Method::PUT, &url("u2"), Some(json!({"upstream": up, "terminal": true}).to_string())).await;
    assert_eq!((status, &done["terminal"]), (StatusCode::OK, &json!(true)), "{done}");
    let (_, u2) = c.call(Method::GET, &url("u2"), None).await;
    assert_eq!(u2["expires_at_ms"].as_u64().unwrap() - u2["created_at_ms"].as_u64().unwrap(), 60_000, "a terminal pin keeps its expiry: {u2}");
    assert_eq!(c.call(Method::DELETE, &url("u3"), None).await.0, StatusCode::NO_CONTENT);
    let (_, list) = c.call(Method::GET, &c.url("/v1/upstreams/draining"), None).await;
    assert_eq!(list["draining"][0]["tasks"], 1, "u2 terminal and u3 deleted: {list}");
    // A preStop hook's drain waits for the tasks: u1 ends while it waits.
    let started = Instant::now();
    let drain_url = c.url(&format!("/v1/upstreams/{up}/drain?wait_tasks_secs=60"));
    let (waited, _) = tokio::join!(c.call(Method::POST, &drain_url, None), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.call(Method::PUT, &url("u1"), Some(json!({"upstream": up, "terminal": true}).to_string())).await
    });
    assert_eq!((waited.0, &waited.1["tasks"]), (StatusCode::OK, &json!(0)), "{}", waited.1);
    assert!(started.elapsed() >= Duration::from_millis(2250), "answered 2 s after the last count that saw u1 (the poll at 250 ms): {:?}", started.elapsed());
    // Its wait is bounded: a task that never ends is reported.
    c.call(Method::PUT, &url("u4"), Some(json!({"upstream": up, "ttl_ms": 60_000}).to_string())).await;
    let (status, bounded) = c.call(Method::POST, &c.url(&format!("/v1/upstreams/{up}/drain?wait_tasks_secs=1")), None).await;
    assert_eq!((status, &bounded["tasks"]), (StatusCode::OK, &json!(1)), "{bounded}");
    assert_error(&c.call(Method::POST, &c.url(&format!("/v1/upstreams/{up}/drain?wait_tasks_secs=100000")), None).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(c.undrain(up).await.0, StatusCode::NO_CONTENT);
    // Bad input.
    assert_error(&c.call(Method::PUT, &url("t2"), Some(json!({"upstream": "a b"}).to_string())).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&c.call(Method::PUT, &url(&"x".repeat(300)), Some(json!({"upstream": "10.0.0.1:80"}).to_string())).await, StatusCode::BAD_REQUEST, "invalid_task_id");
}

/// The drain semantics of a store, through the trait, with the store's clock at `clock`
/// (drain TTL 60 s). `hash_len` reads the Redis hash's field count (memory: `None`).
async fn drain_semantics<S: SessionStore>(store: S, clock: Arc<ManualClock>, hash_len: impl Fn() -> Option<i64>) {
    let a: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let b: SocketAddr = "[fd00::1]:8080".parse().unwrap();
    let t0 = clock.unix_ms();
    let first = store.drain(a, DrainSource::Dns).await.unwrap();
    assert_eq!(
        first,
        Drain { upstream: a.to_string(), since_ms: t0, source: DrainSource::Dns, moved: 0, failed: 0, last_move_ms: None, tasks: 0 }
    );
    // Idempotent: an existing drain keeps its since_ms, source and counters.
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.drain(a, DrainSource::Admin).await.unwrap(), first);
    // Counting moves: moved sets last_move_ms from the store's clock, failed does not.
    clock.advance(Duration::from_millis(500));
    let moved = store.record_drain_move(a, true).await.unwrap().unwrap();
    assert_eq!((moved.moved, moved.failed, moved.last_move_ms), (1, 0, Some(t0 + 1500)));
    clock.advance(Duration::from_millis(500));
    let failed = store.record_drain_move(a, false).await.unwrap().unwrap();
    assert_eq!((failed.moved, failed.failed, failed.last_move_ms), (1, 1, Some(t0 + 1500)));
    let moved = store.record_drain_move(a, true).await.unwrap().unwrap();
    assert_eq!((moved.moved, moved.failed, moved.last_move_ms, moved.since_ms), (2, 1, Some(t0 + 2000), t0));
    assert_eq!(store.drain(a, DrainSource::Admin).await.unwrap(), moved, "drain again keeps the counters");
    // Not draining: a no-op that creates nothing.
    assert_eq!(store.record_drain_move(b, true).await.unwrap(), None);
    assert_eq!(store.record_drain_move(b, false).await.unwrap(), None);
    assert_eq!(store.draining().await.unwrap(), std::slice::from_ref(&moved));
    // Sorted by upstream; undrain says whether it was draining.
    store.drain(b, DrainSource::Admin).await.unwrap();
    let c: SocketAddr = "10.0.0.10:80".parse().unwrap();
    store.drain(c, DrainSource::Admin).await.unwrap();
    let listed: Vec<String> = store.draining().await.unwrap().into_iter().map(|d| d.upstream).collect();
    assert_eq!(listed, ["10.0.0.10:80", "10.0.0.2:8080", "[fd00::1]:8080"]);
    assert!(store.undrain(c).await.unwrap());
    assert!(!store.undrain(c).await.unwrap());
    // Expiry: 60 s after since_ms (a at t0, b at t0 + 2 s), whatever happened meanwhile.
    clock.advance(Duration::from_millis(57_999));
    assert_eq!(store.draining().await.unwrap().len(), 2, "not yet");
    clock.advance(Duration::from_millis(1));
    let left = store.draining().await.unwrap();
    assert_eq!(left.iter().map(|d| d.upstream.as_str()).collect::<Vec<_>>(), ["[fd00::1]:8080"]);
    assert_eq!(store.record_drain_move(a, true).await.unwrap(), None, "expired = not draining");
    assert!(!store.undrain(a).await.unwrap());
    if let Some(n) = hash_len() {
        assert_eq!(n, 4, "the expired drain's fields were deleted by the listing");
    }
    // Drained again after expiry: a new drain, counters from zero.
    let again = store.drain(a, DrainSource::Admin).await.unwrap();
    assert_eq!(again, Drain { upstream: a.to_string(), since_ms: t0 + 60_000, source: DrainSource::Admin, moved: 0, failed: 0, last_move_ms: None, tasks: 0 });
    clock.advance(Duration::from_secs(3600));
    assert!(store.draining().await.unwrap().is_empty());
    if let Some(n) = hash_len() {
        assert_eq!(n, 0, "nothing left behind");
    }
}

async fn store_drains(backend: Backend) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let ttl = Duration::from_secs(60);
    match backend {
        Backend::Memory => {
            let store = MemoryStore::with_clock(Duration::from_secs(3600), 100, clock.clone()).with_drain_ttl(ttl);
            drain_semantics(store, clock, || None).await;
        }
        Backend::Redis => {
            let redis = RedisServer::start().expect("start redis-server");
            let config = RedisStoreConfig {
                url: redis.url(),
                key_prefix: "drain-test:".into(),
                ttl: Duration::from_secs(3600),
                timeout: Duration::from_secs(2),
            };
            let store = RedisStore::new(&config).unwrap().with_drain_ttl(ttl).with_clock(clock.clone());
            let hash_len = || {
                let reply = redis.command(&["HLEN", "drain-test:drains"]).unwrap();
                Some(reply.trim_start_matches(':').parse().unwrap())
            };
            drain_semantics(store, clock, hash_len).await;
        }
    }
}

/// Instantiates every case of the suite for one backend.
macro_rules! suite {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn crud() {
                super::crud($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn batch_writes() {
                super::batch_writes($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn ttl_expiry() {
                super::ttl_expiry($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn generation_conflict() {
                super::generation_conflict($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_conditional_updates() {
                super::concurrent_conditional_updates($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn authentication() {
                super::authentication($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn body_limits_and_validation() {
                super::body_limits_and_validation($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn invalid_session_ids() {
                super::invalid_session_ids($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn health_and_metrics() {
                super::health_and_metrics($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn drains() {
                super::drains($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn drain_ttl_expiry() {
                super::drain_ttl_expiry($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn task_pins() {
                super::task_pins($backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn store_drains() {
                super::store_drains($backend).await
            }
        }
    };
}

suite!(memory, Backend::Memory);
suite!(redis, Backend::Redis);
