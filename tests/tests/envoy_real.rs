//! The real-Envoy suite in a container: the end-to-end scenarios (pinning, an Envoy
//! restart with control on memory and on Redis, recovery of a killed pod) through an
//! Envoy image running the filter's wasm module with the shipped `envoy/envoy.yaml`; and
//! the killed pod again on the shipped `envoy/envoy-stateful-session.yaml`, recovered
//! through Envoy's retry to control's replay listener.
//!
//! Built only with the `real-envoy` feature (it pulls in `testcontainers`):
//!
//! ```sh
//! make test-envoy
//! # = REQUIRE_DOCKER=1 ENVOY_IMAGE=… \
//! #   cargo test -p mcp-affinity-harness --features real-envoy --test envoy_real -- --nocapture
//! ```
//!
//! - Envoy runs in a container: `ENVOY_IMAGE`, default [`DEFAULT_ENVOY_IMAGE`] (the
//!   official image). `make test-envoy` sets `ENVOY_IMAGE` to the image `make envoy-image`
//!   builds from the same Envoy binary the other end-to-end tests run, for engines that
//!   cannot pull, unless `ENVOY_IMAGE` is set already.
//! - The bootstrap is rendered by the harness ([`envoy::render_shipped`], as for the Envoy
//!   processes of the other end-to-end tests): the shipped `envoy/envoy.yaml` with only its
//!   addresses moved to the test's free loopback ports (listener, admin, the pods of
//!   `mcp_service`, control) and the module path set to where the container sees it.
//!   The filter's configuration is the shipped one. The rendered bootstrap and the module
//!   are mounted read-only; the container uses the host network (`--network host`), so
//!   all traffic stays on 127.0.0.1 between processes the test started (control, demo MCP
//!   pods, redis-server) and Envoy. `MCP_AFFINITY_CONTROL_TOKEN` is passed in the
//!   container's environment (the filter reads it through `host_env_keys`).
//! - Readiness is observed: admin `/ready` answers a line `LIVE` and the listener accepts
//!   connections.
//! - Containers are removed when their test ends (testcontainers removes a container
//!   when its handle is dropped). When a test fails, the end of Envoy's log is printed.
//! - Where no Docker engine answers (probed with `docker info` before testcontainers is
//!   touched), every container test prints one `SKIPPED` line to stderr (past the test
//!   harness's output capture) and returns — unless `REQUIRE_DOCKER=1`, which
//!   `make test-envoy` sets: then the tests fail, so a skip never reads as a pass.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcp_affinity_harness::envoy::{self, Render};
use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::fixtures::mesh::{Pod, initializations, pods};
use mcp_affinity_harness::fixtures::redis::RedisServer;
use mcp_affinity_harness::mcp_client::{self, Session};
use mcp_affinity_harness::process::{filter_wasm, free_addr};
use serde_json::json;
use testcontainers::core::{AccessMode, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The Envoy image when `ENVOY_IMAGE` is not set: the official image of the release the
/// harness runs everywhere else ([`envoy::ENVOY_VERSION`]).
const DEFAULT_ENVOY_IMAGE: &str = "envoyproxy/envoy:v1.40.0";

/// Where the container sees the rendered bootstrap and the module.
const CONTAINER_BOOTSTRAP: &str = "/etc/envoy/envoy.yaml";
const CONTAINER_WASM: &str = "/etc/envoy/mcp_affinity_filter.wasm";

/// The variable the shipped filter configuration reads the control token from.
const TOKEN_ENV: &str = "MCP_AFFINITY_CONTROL_TOKEN";

/// How long `docker info` may take before the engine counts as not answering.
const DOCKER_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long Envoy may take to become ready after its container (re)starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Docker detection
// ---------------------------------------------------------------------------------------

/// `Ok(server version)` when a Docker engine answers, else why not (probed once).
fn docker_engine() -> &'static Result<String, String> {
    static ENGINE: OnceLock<Result<String, String>> = OnceLock::new();
    ENGINE.get_or_init(probe_docker)
}

