//! The shipped bootstrap rendered for a local Envoy (`src/envoy.rs`, the
//! `mcp-affinity-envoy-config` binary of `make run`) and the Envoy fixture, against the
//! real Envoy binary: `ENVOY`, else the one `make setup-envoy` installs (these tests fail,
//! saying so, when neither exists).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use mcp_affinity_harness::envoy::{self, Render};
use mcp_affinity_harness::fixtures::mesh::{Proxy, ProxyOptions, pods};
use mcp_affinity_harness::process::{filter_wasm, free_addr, workspace_bin};

const TOKEN_ENV: &str = "MCP_AFFINITY_CONTROL_TOKEN";

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcp-affinity-envoy-local-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn token() -> Vec<(String, String)> {
    vec![(TOKEN_ENV.into(), "t0ken".into())]
}

fn local(upstreams: &[SocketAddr]) -> Render {
    Render { wasm: Some(filter_wasm()), ..Render::new(free_addr(), free_addr(), upstreams) }
}

/// Renders `r` into `dir/name` and runs `envoy --mode validate` on it.
fn validate(dir: &std::path::Path, name: &str, r: &Render, env: &[(String, String)]) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, envoy::render_shipped(r)?)?;
    envoy::validate(&envoy::envoy_binary()?, &path, env)
}

