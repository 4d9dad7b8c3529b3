//! The filter loaded over HTTP (`vm_config.code.remote`, [`Render::remote_wasm`]) by real
//! Envoy (`ENVOY`, else the one `make setup-envoy` installs): a local HTTP server on a free
//! loopback port serves the module; with the module's sha256 the filter pins sessions, with
//! another sha256 Envoy refuses the module and the filter fails closed (every request 503,
//! none reaches a pod) — never a listener silently running without the filter.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use mcp_affinity_harness::envoy::{self, RemoteWasm, WASM_SOURCE_CLUSTER};
use mcp_affinity_harness::fixtures::mesh::{Proxy, ProxyOptions, initializations, pods};
use mcp_affinity_harness::mcp_client;
use mcp_affinity_harness::process::{filter_wasm, free_addr, workspace_bin};

const PATH: &str = "/wasm/mcp_affinity_filter.wasm";

/// An HTTP server on `127.0.0.1` serving `module` at [`PATH`], counting the fetches.
struct ModuleServer {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ModuleServer {
    async fn start(module: Vec<u8>) -> ModuleServer {
        let fetches = Arc::new(AtomicUsize::new(0));
        let module = Arc::new(module);
        let app = Router::new()
            .route(
                PATH,
                get(|State((module, fetches)): State<(Arc<Vec<u8>>, Arc<AtomicUsize>)>| async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    ([("content-type", "application/wasm")], module.as_ref().clone())
                }),
            )
            .with_state((module, fetches.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ModuleServer { addr, fetches, task }
    }

    fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for ModuleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The module's sha256 as the README computes it: `sha256sum FILE`.
fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hex = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(hex.len(), 64, "{hex}");
    hex
}

/// Start Envoy in a blocking thread (the fixture waits for readiness synchronously) while
/// this runtime keeps serving the module.
async fn start_proxy(upstreams: Vec<SocketAddr>, remote: RemoteWasm) -> anyhow::Result<Proxy> {
    tokio::task::spawn_blocking(move || Proxy::start(&upstreams, ProxyOptions { remote_wasm: Some(remote), ..Default::default() })).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_loads_the_filter_from_a_url_with_its_sha256() {
    let wasm = filter_wasm();
    let server = ModuleServer::start(std::fs::read(&wasm).unwrap()).await;
    let pods = pods(2).unwrap();
    let proxy = start_proxy(pods.iter().map(|p| p.addr).collect(), RemoteWasm { url: server.url(), sha256: sha256sum(&wasm) }).await.unwrap();
    assert!(server.fetches() >= 1, "Envoy never fetched the module");
    let log = proxy.log();
    assert!(!log.contains("failed to load"), "{log}");
    assert!(proxy.stat(&format!("cluster.{WASM_SOURCE_CLUSTER}.upstream_rq_200")).await.unwrap() >= 1);

    // The filter runs: a session is pinned, and its calls stay on its pod.
    let session = mcp_client::connect(&proxy.url()).await.unwrap();
    let first = session.whoami().await.unwrap();
    for _ in 0..4 {
        assert_eq!(session.whoami().await.unwrap(), first, "the session moved: the filter does not pin");
    }
    assert_eq!(proxy.metric("sessions_pinned").await.unwrap(), 1);
    assert!(proxy.metric_reaching("requests_pinned", 5).await.unwrap() >= 5);
    assert_eq!(initializations(&pods).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_is_refused_and_the_filter_fails_closed() {
    let wasm = filter_wasm();
    let server = ModuleServer::start(std::fs::read(&wasm).unwrap()).await;
    let pods = pods(1).unwrap();
    let right = sha256sum(&wasm);
    let wrong: String = right.chars().rev().collect();
    assert_ne!(wrong, right);
    // Envoy fetches the module, finds another digest, retries (`retry_policy.num_retries:
    // 3`), gives up, and starts anyway: the listener exists, but the filter
    // (`failure_policy: FAIL_RELOAD`, closed when the module never loaded) answers 503.
    let proxy = start_proxy(vec![pods[0].addr], RemoteWasm { url: server.url(), sha256: wrong }).await.unwrap();
    assert_eq!(server.fetches(), 4, "one fetch and three retries");
    let log = proxy.log();
    for line in ["Retry limit exceeded for fetching data from remote data source", "Plugin mcp_affinity failed to load", "Plugin configured to fail closed failed to load"] {
        assert!(log.contains(line), "{line:?} not in Envoy's log:\n{log}");
    }
    for _ in 0..3 {
        let r = mcp_client::post_raw(&proxy.url(), &[("content-type", "application/json"), ("accept", "application/json, text/event-stream")], mcp_client::initialize_body(1, "2025-06-18").to_string()).await.unwrap();
        assert_eq!(r.status.as_u16(), 503, "{}", r.text());
        assert!(r.header("x-envoy-upstream-service-time").is_none(), "a pod answered: {}", r.text());
    }
    assert_eq!(initializations(&pods).await, 0, "a request passed without the filter");
    assert_eq!(proxy.metric("initialize_seen").await.unwrap(), 0);
}

/// `mcp-affinity-envoy-config --wasm-url URL --wasm-sha256 HEX` renders the remote block
/// (for both shipped bootstraps) and Envoy accepts it; one flag without the other is an error.
#[test]
fn the_config_binary_renders_the_remote_module() {
    let sha = "0123456789abcdef".repeat(4);
    let url = format!("http://{}/x.wasm", free_addr());
    let run = |extra: &[&str]| {
        Command::new(workspace_bin("mcp-affinity-envoy-config"))
            .args(["--listen", &free_addr().to_string(), "--admin", &free_addr().to_string(), "--upstream", &free_addr().to_string()])
            .args(extra)
            .output()
            .unwrap()
    };
    let dir = std::env::temp_dir().join(format!("mcp-affinity-remote-wasm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let filter_config = dir.join("filter.json");
    std::fs::write(&filter_config, "{}").unwrap();
    for bootstrap in [envoy::shipped_bootstrap(), envoy::stateful_session_bootstrap()] {
        let mut args = vec!["--wasm-url", &url, "--wasm-sha256", &sha, "--filter-config", filter_config.to_str().unwrap(), "--bootstrap", bootstrap.to_str().unwrap()];
        let replay = free_addr().to_string();
        if bootstrap == envoy::stateful_session_bootstrap() {
            args.extend(["--replay", &replay]);
        }
        let out = run(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let yaml = String::from_utf8(out.stdout).unwrap();
        assert!(yaml.contains(&url) && yaml.contains(&sha) && yaml.contains(WASM_SOURCE_CLUSTER), "{yaml}");
        assert!(!yaml.contains("filename: /etc/envoy/mcp_affinity_filter.wasm"), "{yaml}");
        let path = dir.join("remote.yaml");
        std::fs::write(&path, yaml).unwrap();
        // `--mode validate` checks the shape (it does not fetch the module).
        envoy::validate(&envoy::envoy_binary().unwrap(), &path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", bootstrap.display()));
    }
    assert!(!run(&["--wasm-url", &url]).status.success());
    assert!(!run(&["--wasm-sha256", &sha]).status.success());
    assert!(!run(&["--wasm-url", &url, "--wasm-sha256", &sha, "--wasm", "/x.wasm"]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