fn probe_docker() -> Result<String, String> {
    let mut child = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    let deadline = Instant::now() + DOCKER_PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("docker info did not answer within {} s", DOCKER_PROBE_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("docker info: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("docker info: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Without an engine the CLI prints the client part and exits non-zero (or prints an
    // empty server version): either way there is nothing to run containers on.
    if out.status.success() && !stdout.is_empty() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no server version reported");
    Err(format!("docker info failed: {why}"))
}

/// `REQUIRE_DOCKER` is set to anything but empty, `0` or `false`.
fn docker_required() -> bool {
    std::env::var("REQUIRE_DOCKER").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// `true` when the test can run. Otherwise fails the test when `REQUIRE_DOCKER` is set,
/// else prints its one `SKIPPED` line and returns `false`.
fn docker_or_skip(test: &str) -> bool {
    let why = match docker_engine() {
        Ok(_) => return true,
        Err(why) => why,
    };
    assert!(
        !docker_required(),
        "envoy_real::{test}: no Docker engine answers ({why}) and REQUIRE_DOCKER is set: start a Docker engine, or unset REQUIRE_DOCKER to skip"
    );
    // Straight to stderr, not through eprintln!: the test harness captures the output of
    // passing tests, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "envoy_real::{test}: SKIPPED — no Docker engine answers ({why}); not tested against Envoy in a container (REQUIRE_DOCKER=1 turns this into a failure)"
    );
    false
}

// ---------------------------------------------------------------------------------------
// Envoy in a container
// ---------------------------------------------------------------------------------------

/// `ENVOY_IMAGE`, or [`DEFAULT_ENVOY_IMAGE`].
fn envoy_image() -> String {
    std::env::var("ENVOY_IMAGE").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_ENVOY_IMAGE.into())
}

/// An image reference as (name, tag); `latest` when it has no tag.
fn split_image(image: &str) -> (String, String) {
    // A ':' after the last '/' separates the tag (a registry may have a port).
    match image.rfind(':').filter(|&i| image.rfind('/').is_none_or(|s| i > s)) {
        Some(i) => (image[..i].to_string(), image[i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// The shipped bootstrap's changes for a container on the host network: listener and
/// admin on the given loopback addresses, `mcp_service` over `pods`,
/// `mcp_affinity_control` at `control`, the module at [`CONTAINER_WASM`], and the token
/// variable exposed to the VM (the shipped bootstrap already does). The filter's
/// configuration stays as shipped.
fn container_render(listen: SocketAddr, admin: SocketAddr, pods: &[SocketAddr], control: SocketAddr) -> Render {
    Render {
        wasm: Some(PathBuf::from(CONTAINER_WASM)),
        control: Some(control),
        host_env_keys: vec![TOKEN_ENV.into()],
        ..Render::new(listen, admin, pods)
    }
}

/// A directory for one Envoy's files, removed when dropped unless the test is failing.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("mcp-affinity-envoy-real-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn bind_ro(host: &Path, container: &str) -> Mount {
    Mount::bind_mount(host.to_string_lossy().into_owned(), container).with_access_mode(AccessMode::ReadOnly)
}

/// Envoy running the filter in a container on the host network; the container is removed
/// when this is dropped.
struct Envoy {
    container: ContainerAsync<GenericImage>,
    image: String,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: Scratch,
}

impl Envoy {
    /// Starts Envoy in front of `pods`, with the filter reaching `control`, and waits
    /// until it is ready.
    async fn start(pods: &[Pod], control: &ControlService) -> Result<Envoy> {
        Envoy::start_on(pods, control, None).await
    }

    /// [`Envoy::start`] on `envoy/envoy.yaml`, or, given control's replay listener, on
    /// `envoy/envoy-stateful-session.yaml` (recovery through Envoy's retry to it).
    async fn start_on(pods: &[Pod], control: &ControlService, replay: Option<SocketAddr>) -> Result<Envoy> {
        let (listen, admin) = (free_addr(), free_addr());
        let upstreams: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
        let render = Render { replay, ..container_render(listen, admin, &upstreams, control.addr) };
        let yaml = match replay {
            None => envoy::render_shipped(&render)?,
            Some(_) => envoy::render(&std::fs::read_to_string(envoy::stateful_session_bootstrap())?, &render)?,
        };
        let dir = Scratch::new()?;
        let bootstrap = dir.0.join("envoy.yaml");
        std::fs::write(&bootstrap, yaml).with_context(|| format!("write {}", bootstrap.display()))?;
        let wasm = std::fs::canonicalize(filter_wasm()).context("the filter's wasm module")?;

        let image = envoy_image();
        let (name, tag) = split_image(&image);
        let level = std::env::var("ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
        println!("envoy_real: starting {image}: listener {listen}, admin {admin}, control {}", control.addr);
        let container = GenericImage::new(name, tag)
            .with_network("host")
            .with_mount(bind_ro(&bootstrap, CONTAINER_BOOTSTRAP))
            .with_mount(bind_ro(&wasm, CONTAINER_WASM))
            .with_env_var(TOKEN_ENV, TEST_TOKEN)
            // Arguments only: the official image's entrypoint runs `envoy` with arguments
            // that start with '-'; the image of `make envoy-image` has envoy as its
            // entrypoint.
            .with_cmd(["-c", CONTAINER_BOOTSTRAP, "--concurrency", "2", "--disable-hot-restart", "-l", &level])
            .start()
            .await
            .with_context(|| {
                format!(
                    "start a container of {image} (an image this engine cannot pull can be built locally: `make envoy-image` builds mcp-affinity/envoy:{} from the Envoy of `make setup-envoy`; select it with ENVOY_IMAGE)",
                    envoy::ENVOY_VERSION
                )
            })?;
        let envoy = Envoy { container, image, listen, admin, _dir: dir };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    /// The MCP endpoint URL, `http://ADDR/mcp`.
    fn url(&self) -> String {
        format!("http://{}/mcp", self.listen)
    }

    /// Waits until admin `/ready` answers 200 with a line `LIVE` (the admin API answers
    /// chunked; reqwest decodes it) and the listener accepts connections. Fails as soon as
    /// the container is no longer running, with Envoy's log.
    async fn wait_ready(&self) -> Result<()> {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
        let ready = format!("http://{}/ready", self.admin);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let live = match http.get(&ready).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => r.text().await.is_ok_and(|b| b.lines().any(|l| l.trim() == "LIVE")),
                _ => false,
            };
            if live && tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                return Ok(());
            }
            if !self.container.is_running().await.unwrap_or(false) {
                bail!("the Envoy container ({}) exited before it was ready; {}", self.image, self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy ({}) was not ready (admin {} /ready, listener {}) within {} s; {}",
                    self.image,
                    self.admin,
                    self.listen,
                    READY_TIMEOUT.as_secs(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the container (SIGTERM; Envoy exits and its shared data, the pins, is gone),
    /// starts it again with the same bootstrap and waits until Envoy is ready.
    async fn restart(&self) -> Result<()> {
        self.container.stop_with_timeout(Some(5)).await.context("stop the Envoy container")?;
        self.container.start().await.context("start the Envoy container again")?;
        self.wait_ready().await
    }

    /// The filter's metric `wasmcustom.mcp_affinity.<name>` from the admin API
    /// (`/stats?filter=wasmcustom`, summed by Envoy over its worker VMs); 0 when absent.
    async fn metric(&self, name: &str) -> Result<i64> {
        envoy::filter_metric(self.admin, name).await
    }

    /// The last `n` lines of the container's log (`docker logs`: Envoy logs to stderr).
    fn log_tail(&self, n: usize) -> String {
        let id = self.container.id();
        match Command::new("docker").args(["logs", "--tail", &n.to_string(), id]).stdin(Stdio::null()).output() {
            Ok(out) => format!(
                "Envoy log (container {id}, last {n} lines):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("no Envoy log (docker logs {id}: {e})"),
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // The container is still there: testcontainers removes it when the field drops.
        if std::thread::panicking() {
            eprintln!("--- Envoy {} (listener {}, admin {}) ---\n{}", self.image, self.listen, self.admin, self.log_tail(80));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Control with the demo pods as its endpoints (what recovery re-initializes onto).
fn control_for(pods: &[Pod], store: &str) -> ControlService {
    control_with(pods, store, &[])
}

/// [`control_for`] with more flags.
fn control_with(pods: &[Pod], store: &str, extra: &[String]) -> ControlService {
    let endpoints = pods.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",");
    let flags: Vec<String> = ["--endpoints".to_string(), endpoints].into_iter().chain(extra.iter().cloned()).collect();
    ControlService::start_with(store, &flags).unwrap()
}

/// `n` sessions through `envoy`, each with the pod that answered its first `whoami`.
async fn sessions(envoy: &Envoy, n: usize) -> Vec<(Session, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let s = mcp_client::connect(&envoy.url()).await.unwrap_or_else(|e| panic!("initialize {i}: {e:#}"));
        let origin = s.whoami().await.unwrap_or_else(|e| panic!("session {i}: whoami: {e}"));
        out.push((s, origin));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Without Docker
// ---------------------------------------------------------------------------------------

/// Runs everywhere: the container's bootstrap is the shipped one with the test's
/// loopback addresses and the module where the container mounts it; the filter's
/// configuration is as shipped.
#[test]
fn container_bootstrap_is_the_shipped_one() {
    let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let pods = [a("127.0.0.1:20002"), a("127.0.0.1:20003")];
    let r = container_render(a("127.0.0.1:20000"), a("127.0.0.1:20001"), &pods, a("127.0.0.1:20004"));
    let rendered: serde_json::Value = serde_norway::from_str(&envoy::render_shipped(&r).unwrap()).unwrap();
    let shipped: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(envoy::shipped_bootstrap()).unwrap()).unwrap();

    let sa = |p: &str| rendered.pointer(p).unwrap_or_else(|| panic!("no {p}")).clone();
    assert_eq!(sa("/admin/address/socket_address"), json!({"address": "127.0.0.1", "port_value": 20001}));
    assert_eq!(sa("/static_resources/listeners/0/address/socket_address"), json!({"address": "127.0.0.1", "port_value": 20000}));
    // The filter's `Wasm` config, inside the response matcher it ships in.
    let filters = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters";
    let wasm_at = shipped.pointer(filters).and_then(|f| f.as_array()?.iter().position(|f| f["name"] == envoy::WASM_FILTER)).expect("the wasm filter");
    let wasm = format!("{filters}/{wasm_at}/typed_config/extension_config/typed_config/config");
    let (config, shipped_config) = (rendered.pointer(&wasm).unwrap(), shipped.pointer(&wasm).unwrap());
    assert_eq!(config["vm_config"]["code"]["local"]["filename"], CONTAINER_WASM);
    assert_eq!(config["configuration"], shipped_config["configuration"], "the filter configuration is the shipped one");
    assert_eq!(config["vm_config"]["environment_variables"]["host_env_keys"], json!([TOKEN_ENV]));
    assert_eq!(config["vm_config"]["runtime"], shipped_config["vm_config"]["runtime"]);
    let routes = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config";
    assert_eq!(rendered.pointer(routes), shipped.pointer(routes), "the routes are the shipped ones");

    let cluster = |name: &str| -> Vec<String> {
        let c = rendered["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let sa = &e["endpoint"]["address"]["socket_address"];
                format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"])
            })
            .collect()
    };
    assert_eq!(cluster(envoy::SERVICE_CLUSTER), ["127.0.0.1:20002", "127.0.0.1:20003"]);
    assert_eq!(cluster(envoy::CONTROL_CLUSTER), ["127.0.0.1:20004"]);
    assert_eq!(split_image("mcp-affinity/envoy:1.40.0"), ("mcp-affinity/envoy".into(), "1.40.0".into()));
    assert_eq!(split_image("registry:5000/envoy"), ("registry:5000/envoy".into(), "latest".into()));
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// 10 sessions × 5 `whoami` calls: every session stays on the pod that answered its
/// `initialize`; control holds a record per session; a client-sent `x-session-pod`
/// cannot move a session; the filter's counters show the pinned requests and no unknown
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_through_real_envoy() {
    if !docker_or_skip("pinning_through_real_envoy") {
        return;
    }
    let pods = pods(3).unwrap();
    let control = ControlService::start("memory").unwrap();
    let envoy = Envoy::start(&pods, &control).await.unwrap();

    let sessions = sessions(&envoy, 10).await; // 1 whoami each
    for round in 1..5 {
        for (i, (s, origin)) in sessions.iter().enumerate() {
            assert_eq!(&s.whoami().await.unwrap(), origin, "session {i}, call {round}: whoami moved");
        }
    }
    let used: std::collections::HashSet<&String> = sessions.iter().map(|(_, o)| o).collect();
    assert!(used.len() > 1, "round robin spreads 10 sessions over the pods: {used:?}");
    for (s, _) in &sessions {
        let (status, record) = control.get_session(&s.session_id).await.unwrap();
        assert_eq!(status, 200, "control has no record of {}: {record}", s.session_id);
    }
    assert_eq!(envoy.metric("initialize_seen").await.unwrap(), 10);
    assert_eq!(envoy.metric("sessions_pinned").await.unwrap(), 10);
    let pinned = envoy::filter_metric_reaching(envoy.admin, "requests_pinned", 10 * 5, Duration::from_secs(5)).await.unwrap();
    assert!(pinned >= 10 * 5, "requests_pinned = {pinned}, expected at least 50 (10 sessions × 5 calls)");
    assert_eq!(envoy.metric("unknown_session").await.unwrap(), 0);
    assert_eq!(initializations(&pods).await, 10, "the pods initialized each session once");

    // A forged pin header names another pod: removed, the session stays where it is.
    let (s, origin) = &sessions[0];
    let other = pods.iter().find(|p| &p.name != origin).unwrap();
    let body = json!({"jsonrpc":"2.0","id":9000,"method":"tools/call","params":{"name":"whoami","arguments":{}}});
    let r = s.post_raw(&[("x-session-pod", &other.addr.to_string())], body.to_string()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.messages().into_iter().find(|m| m["id"] == 9000).unwrap_or_else(|| panic!("no answer: {}", r.text()));
    assert_eq!(answer["result"]["content"][0]["text"].as_str(), Some(origin.as_str()), "{answer}");

    // The counter does count: a session nobody issued is answered 404.
    let err = Session::with_id(&envoy.url(), "never-issued-anywhere").whoami().await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
    assert_eq!(envoy.metric("unknown_session").await.unwrap(), 1);
}

/// The Envoy container restarts (its shared data, the pins, is gone): every session
/// continues on its pod, learned back from control with `store`; control re-initializes
/// nothing.
async fn envoy_restart_keeps_sessions(store: &str) {
    let pods = pods(3).unwrap();
    let control = control_for(&pods, store);
    let envoy = Envoy::start(&pods, &control).await.unwrap();
    let sessions = sessions(&envoy, 5).await;
    // The records' writes are asynchronous: restart only once control has them all.
    for (s, _) in &sessions {
        assert_eq!(control.get_session(&s.session_id).await.unwrap().0, 200, "no record of {}", s.session_id);
    }

    envoy.restart().await.unwrap();
    assert_eq!(envoy.metric("sessions_pinned").await.unwrap(), 0, "a new Envoy process");
    assert_eq!(envoy.metric("control_lookups").await.unwrap(), 0, "no traffic yet");
    for (i, (s, origin)) in sessions.iter().enumerate() {
        for call in 0..5 {
            assert_eq!(&s.whoami().await.unwrap(), origin, "session {i}, call {call} after the restart");
        }
    }
    let (lookups, hits) = (envoy.metric("control_lookups").await.unwrap(), envoy.metric("control_hits").await.unwrap());
    assert!(lookups >= sessions.len() as i64, "control_lookups = {lookups}: each session's pin must come back from control");
    assert_eq!(hits, lookups, "control knew every session");
    assert_eq!(envoy.metric("unknown_session").await.unwrap(), 0);
    assert_eq!(envoy.metric("recoveries_replayed").await.unwrap(), 0);
    assert_eq!(control.reinitializations().await, 0.0, "no session was re-initialized");
    assert_eq!(initializations(&pods).await, sessions.len() as u64, "the restart and the lookups re-initialized nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restart_keeps_sessions_through_control() {
    if !docker_or_skip("envoy_restart_keeps_sessions_through_control") {
        return;
    }
    envoy_restart_keeps_sessions("memory").await;
}

/// As [`envoy_restart_keeps_sessions_through_control`], with control on Redis (a real
/// `redis-server` on a free loopback port; `make setup-redis`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restart_keeps_sessions_through_control_on_redis() {
    if !docker_or_skip("envoy_restart_keeps_sessions_through_control_on_redis") {
        return;
    }
    let redis = RedisServer::start().unwrap();
    envoy_restart_keeps_sessions(&redis.url()).await;
}

/// A pod is killed: each of its sessions is recovered onto a live pod on its next call —
/// answered 200, same session id — and stays there; the other sessions do not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pod_is_recovered_through_real_envoy() {
    if !docker_or_skip("killed_pod_is_recovered_through_real_envoy") {
        return;
    }
    killed_pod_is_recovered(false).await;
}

/// The same on `envoy/envoy-stateful-session.yaml`: Envoy's own retry carries each failed
/// request to control's replay listener (`recovery.replay_by: envoy_retry`), and the filter
/// learns each new pin from control's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pod_is_recovered_by_envoy_s_retry_in_a_container() {
    if !docker_or_skip("killed_pod_is_recovered_by_envoy_s_retry_in_a_container") {
        return;
    }
    killed_pod_is_recovered(true).await;
}

/// A pod of 3 holding some of 6 sessions is killed; with `envoy_retry`, on the
/// stateful-session bootstrap.
async fn killed_pod_is_recovered(envoy_retry: bool) {
    let mut pods = pods(3).unwrap();
    let replay = envoy_retry.then(free_addr);
    let control = match replay {
        Some(r) => control_with(&pods, "memory", &["--replay-listen".into(), r.to_string()]),
        None => control_for(&pods, "memory"),
    };
    let envoy = Envoy::start_on(&pods, &control, replay).await.unwrap();
    let sessions = sessions(&envoy, 6).await;
    let victim = sessions[0].1.clone();
    let (victims, others): (Vec<_>, Vec<_>) = sessions.iter().partition(|(_, origin)| *origin == victim);

    pods.iter_mut().find(|p| p.name == victim).unwrap().kill();
    pods.retain(|p| p.name != victim);
    let before = initializations(&pods).await;
    for (s, _) in &victims {
        let moved = s.whoami_keeping_id().await;
        assert_ne!(moved, victim, "session {} still answered by the killed pod", s.session_id);
        assert_eq!(s.whoami_keeping_id().await, moved, "session {} stays on its new pod", s.session_id);
        assert_eq!(s.echo("still here").await.unwrap(), "still here");
    }
    for (s, origin) in &others {
        assert_eq!(&s.whoami().await.unwrap(), origin, "session {} was not on the killed pod", s.session_id);
    }
    let replayed = envoy.metric(if envoy_retry { "recovered_pins" } else { "recoveries_replayed" }).await.unwrap();
    assert!(replayed >= 1, "recoveries_replayed = {replayed}");
    assert_eq!(replayed, victims.len() as i64, "one recovery per session of the killed pod");
    assert_eq!(control.reinitializations().await, victims.len() as f64, "one re-initialization per session of the killed pod");
    assert_eq!(initializations(&pods).await - before, victims.len() as u64, "the live pods initialized each moved session once");
    assert_eq!(envoy.metric("unknown_session").await.unwrap(), 0);
}
