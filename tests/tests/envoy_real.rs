//! The real-Envoy suite: the scenarios of the dev-proxy end-to-end tests (pinning, a
//! proxy restart with control, recovery of a dead pod) through a real Envoy running the
//! filter's wasm module with the repository's `envoy/envoy.yaml`.
//!
//! Built only with the `real-envoy` feature (it pulls in `testcontainers`):
//!
//! ```sh
//! make test-envoy
//! # = cargo test -p mcp-affinity-harness --features real-envoy --test envoy_real -- --nocapture
//! ```
//!
//! - Envoy runs in a container (`ENVOY_IMAGE`, default [`DEFAULT_ENVOY_IMAGE`]) with host
//!   networking, so it reaches the loopback services the test starts as processes: the
//!   control service and demo MCP pods. The bootstrap is `envoy/envoy.yaml` with only its
//!   addresses rewritten to the test's free loopback ports (listener, admin, the pods of
//!   `mcp_service`, control); the module is mounted where the bootstrap loads it from.
//! - Where no Docker engine answers, every Docker test prints one `SKIPPED` line saying
//!   why and passes: the engine is probed with `docker info` (short timeout) before
//!   testcontainers is touched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::fixtures::mesh::{Pod, pods};
use mcp_affinity_harness::mcp_client::{self, Session};
use mcp_affinity_harness::process::{filter_wasm, free_addr, workspace_bin};
use serde_json::{Value, json};
use testcontainers::core::{AccessMode, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The Envoy image when `ENVOY_IMAGE` is not set: the newest Envoy release line.
const DEFAULT_ENVOY_IMAGE: &str = "envoyproxy/envoy:v1.39-latest";

/// How long `docker info` may take before the engine counts as not answering.
const DOCKER_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// `true` when the test can run; otherwise prints the one skip line and returns `false`.
fn docker_or_skip(test: &str) -> bool {
    match docker_engine() {
        Ok(_) => true,
        Err(why) => {
            println!(
                "envoy_real::{test}: SKIPPED — no Docker engine answers ({why}); run on a machine with Docker to test against real Envoy"
            );
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bootstrap variant
// ---------------------------------------------------------------------------------------

/// Where the test's services listen.
#[derive(Clone, Debug)]
struct Ports {
    listener: SocketAddr,
    admin: SocketAddr,
    pods: Vec<SocketAddr>,
    control: SocketAddr,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({ "address": addr.ip().to_string(), "port_value": addr.port() })
}

fn lb_endpoints(addrs: &[SocketAddr]) -> Value {
    let endpoints: Vec<Value> =
        addrs.iter().map(|a| json!({ "endpoint": { "address": { "socket_address": socket_address(*a) } } })).collect();
    json!([{ "lb_endpoints": endpoints }])
}

/// `envoy/envoy.yaml` with the test's addresses: the listener and admin on the given
/// loopback ports, `mcp_service` over `pods`, `mcp_affinity_control` at `control`.
/// Everything else (the filter and its configuration, routes, timeouts) is unchanged.
/// Returns the bootstrap (as a JSON value, which is also YAML) and the path the
/// bootstrap loads the wasm module from.
fn bootstrap_variant(yaml: &str, ports: &Ports) -> Result<(Value, String)> {
    let mut b: Value = serde_norway::from_str(yaml).context("parse envoy/envoy.yaml")?;
    *b.pointer_mut("/admin/address/socket_address").ok_or_else(|| anyhow!("no admin address"))? =
        socket_address(ports.admin);
    let listeners = b.pointer_mut("/static_resources/listeners").and_then(Value::as_array_mut).ok_or_else(|| anyhow!("no listeners"))?;
    if listeners.len() != 1 {
        bail!("expected one listener, found {}", listeners.len());
    }
    *listeners[0].pointer_mut("/address/socket_address").ok_or_else(|| anyhow!("no listener address"))? =
        socket_address(ports.listener);
    let clusters = b.pointer_mut("/static_resources/clusters").and_then(Value::as_array_mut).ok_or_else(|| anyhow!("no clusters"))?;
    let mut rewritten = 0;
    for c in clusters.iter_mut() {
        let targets = match c["name"].as_str() {
            Some("mcp_service") => ports.pods.clone(),
            Some("mcp_affinity_control") => vec![ports.control],
            _ => continue,
        };
        let name = c["name"].clone();
        *c.pointer_mut("/load_assignment/endpoints").ok_or_else(|| anyhow!("cluster {name} has no endpoints"))? =
            lb_endpoints(&targets);
        rewritten += 1;
    }
    if rewritten != 2 {
        bail!("expected clusters mcp_service and mcp_affinity_control, rewrote {rewritten}");
    }
    let wasm = find_key(&b, "filename").ok_or_else(|| anyhow!("no vm_config.code.local.filename"))?.to_string();
    Ok((b, wasm))
}

/// The first string value of `key` anywhere in `v` (depth first).
fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    match v {
        Value::Object(m) => m.get(key).and_then(Value::as_str).or_else(|| m.values().find_map(|x| find_key(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// Every `socket_address` in `v`, as `ip:port`.
fn socket_addresses(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(sa) = m.get("socket_address") {
                out.push(format!("{}:{}", sa["address"].as_str().unwrap_or("?"), sa["port_value"]));
            }
            m.values().for_each(|x| socket_addresses(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| socket_addresses(x, out)),
        _ => {}
    }
}

/// Runs everywhere (no Docker needed): the variant moves every address to the test's
/// loopback ports and changes nothing else.
#[test]
fn bootstrap_variant_only_moves_addresses() {
    let yaml = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).unwrap();
    let original: Value = serde_norway::from_str(&yaml).unwrap();
    let ports = Ports {
        listener: "127.0.0.1:20000".parse().unwrap(),
        admin: "127.0.0.1:20001".parse().unwrap(),
        pods: vec!["127.0.0.1:20002".parse().unwrap(), "127.0.0.1:20003".parse().unwrap(), "127.0.0.1:20004".parse().unwrap()],
        control: "127.0.0.1:20005".parse().unwrap(),
    };
    let (variant, wasm) = bootstrap_variant(&yaml, &ports).unwrap();
    assert_eq!(wasm, "/etc/envoy/mcp_affinity_filter.wasm");

    let mut addrs = Vec::new();
    socket_addresses(&variant, &mut addrs);
    addrs.sort();
    let expected: Vec<String> = (20000..=20005).map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(addrs, expected, "every address is one of the test's, on loopback");

    // Put the original addresses back: the rest is the repository's bootstrap, unchanged.
    let back = Ports {
        listener: "0.0.0.0:10000".parse().unwrap(),
        admin: "127.0.0.1:15000".parse().unwrap(),
        pods: vec!["127.0.0.1:8081".parse().unwrap(), "127.0.0.1:8082".parse().unwrap()],
        control: "127.0.0.1:9901".parse().unwrap(),
    };
    let text = serde_norway::to_string(&variant).unwrap();
    let (restored, _) = bootstrap_variant(&text, &back).unwrap();
    assert_eq!(restored, original);
}

// ---------------------------------------------------------------------------------------
// Envoy in a container
// ---------------------------------------------------------------------------------------

/// `ENVOY_IMAGE` (or the default) as (name, tag).
fn envoy_image() -> (String, String) {
    let image = std::env::var("ENVOY_IMAGE").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_ENVOY_IMAGE.into());
    let image = image.trim();
    // A ':' after the last '/' separates the tag (a registry may have a port).
    match image.rfind(':').filter(|&i| image.rfind('/').is_none_or(|s| i > s)) {
        Some(i) => (image[..i].to_string(), image[i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// A real Envoy with the filter, in a container on the host network, removed when dropped.
struct Envoy {
    container: ContainerAsync<GenericImage>,
    ports: Ports,
    dir: PathBuf,
}

impl Envoy {
    async fn start(pods: &[Pod], control: &ControlService) -> Result<Envoy> {
        let ports = Ports { listener: free_addr(), admin: free_addr(), pods: pods.iter().map(|p| p.addr).collect(), control: control.addr };
        let yaml = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml"))?;
        let (bootstrap, wasm_path) = bootstrap_variant(&yaml, &ports)?;
        let dir = std::env::temp_dir().join(format!("mcp-affinity-envoy-{}-{}", std::process::id(), ports.listener.port()));
        std::fs::create_dir_all(&dir)?;
        let bootstrap_file = dir.join("envoy.yaml");
        std::fs::write(&bootstrap_file, serde_norway::to_string(&bootstrap)?)?;
        let wasm = std::fs::canonicalize(filter_wasm())?;

        let (name, tag) = envoy_image();
        println!("envoy_real: starting {name}:{tag}, listener {}, admin {}", ports.listener, ports.admin);
        let container = GenericImage::new(name, tag)
            .with_network("host")
            .with_mount(bind_ro(&bootstrap_file, "/etc/envoy/envoy.yaml"))
            .with_mount(bind_ro(&wasm, &wasm_path))
            .with_env_var("MCP_AFFINITY_CONTROL_TOKEN", TEST_TOKEN)
            // The image's entrypoint runs `envoy` with arguments that start with '-'.
            .with_cmd(["-c", "/etc/envoy/envoy.yaml", "--concurrency", "2", "--disable-hot-restart", "--log-level", "info"])
            .with_startup_timeout(Duration::from_secs(300))
            .start()
            .await
            .context("start the Envoy container")?;
        let envoy = Envoy { container, ports, dir };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    fn url(&self) -> String {
        format!("http://{}/mcp", self.ports.listener)
    }

    /// Waits until the admin endpoint says LIVE and the listener accepts connections.
    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = format!("http://{}/ready", self.ports.admin);
        loop {
            let live = match reqwest::get(&ready).await {
                Ok(r) => r.status().is_success() && r.text().await.unwrap_or_default().contains("LIVE"),
                Err(_) => false,
            };
            if live && tokio::net::TcpStream::connect(self.ports.listener).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline || !self.container.is_running().await.unwrap_or(false) {
                let logs = self.container.stderr_to_vec().await.unwrap_or_default();
                bail!("Envoy did not become ready:\n{}", String::from_utf8_lossy(&logs));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the container (Envoy exits: its shared data, the pins, is gone) and starts
    /// it again with the same bootstrap.
    async fn restart(&self) -> Result<()> {
        self.container.stop_with_timeout(Some(5)).await?;
        self.container.start().await?;
        self.wait_ready().await
    }

    /// A counter from the admin `/stats` (`wasmcustom.mcp_affinity.<name>` for the
    /// filter's); 0 when absent.
    async fn stat(&self, name: &str) -> Result<i64> {
        let text = reqwest::get(format!("http://{}/stats?filter={name}", self.ports.admin)).await?.text().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0))
    }

    async fn filter_stat(&self, name: &str) -> Result<i64> {
        self.stat(&format!("wasmcustom.mcp_affinity.{name}")).await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // The container itself is removed by testcontainers when dropped.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bind_ro(host: &Path, container: &str) -> Mount {
    Mount::bind_mount(host.to_string_lossy().into_owned(), container).with_access_mode(AccessMode::ReadOnly)
}

/// `true` when this build of control serves `POST /v1/sessions/{id}/recover` (its
/// `--help` documents the route and the `--endpoints` it recovers onto).
fn control_can_recover() -> bool {
    Command::new(workspace_bin("mcp-affinity-control"))
        .arg("--help")
        .output()
        .map(|o| {
            let help = String::from_utf8_lossy(&o.stdout);
            help.contains("/recover") && help.contains("--endpoints")
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Several sessions, several calls each: every session stays on the pod that answered
/// its `initialize`; control holds a record per session; a client-sent `x-session-pod`
/// cannot move a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_through_real_envoy() {
    if !docker_or_skip("pinning_through_real_envoy") {
        return;
    }
    let pods = pods(3).unwrap();
    let control = ControlService::start("memory").unwrap();
    let envoy = Envoy::start(&pods, &control).await.unwrap();

    let mut sessions = Vec::new();
    for i in 0..6 {
        let s = mcp_client::connect(&envoy.url()).await.unwrap_or_else(|e| panic!("initialize {i}: {e:#}"));
        let origin = s.whoami().await.unwrap_or_else(|e| panic!("session {i}: {e}"));
        sessions.push((s, origin));
    }
    for round in 0..5 {
        for (i, (s, origin)) in sessions.iter().enumerate() {
            assert_eq!(&s.whoami().await.unwrap(), origin, "session {i}, round {round}: whoami moved");
        }
    }
    for (s, _) in &sessions {
        let (status, record) = control.get_session(&s.session_id).await.unwrap();
        assert_eq!(status, 200, "control has no record of {}: {record}", s.session_id);
    }

    // A forged pin header names another pod: removed, the session stays where it is.
    let (s, origin) = &sessions[0];
    let other = pods.iter().find(|p| &p.name != origin).unwrap();
    let body = json!({"jsonrpc":"2.0","id":9000,"method":"tools/call","params":{"name":"whoami","arguments":{}}});
    let r = s.post_raw(&[("x-session-pod", &other.addr.to_string())], body.to_string()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.messages().into_iter().find(|m| m["id"] == 9000).unwrap_or_else(|| panic!("no answer: {}", r.text()));
    assert_eq!(answer["result"]["content"][0]["text"].as_str(), Some(origin.as_str()), "{answer}");

    // Unknown sessions get 404 (the client's signal to re-initialize).
    let err = Session::with_id(&envoy.url(), "never-issued-anywhere").whoami().await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");

    assert_eq!(envoy.filter_stat("initialize_seen").await.unwrap(), 6);
    assert_eq!(envoy.filter_stat("sessions_pinned").await.unwrap(), 6);
    assert!(envoy.filter_stat("requests_pinned").await.unwrap() >= 6 * 6);
    assert!(envoy.stat("cluster.mcp_affinity_control.upstream_rq_2xx").await.unwrap() >= 6, "the filter wrote through to control");
}

/// The container restarts (Envoy's shared data is gone): the session continues on its
/// pod, learned back from control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restart_keeps_sessions_through_control() {
    if !docker_or_skip("envoy_restart_keeps_sessions_through_control") {
        return;
    }
    let pods = pods(3).unwrap();
    let control = ControlService::start("memory").unwrap();
    let envoy = Envoy::start(&pods, &control).await.unwrap();
    let sessions: Vec<Session> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(mcp_client::connect(&envoy.url()).await.unwrap());
        }
        v
    };
    let mut origins = Vec::new();
    for s in &sessions {
        origins.push(s.whoami().await.unwrap());
    }

    envoy.restart().await.unwrap();
    assert_eq!(envoy.filter_stat("sessions_pinned").await.unwrap(), 0, "a new Envoy process");
    for (s, origin) in sessions.iter().zip(&origins) {
        for i in 0..5 {
            assert_eq!(&s.whoami().await.unwrap(), origin, "request {i} after the restart");
        }
    }
    assert!(envoy.filter_stat("control_hits").await.unwrap() >= 3, "the pins came back from control");
    assert_eq!(envoy.filter_stat("unknown_session").await.unwrap(), 0);
}

/// The pinned pod dies: the next call succeeds on a live pod, same session id, and the
/// session stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pod_is_recovered_through_real_envoy() {
    if !docker_or_skip("dead_pod_is_recovered_through_real_envoy") {
        return;
    }
    if !control_can_recover() {
        println!(
            "envoy_real::dead_pod_is_recovered_through_real_envoy: SKIPPED — this control has no POST /v1/sessions/{{id}}/recover"
        );
        return;
    }
    let mut pods = pods(3).unwrap();
    let endpoints = pods.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",");
    let control = ControlService::start_with("memory", &["--endpoints".into(), endpoints]).unwrap();
    let envoy = Envoy::start(&pods, &control).await.unwrap();
    let s = mcp_client::connect(&envoy.url()).await.unwrap();
    let origin = s.whoami().await.unwrap();

    pods.iter_mut().find(|p| p.name == origin).unwrap().kill();
    let moved = s.whoami_keeping_id().await;
    assert_ne!(moved, origin);
    for i in 0..3 {
        assert_eq!(s.whoami().await.unwrap(), moved, "request {i} after the recovery");
    }
}
