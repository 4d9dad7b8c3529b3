//! `mcp-affinity-demo-server`: a demo/test MCP server (see
//! `mcp_affinity_harness::demo_server`).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use mcp_affinity_harness::demo_server::{self, DemoServerOptions, Era, UnknownSessionStyle};

/// Demo/test MCP server for mcp-affinity (not for production).
///
/// Stateful Streamable HTTP server built on rmcp: sessions live in memory and are lost
/// when the process exits. Tools: `echo` (returns `text`; optional `sleep_ms`) and
/// `whoami` (returns --name); with --era 2026|dual also `slow_task` and the tasks
/// extension (tasks, too, live in memory only). Restarting it with the same --listen is a "restart in
/// place": same address, all sessions gone.
#[derive(Debug, Parser)]
#[command(name = "mcp-affinity-demo-server", version)]
struct Args {
    /// Address to listen on (ip:port).
    #[arg(long, default_value = "127.0.0.1:8081", env = "DEMO_LISTEN")]
    listen: SocketAddr,
    /// Name returned by the `whoami` tool (defaults to the --listen address).
    #[arg(long)]
    name: Option<String>,
    /// HTTP path of the MCP endpoint.
    #[arg(long, default_value = "/mcp")]
    path: String,
    /// How to answer an unknown or expired Mcp-Session-Id: `spec` = HTTP 404 (MCP spec),
    /// `ts-sdk` = HTTP 400 with JSON-RPC error -32000 "Bad Request: No valid session ID
    /// provided" (like TypeScript-SDK servers).
    #[arg(long, value_enum, default_value_t = UnknownSessionStyle::Spec)]
    unknown_session: UnknownSessionStyle,
    /// Which MCP revisions to speak: `2025` = sessions via `initialize` (the default),
    /// `dual` = 2025 sessions and stateless 2026-07-28 requests on the same endpoint,
    /// `2026` = stateless 2026-07-28 only. `2026` and `dual` add the tasks extension and
    /// the `slow_task` tool (`ms`: a task when the request declares the extension).
    #[arg(long, value_enum, default_value_t = Era::V2025)]
    era: Era,
    /// Eras `2026`/`dual`: answer 2026-07-28 requests as SSE instead of application/json.
    #[arg(long)]
    sse_2026: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rmcp logs every message at info; keep the pods quiet unless RUST_LOG says otherwise.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let path = if args.path.starts_with('/') { args.path } else { format!("/{}", args.path) };
    let options = DemoServerOptions {
        name: args.name.unwrap_or_else(|| args.listen.to_string()),
        path,
        unknown_session: args.unknown_session,
        era: args.era,
        sse_2026: args.sse_2026,
    };
    // tokio's bind sets SO_REUSEADDR on Unix: a restart on the same port works at once.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    demo_server::serve_with_shutdown(options, listener, shutdown_signal()).await
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
