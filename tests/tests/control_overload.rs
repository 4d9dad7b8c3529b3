//! Control under 10× its admission limit, end to end: the real `mcp-affinity-control`
//! binary (a process, memory store, `--max-in-flight 16`) answers every `/v1` request over
//! the limit 503 `overloaded` at once, queues nothing behind the held requests, keeps its
//! memory flat under hundreds of thousands of refusals, and serves again once the held
//! requests end.
//!
//! Nothing depends on luck or on the machine's speed:
//!
//! - **The hold is observed, not slept for.** Phase A holds all 16 permits with 16 session
//!   recoveries (reason `connect_failure`) whose only `--endpoints` entry is a *blackhole*
//!   (a loopback listener that accepts and never answers): each recovery hangs on its
//!   `initialize` call until the recovery deadline (`--recovery-timeout-ms`). The test waits
//!   until the blackhole has accepted 16 connections — 16 recoveries in their handlers, so
//!   16 permits held — and no permit can come back before `fired + recovery timeout`
//!   (control's deadline starts after the test fired the recoveries, and a tokio timeout
//!   never fires early). Every request that *finished* before that instant was necessarily
//!   admitted while all permits were held, so it must be a 503: that is checked for each
//!   such request, and requests finishing later may be 200 or 503.
//! - **Queueing would be caught.** A request queued behind the held ones would either not
//!   be answered before the hold ends (then it is not a 503 during the hold — fails) or be
//!   answered slowly; the slowest 503 must come within half the recovery timeout (a ratio
//!   to the held work, not a wall-clock budget), and client timeouts are errors.
//! - **Memory.** Phase B holds the permits with 16 uploads that send their headers and then
//!   stall (the permit is taken before the body is read, so they hold it until the test
//!   closes them — as long as needed, whatever the machine's speed; a probe answered 503
//!   proves the hold). Control's `VmRSS` (`/proc/<pid>/status`) is read after a warm-up and
//!   after 200 000 refused requests; its growth must stay below 16 MiB. (The clients are a
//!   closed loop of 160, so a queue could hold at most 160 requests; what this bound guards
//!   is per-request state that is never freed — a leak of even 100 bytes per refusal would
//!   add ~19 MiB. Queueing itself is caught by phase A.)
//!
//! Needs the control binary: `cargo build -p mcp-affinity-control`, then
//! `cargo test -p mcp-affinity-harness --test control_overload -- --nocapture`.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_affinity_harness::fixtures::control::TEST_TOKEN;
use mcp_affinity_harness::process::{Child, free_addr, workspace_bin};
use serde_json::{Value, json};

/// `--max-in-flight`.
const MAX_IN_FLIGHT: usize = 16;
/// Concurrent clients offered: ten times the limit.
const CLIENTS: usize = 10 * MAX_IN_FLIGHT;
/// `--recovery-timeout-ms`: how long each held recovery lasts.
const RECOVERY_TIMEOUT: Duration = Duration::from_millis(3000);
/// Phase A offers load until this long before the earliest instant a permit can come back.
const HAMMER_MARGIN: Duration = Duration::from_millis(750);
/// Refused requests before the baseline RSS (connections, buffers and allocator pools warm).
const WARMUP_REQUESTS: usize = 20_000;
/// Refused requests between the two RSS readings.
const RSS_REQUESTS: usize = 200_000;
/// Allowed RSS growth over `RSS_REQUESTS` refusals.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;
/// Client timeout of every request: a request hanging this long is an error.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Every `PUT_EVERY`-th request of a client is a PUT (the others are GETs).
const PUT_EVERY: usize = 8;

/// The session every client reads and writes.
const HOT: &str = "overload-hot";
/// `initialize` body of the records.
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"overload-test","version":"1"}}}"#;