#[test]
fn rendered_bootstraps_pass_envoy_validate() {
    let dir = scratch("validate");
    let up = [free_addr(), free_addr()];
    // As shipped (control configured, token from Envoy's environment), with the local module.
    validate(&dir, "shipped.yaml", &Render { control: Some(free_addr()), ..local(&up) }, &token()).unwrap();
    // All defaults, no control: no token needed.
    validate(&dir, "defaults.yaml", &Render { filter_config: Some("{}".into()), ..local(&up) }, &[]).unwrap();
    // Without the filter.
    validate(&dir, "no-filter.yaml", &Render { no_filter: true, ..local(&up) }, &[]).unwrap();
    // Envoy really loads the module: the filter rejects what it must reject.
    let err = validate(&dir, "no-token.yaml", &local(&up), &[]).unwrap_err().to_string();
    assert!(err.contains(TOKEN_ENV), "{err}");
    let bad = Render { filter_config: Some(r#"{"pin_encodin":"plain"}"#.into()), ..local(&up) };
    assert!(validate(&dir, "bad.yaml", &bad, &[]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every shipped bootstrap, byte for byte except where the module and the replay
/// listener's TLS files live, passes `envoy --mode validate` (which loads the module and
/// runs its `on_configure`, and reads the certificates).
#[test]
fn shipped_bootstraps_pass_envoy_validate() {
    let dir = scratch("shipped");
    let wasm = mcp_affinity_harness::process::filter_wasm();
    let replay = mcp_affinity_harness::fixtures::replay_listener::ReplayListener::new().unwrap();
    let tls_dir = format!("{}/", replay.tls_dir.display());
    for name in ["envoy.yaml", "envoy-stateful-session.yaml"] {
        let shipped = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy").join(name)).unwrap();
        assert!(shipped.contains("/etc/envoy/mcp_affinity_filter.wasm"), "{name}: module path moved");
        let path = dir.join(name);
        let local = shipped.replace("/etc/envoy/mcp_affinity_filter.wasm", &wasm.to_string_lossy()).replace(envoy::REPLAY_TLS_DIR, &tls_dir);
        std::fs::write(&path, local).unwrap();
        envoy::validate(&envoy::envoy_binary().unwrap(), &path, &token()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_config_binary_prints_a_bootstrap_envoy_accepts() {
    let dir = scratch("binary");
    let (listen, admin, control) = (free_addr(), free_addr(), free_addr());
    let (u1, u2) = (free_addr(), free_addr());
    let config = dir.join("filter.json");
    std::fs::write(&config, format!(r#"{{"control":{{"cluster":"mcp_affinity_control","token_env":"{TOKEN_ENV}"}}}}"#)).unwrap();
    let run = |extra: &[&str]| -> String {
        let out = Command::new(workspace_bin("mcp-affinity-envoy-config"))
            .args(["--listen", &listen.to_string(), "--admin", &admin.to_string()])
            .args(["--upstream", &u1.to_string(), "--upstream", &u2.to_string()])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let wasm = filter_wasm();
    let yaml = run(&["--wasm", wasm.to_str().unwrap(), "--control", &control.to_string(), "--filter-config", config.to_str().unwrap()]);
    for needle in [listen.port().to_string(), admin.port().to_string(), control.port().to_string(), u1.port().to_string(), u2.port().to_string()] {
        assert!(yaml.contains(&format!("port_value: {needle}")), "port {needle} missing:\n{yaml}");
    }
    assert!(yaml.contains(envoy::WASM_FILTER) && yaml.contains(wasm.to_str().unwrap()), "{yaml}");
    assert!(yaml.contains(r#"\"token_env\":\"MCP_AFFINITY_CONTROL_TOKEN\""#) || yaml.contains(r#""token_env":"MCP_AFFINITY_CONTROL_TOKEN""#), "{yaml}");
    std::fs::write(dir.join("run.yaml"), &yaml).unwrap();
    envoy::validate(&envoy::envoy_binary().unwrap(), &dir.join("run.yaml"), &token()).unwrap();

    let plain = run(&["--no-filter"]);
    assert!(!plain.contains(envoy::WASM_FILTER), "{plain}");
    std::fs::write(dir.join("plain.yaml"), &plain).unwrap();
    envoy::validate(&envoy::envoy_binary().unwrap(), &dir.join("plain.yaml"), &[]).unwrap();

    // --wasm is required with the filter.
    let out = Command::new(workspace_bin("mcp-affinity-envoy-config")).args(["--upstream", &u1.to_string()]).output().unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Envoy's raw `/stats?filter=wasmcustom`.
async fn wasm_stats(proxy: &Proxy) -> String {
    reqwest::get(format!("http://{}/stats?filter=wasmcustom", proxy.admin)).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fixture_runs_envoy_with_the_filter() {
    let pods = pods(1).unwrap();
    let mut proxy = Proxy::start(&[pods[0].addr], ProxyOptions::default()).unwrap();
    // The filter's counters exist from the start (defined by each worker VM).
    let stats = wasm_stats(&proxy).await;
    assert!(stats.lines().any(|l| l == "wasmcustom.mcp_affinity.requests_pinned: 0"), "{stats}");
    assert_eq!(proxy.metric("requests_pinned").await.unwrap(), 0);

    // A request that is not `initialize` passes through to the pod.
    let r = reqwest::get(proxy.url()).await.unwrap();
    assert!(r.headers().contains_key("x-envoy-upstream-service-time"), "answered by the pod through Envoy: {r:?}");

    // Restart in place: same addresses, ready again; kill: nothing listens.
    let (addr, admin) = (proxy.addr, proxy.admin);
    proxy.restart().unwrap();
    assert_eq!((proxy.addr, proxy.admin), (addr, admin));
    assert!(wasm_stats(&proxy).await.contains("wasmcustom.mcp_affinity.sessions_pinned: 0"));
    proxy.kill();
    assert!(std::net::TcpStream::connect(addr).is_err(), "Envoy still listens after kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fixture_without_the_filter_and_with_a_rejected_configuration() {
    let pods = pods(1).unwrap();
    let proxy = Proxy::start(&[pods[0].addr], ProxyOptions { no_filter: true, ..Default::default() }).unwrap();
    assert!(!wasm_stats(&proxy).await.contains("mcp_affinity"));
    let r = reqwest::get(proxy.url()).await.unwrap();
    assert!(r.headers().contains_key("x-envoy-upstream-service-time"), "{r:?}");

    // A configuration the filter rejects: Envoy exits (fail closed) and the error shows its log.
    let err = Proxy::start(&[pods[0].addr], ProxyOptions { filter_config: r#"{"pin_encodin":"plain"}"#.into(), ..Default::default() })
        .err()
        .expect("Envoy must refuse the configuration");
    let err = format!("{err:#}");
    assert!(err.contains("exited before it was ready") && err.contains("mcp_affinity"), "{err}");
}
