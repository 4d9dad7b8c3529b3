//! `mcp-affinity-envoy-config`: prints `envoy/envoy.yaml` rendered for a local Envoy
//! (see `mcp_affinity_harness::envoy::render`). Used by `scripts/run.sh` (`make run`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mcp_affinity_harness::envoy::{self, Render};

/// Prints the shipped Envoy bootstrap with local addresses, the local wasm module and,
/// optionally, another plugin configuration, to stdout.
///
/// Only these change; routes, clusters, timeouts and the filter's VM settings stay as
/// shipped. Run Envoy on the output with `envoy -c FILE --disable-hot-restart`.
#[derive(Debug, Parser)]
#[command(name = "mcp-affinity-envoy-config", version)]
struct Args {
    /// Address of the MCP listener (`mcp`).
    #[arg(long, default_value = "127.0.0.1:10000")]
    listen: SocketAddr,
    /// Address of Envoy's admin API (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The filter's wasm module (made absolute). Required unless --no-filter or --wasm-url.
    #[arg(long, required_unless_present_any = ["no_filter", "wasm_url"], conflicts_with = "wasm_url")]
    wasm: Option<PathBuf>,
    /// Load the module over HTTP instead (`vm_config.code.remote`, through an added
    /// cluster `mcp_affinity_wasm_source`): `http://HOST:PORT/PATH`. Needs --wasm-sha256.
    #[arg(long, requires = "wasm_sha256")]
    wasm_url: Option<String>,
    /// With --wasm-url: the module's sha256 in hex (`sha256sum mcp_affinity_filter.wasm`);
    /// Envoy refuses a module with another digest.
    #[arg(long, requires = "wasm_url")]
    wasm_sha256: Option<String>,
    /// An MCP server pod of the `mcp_service` cluster (ip:port); repeat for several.
    #[arg(long = "upstream", required = true)]
    upstreams: Vec<SocketAddr>,
    /// Address of the control service (the `mcp_affinity_control` cluster); default: as
    /// shipped.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Address of control's replay listener (`--replay-listen`), the priority-1 endpoint of
    /// `mcp_service` in `envoy/envoy-stateful-session.yaml`; default: as shipped.
    #[arg(long)]
    replay: Option<SocketAddr>,
    /// With --replay: the directory of the replay listener's mutual-TLS files
    /// (`scripts/replay-certs.sh`: ca.crt, envoy.crt, envoy.key); without it the replay
    /// endpoint is plain HTTP.
    #[arg(long, requires = "replay")]
    replay_tls: Option<PathBuf>,
    /// File with the plugin configuration JSON, used verbatim; default: as shipped.
    #[arg(long)]
    filter_config: Option<PathBuf>,
    /// Remove the wasm filter (plain round robin over the upstreams).
    #[arg(long)]
    no_filter: bool,
    /// Load the wasm filter without its response matcher (every response reaches the VM,
    /// as when an Istio WasmPlugin loads it).
    #[arg(long)]
    no_response_matcher: bool,
    /// The Istio shape (with --bootstrap envoy/envoy-stateful-session.yaml): the filter
    /// without its response matcher and early header mutation, envoy/istio/buffer-filter.yaml's
    /// buffer filter first, no retry and no replay endpoint.
    #[arg(long)]
    istio: bool,
    /// The bootstrap to render.
    #[arg(long, default_value_os_t = envoy::shipped_bootstrap())]
    bootstrap: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let yaml = std::fs::read_to_string(&args.bootstrap).with_context(|| format!("read {}", args.bootstrap.display()))?;
    let wasm = match args.wasm.filter(|_| !args.no_filter) {
        Some(w) => Some(std::path::absolute(&w).with_context(|| format!("wasm path {}", w.display()))?),
        None => None,
    };
    let filter_config = match &args.filter_config {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?),
        None => None,
    };
    let render = Render {
        wasm,
        control: args.control,
        replay: args.replay,
        replay_tls: match &args.replay_tls {
            Some(d) => Some(std::path::absolute(d).with_context(|| format!("--replay-tls {}", d.display()))?),
            None => None,
        },
        filter_config,
        no_filter: args.no_filter,
        no_response_matcher: args.no_response_matcher,
        istio: args.istio,
        remote_wasm: args.wasm_url.zip(args.wasm_sha256).map(|(url, sha256)| envoy::RemoteWasm { url, sha256 }),
        ..Render::new(args.listen, args.admin, &args.upstreams)
    };
    print!("{}", envoy::render(&yaml, &render)?);
    Ok(())
}