/// A loopback TCP listener that accepts connections, keeps them open and never answers.
/// Counts the connections it accepted.
struct Blackhole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Blackhole {
    fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind blackhole");
        let addr = listener.local_addr().expect("blackhole addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    held.push(stream);
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Blackhole { addr, accepted, stop }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop` and closes every held connection.
        let _ = TcpStream::connect(self.addr);
    }
}

/// The control binary, spawned like `ControlService` spawns it (free loopback port, the
/// test token, memory store) but with its pid reachable; killed when dropped.
struct Control {
    child: Child,
    addr: SocketAddr,
    base: String,
}

impl Control {
    fn start(extra: &[String]) -> Control {
        let addr = free_addr();
        let mut cmd = Command::new(workspace_bin("mcp-affinity-control"));
        cmd.args(["--listen", &addr.to_string(), "--store", "memory"])
            .args(extra)
            .env("MCP_AFFINITY_CONTROL_TOKEN", TEST_TOKEN)
            .env("RUST_LOG", "error");
        let child = Child::spawn_listening("control", cmd, addr).expect("start control");
        Control { child, addr, base: format!("http://{addr}") }
    }

    fn session_url(&self, id: &str) -> String {
        format!("{}/v1/sessions/{id}", self.base)
    }

    /// Control's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid())).expect("read /proc/<pid>/status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
        line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS value")
    }
}

fn put_body(upstream: SocketAddr) -> Value {
    json!({"upstream": upstream.to_string(), "initialize": INITIALIZE, "protocol_version": "2025-06-18"})
}

fn recover_body(failed_upstream: SocketAddr) -> Value {
    json!({
        "failed_generation": 1,
        "failed_upstream": failed_upstream.to_string(),
        "reason": "connect_failure",
        "request": {
            "method": "POST",
            "path": "/mcp",
            "authority": "mcp.local",
            "content_type": "application/json",
            "accept": "application/json, text/event-stream",
            "protocol_version": "2025-06-18",
            "body": r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#,
        },
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(CLIENT_TIMEOUT).build().expect("reqwest client")
}

/// One answer of a load client.
enum Answer {
    /// 200 with the hot session's record.
    Ok,
    /// 503 `{"code":"overloaded",…}`.
    Overloaded,
}

/// One request of a load client: a GET of the hot session, or (`put`) a PUT replacing it.
/// Anything but 200 with the record or 503 `overloaded` is an error.
async fn one_request(http: &reqwest::Client, url: &str, put: Option<&Value>) -> Result<Answer, String> {
    let request = match put {
        Some(body) => http.put(url).json(body),
        None => http.get(url),
    };
    let response = request.bearer_auth(TEST_TOKEN).send().await.map_err(|e| format!("request error: {e:?}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| format!("body error after {status}: {e:?}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|_| format!("{status} with a non-JSON body: {text:.200}"))?;
    match status {
        200 if json["session_id"] == HOT => Ok(Answer::Ok),
        503 if json["code"] == "overloaded" && json["message"].is_string() => Ok(Answer::Overloaded),
        _ => Err(format!("unexpected answer {status}: {text:.200}")),
    }
}

/// What the load clients saw.
#[derive(Default)]
struct Tally {
    requests: usize,
    ok: usize,
    overloaded: usize,
    /// Answers received before `hold_floor` (all permits certainly held).
    during_hold: usize,
    /// Of those, answers that were not 503 `overloaded` (must stay empty).
    during_hold_not_503: Vec<String>,
    /// Errors and unexpected answers (must stay empty).
    errors: Vec<String>,
    error_count: usize,
    /// Latencies of the 503 answers, in µs.
    latencies_503_us: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.overloaded += other.overloaded;
        self.during_hold += other.during_hold;
        self.during_hold_not_503.extend(other.during_hold_not_503.into_iter().take(5));
        self.errors.extend(other.errors.into_iter().take(5));
        self.error_count += other.error_count;
        self.latencies_503_us.extend(other.latencies_503_us);
    }

    /// (p50, p99, max) of the 503 latencies.
    fn latency_503(&mut self) -> (Duration, Duration, Duration) {
        let l = &mut self.latencies_503_us;
        if l.is_empty() {
            return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        }
        l.sort_unstable();
        let at = |q: f64| Duration::from_micros(l[((l.len() - 1) as f64 * q) as usize]);
        (at(0.5), at(0.99), at(1.0))
    }

    fn summary(&mut self) -> String {
        let (p50, p99, max) = self.latency_503();
        format!(
            "{} requests: {} × 200, {} × 503 overloaded, {} errors; 503 latency p50 {p50:?} p99 {p99:?} max {max:?}",
            self.requests, self.ok, self.overloaded, self.error_count
        )
    }
}

/// When the load clients stop.
#[derive(Clone, Copy)]
enum Until {
    /// No request starts at or after this instant.
    Instant(Instant),
    /// This many requests in all (spread evenly over the clients).
    Requests(usize),
}

/// `CLIENTS` concurrent clients (one shared connection pool, a connection each) GET the
/// hot session, every `PUT_EVERY`-th request a PUT replacing it, until `until`. Answers
/// received before `hold_floor` are counted as during the hold.
async fn offer_load(control: &Control, upstream: SocketAddr, until: Until, hold_floor: Instant) -> Tally {
    let http = client();
    let url = control.session_url(HOT);
    let body = put_body(upstream);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        let quota = match until {
            Until::Requests(n) => n / CLIENTS + usize::from(c < n % CLIENTS),
            Until::Instant(_) => usize::MAX,
        };
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for i in 0..quota {
                if let Until::Instant(end) = until
                    && Instant::now() >= end
                {
                    break;
                }
                let put = (i + c) % PUT_EVERY == 0;
                let start = Instant::now();
                let answer = one_request(&http, &url, put.then_some(&body)).await;
                let end = Instant::now();
                tally.requests += 1;
                let during_hold = end < hold_floor;
                tally.during_hold += usize::from(during_hold);
                match answer {
                    Ok(Answer::Overloaded) => {
                        tally.overloaded += 1;
                        tally.latencies_503_us.push(u64::try_from((end - start).as_micros()).unwrap_or(u64::MAX));
                    }
                    Ok(Answer::Ok) => {
                        tally.ok += 1;
                        if during_hold && tally.during_hold_not_503.len() < 5 {
                            tally.during_hold_not_503.push(format!("{} answered 200", if put { "PUT" } else { "GET" }));
                        }
                    }
                    Err(e) => {
                        tally.error_count += 1;
                        if tally.errors.len() < 5 {
                            tally.errors.push(e.clone());
                        }
                        if during_hold && tally.during_hold_not_503.len() < 5 {
                            tally.during_hold_not_503.push(e);
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await.expect("load client panicked"));
    }
    total
}

/// GET of `id`: status and JSON body.
async fn get(http: &reqwest::Client, control: &Control, id: &str) -> (u16, Value) {
    let response = http.get(control.session_url(id)).bearer_auth(TEST_TOKEN).send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_limit_is_refused_fast_with_bounded_memory_and_control_recovers() {
    let blackhole = Blackhole::start();
    // A pod that is gone: a free port nobody listens on.
    let dead = free_addr();
    let control = Control::start(&[
        "--endpoints".into(),
        blackhole.addr.to_string(),
        "--recovery-timeout-ms".into(),
        RECOVERY_TIMEOUT.as_millis().to_string(),
        "--max-in-flight".into(),
        MAX_IN_FLIGHT.to_string(),
    ]);
    let http = client();
    let rss_start = control.rss_kib();

    // The hot session and one session per held recovery, all pinned to the dead pod.
    let held_ids: Vec<String> = (0..MAX_IN_FLIGHT).map(|i| format!("overload-held-{i}")).collect();
    for id in std::iter::once(HOT.to_string()).chain(held_ids.iter().cloned()) {
        let r = http.put(control.session_url(&id)).bearer_auth(TEST_TOKEN).json(&put_body(dead)).send().await.expect("PUT");
        assert_eq!(r.status().as_u16(), 201, "create {id}: {}", r.text().await.unwrap_or_default());
    }
    assert_eq!(get(&http, &control, HOT).await.0, 200);

    // ---- Phase A: all permits held by recoveries hanging on the blackhole ----
    let fired = Instant::now();
    // No permit can come back before this: each recovery's deadline starts after `fired`.
    let hold_floor = fired + RECOVERY_TIMEOUT;
    let held: Vec<_> = held_ids
        .iter()
        .map(|id| {
            let (http, url) = (http.clone(), format!("{}/recover", control.session_url(id)));
            tokio::spawn(async move {
                let r = http.post(url).bearer_auth(TEST_TOKEN).json(&recover_body(dead)).send().await.expect("recover request");
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or_default(), fired.elapsed())
            })
        })
        .collect();
    while blackhole.accepted() < MAX_IN_FLIGHT {
        assert!(
            Instant::now() < hold_floor - HAMMER_MARGIN,
            "the blackhole accepted only {} of {MAX_IN_FLIGHT} recovery connections in {:?}: the machine is too slow to observe the hold",
            blackhole.accepted(),
            fired.elapsed()
        );
        assert!(!held.iter().any(tokio::task::JoinHandle::is_finished), "a held recovery ended before the hold was observed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let hold_seen = fired.elapsed();
    assert_eq!(blackhole.accepted(), MAX_IN_FLIGHT, "one connection per recovery, none more");
    let probe_sent = Instant::now();
    let probe = get(&http, &control, HOT).await;
    let probe_took = probe_sent.elapsed();
    assert_eq!((probe.0, probe.1["code"].as_str()), (503, Some("overloaded")), "every permit is held: {}", probe.1);
    assert!(probe_took < RECOVERY_TIMEOUT / 2, "the probe's 503 took {probe_took:?}: refused only after waiting");

    let rss_a_before = control.rss_kib();
    let mut a = offer_load(&control, dead, Until::Instant(hold_floor - HAMMER_MARGIN), hold_floor).await;
    let rss_a_after = control.rss_kib();
    let a_summary = a.summary();
    let (_, _, a_max_503) = a.latency_503();
    println!(
        "phase A (hold by {MAX_IN_FLIGHT} recoveries on a blackhole, observed after {hold_seen:?}; {CLIENTS} clients): {a_summary}; \
         {} answered during the hold (all 503); RSS {rss_a_before} → {rss_a_after} KiB",
        a.during_hold
    );
    assert!(a.errors.is_empty(), "{} errors or unexpected answers, e.g. {:?}", a.error_count, a.errors);
    assert!(
        a_max_503 < RECOVERY_TIMEOUT / 2,
        "the slowest 503 took {a_max_503:?}, more than half of the held recoveries' {RECOVERY_TIMEOUT:?}: refusals waited behind held work"
    );
    assert!(a.during_hold_not_503.is_empty(), "answers during the hold that were not 503 overloaded: {:?}", a.during_hold_not_503);
    assert!(
        a.during_hold >= CLIENTS,
        "only {} answers during the hold for {CLIENTS} clients: the load did not reach control while it was overloaded",
        a.during_hold
    );

    // The held recoveries end at their deadline: no endpoint accepted the session, so the
    // outcome is `failed` (docs/recovery.md, step 6): 404 JSON-RPC -32001 for the client, no
    // pin, the record deleted.
    for (id, task) in held_ids.iter().zip(held) {
        let (status, body, took) = task.await.expect("held recovery task");
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["outcome"], "failed", "{id}: {body}");
        assert!(body["pin"].is_null(), "{id}: {body}");
        assert_eq!(body["response"]["status"], 404, "{id}: {body}");
        let answer: Value = serde_json::from_str(body["response"]["body"].as_str().unwrap_or_default()).unwrap_or_default();
        assert_eq!(answer["error"]["code"], -32001, "{id}: {body}");
        assert!(took >= RECOVERY_TIMEOUT, "{id} ended after {took:?}, before the recovery deadline: the hold was not what it seemed");
        assert_eq!(get(&http, &control, id).await.0, 404, "{id}: a failed recovery deletes the record");
    }
    // Every permit is back (a permit is released before its answer is sent): served at once.
    let (status, record) = get(&http, &control, HOT).await;
    assert_eq!(status, 200, "after the hold: {record}");
    assert_eq!(record["upstream"], dead.to_string());

    // ---- Phase B: memory under 200k refusals; permits held by stalled uploads ----
    let stalled: Vec<TcpStream> = (0..MAX_IN_FLIGHT)
        .map(|i| {
            let mut s = TcpStream::connect(control.addr).expect("connect stalled upload");
            write!(
                s,
                "PUT /v1/sessions/overload-stall-{i} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{{",
                control.addr
            )
            .expect("send stalled upload headers");
            s
        })
        .collect();
    // The uploads never finish, so once a probe is refused every permit stays held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(&http, &control, HOT).await;
        if status == 503 {
            assert_eq!(body["code"], "overloaded", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "the stalled uploads never held every permit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let far = Instant::now() + Duration::from_secs(3600);
    let mut warm = offer_load(&control, dead, Until::Requests(WARMUP_REQUESTS), far).await;
    assert!(warm.errors.is_empty() && warm.ok == 0, "warm-up: {}; {:?}", warm.summary(), warm.errors);
    let rss_before = control.rss_kib();
    let started = Instant::now();
    let mut b = offer_load(&control, dead, Until::Requests(RSS_REQUESTS), far).await;
    let took = started.elapsed();
    let rss_after = control.rss_kib();
    let growth = rss_after.saturating_sub(rss_before);
    println!(
        "phase B (hold by {MAX_IN_FLIGHT} stalled uploads; {CLIENTS} clients, {WARMUP_REQUESTS} warm-up requests): {} in {took:?}; \
         RSS {rss_before} → {rss_after} KiB (+{growth} KiB, limit {RSS_GROWTH_LIMIT_KIB} KiB)",
        b.summary()
    );
    assert!(b.errors.is_empty(), "{} errors or unexpected answers, e.g. {:?}", b.error_count, b.errors);
    assert_eq!((b.requests, b.overloaded), (RSS_REQUESTS, RSS_REQUESTS), "every request refused while the permits are held");
    assert!(growth < RSS_GROWTH_LIMIT_KIB, "RSS grew by {growth} KiB over {RSS_REQUESTS} refused requests");

    // Closing the uploads ends them (a body cut short) and frees their permits.
    for s in &stalled {
        let _ = s.shutdown(Shutdown::Both);
    }
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let (status, body) = get(&http, &control, HOT).await;
        if status == 200 {
            break body;
        }
        assert_eq!((status, body["code"].as_str()), (503, Some("overloaded")), "{body}");
        assert!(Instant::now() < deadline, "control never served again after the stalled uploads closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(record["session_id"], HOT);
    let rss_end = control.rss_kib();

    let (_, _, b_max) = b.latency_503();
    println!(
        "control_overload: {} requests ({} × 200, {} × 503 overloaded, 0 errors); max 503 latency {a_max_503:?} (hold A, recovery timeout \
         {RECOVERY_TIMEOUT:?}) / {b_max:?} (hold B); RSS start {rss_start} KiB, before {rss_before} KiB, after {RSS_REQUESTS} refusals \
         {rss_after} KiB (+{growth} KiB), end {rss_end} KiB",
        a.requests + warm.requests + b.requests,
        a.ok + warm.ok + b.ok,
        a.overloaded + warm.overloaded + b.overloaded,
    );
}
