//! `mcp-affinity-devproxy`: runs the mcp-affinity filter (.wasm) in a small Envoy-like
//! HTTP/1.1 proxy. A development and test tool; production is Envoy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use mcp_affinity_harness::devproxy::routing::PinRouting;
use mcp_affinity_harness::devproxy::{DevProxy, DevProxyConfig, admin};

/// Development proxy for mcp-affinity: runs the filter's .wasm per stream the way Envoy's
/// HTTP connection manager does (proxy-wasm ABI v0.2.1 on wasmtime) and routes like
/// envoy/envoy.yaml — a request with the pin header goes to the host it names
/// (ORIGINAL_DST), others round robin over --upstream. For development and tests only:
/// production is Envoy or an Istio sidecar.
#[derive(Parser, Debug)]
#[command(name = "mcp-affinity-devproxy", version)]
struct Args {
    /// Address to listen on (HTTP/1.1).
    #[arg(long, default_value = "127.0.0.1:10000", env = "DEVPROXY_LISTEN")]
    listen: SocketAddr,
    /// The filter module (mcp_affinity_filter.wasm). Required unless --no-filter.
    #[arg(long, required_unless_present = "no_filter")]
    wasm: Option<PathBuf>,
    /// Plugin configuration file (JSON). Without it the filter's defaults apply.
    #[arg(long)]
    filter_config: Option<PathBuf>,
    /// An upstream host (ip:port) of the MCP service; repeat for several.
    #[arg(long = "upstream", required = true)]
    upstreams: Vec<SocketAddr>,
    /// A named cluster for dispatch_http_call, as NAME=ip:port (e.g. the control service);
    /// repeatable.
    #[arg(long = "cluster", value_parser = parse_cluster)]
    clusters: Vec<(String, SocketAddr)>,
    /// Run without the filter: plain round robin (shows the problem).
    #[arg(long)]
    no_filter: bool,
    /// Worker VMs, like Envoy's --concurrency; they share one shared-data space.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// How the pin header selects the upstream host.
    #[arg(long, value_enum, default_value = "original-dst")]
    routing: PinRouting,
    /// The routing header (the filter's `pin_header`).
    #[arg(long, default_value = "x-session-pod")]
    pin_header: String,
    /// Environment variable passed into the VM (Envoy vm_config.environment_variables),
    /// as KEY (copied from this process) or KEY=VALUE; repeatable.
    #[arg(long = "vm-env")]
    vm_env: Vec<String>,
    /// Serve the filter's metrics at http://ADDR/stats (like Envoy's admin).
    #[arg(long)]
    admin: Option<SocketAddr>,
}

fn parse_cluster(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s.split_once('=').ok_or("expected NAME=ip:port")?;
    Ok((name.to_string(), addr.parse().map_err(|e| format!("{addr}: {e}"))?))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let filter_config = match &args.filter_config {
        Some(p) => std::fs::read(p).with_context(|| format!("read {}", p.display()))?,
        None => Vec::new(),
    };
    let mut vm_env = Vec::new();
    for e in &args.vm_env {
        match e.split_once('=') {
            Some((k, v)) => vm_env.push((k.to_string(), v.to_string())),
            None => match std::env::var(e) {
                Ok(v) => vm_env.push((e.clone(), v)),
                Err(_) => bail!("--vm-env {e}: not set in this environment"),
            },
        }
    }
    let proxy = DevProxy::new(DevProxyConfig {
        wasm: if args.no_filter { None } else { args.wasm.clone() },
        filter_config,
        upstreams: args.upstreams.clone(),
        clusters: args.clusters.iter().cloned().collect::<HashMap<_, _>>(),
        concurrency: args.concurrency,
        routing: args.routing,
        pin_header: args.pin_header.clone(),
        vm_env,
    })?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
    if let Some(addr) = args.admin {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tokio::spawn(admin::serve(proxy.metrics().clone(), l));
    }
    tracing::info!(
        listen = %args.listen,
        filter = if args.no_filter { "off" } else { "on" },
        upstreams = ?args.upstreams,
        "mcp-affinity-devproxy ready"
    );
    tokio::select! {
        r = proxy.serve(listener) => r,
        _ = shutdown() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
