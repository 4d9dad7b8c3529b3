//! `mcp-affinity-control`: parses flags, sets up logging, binds, serves until SIGTERM or
//! SIGINT; or, with a subcommand (`status`, `sessions get`, `drain`, `undrain`), runs that
//! operator command against a running service and exits with its code. Everything else
//! lives in the library.

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
use mcp_affinity_control::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Config::command().get_matches();
    let config = Config::from_arg_matches(&matches)?;
    if let Some(command) = &config.command {
        let code = mcp_affinity_control::cli::run(&config, command).await;
        std::process::exit(code);
    }
    init_logging(config.log_format);
    if matches.value_source("token") == Some(ValueSource::CommandLine) {
        tracing::warn!("--token on the command line is visible in `ps`; prefer --token-file or MCP_AFFINITY_CONTROL_TOKEN");
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    mcp_affinity_control::serve(config, listener, shutdown_signal()).await
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
