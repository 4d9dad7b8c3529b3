//! The operator CLI: subcommands of the `mcp-affinity-control` binary that talk to a
//! running control service over its HTTP API (`docs/control-flags.md`, "Operator
//! commands"). Without a subcommand the binary serves, as always.
//!
//! - `status`: health, readiness (the store), a few metrics, the draining upstreams.
//! - `sessions get ID`: one session's record, compactly (`--json`: as control answers it).
//! - `drain UPSTREAM [--wait SECS] [--settle SECS]`: starts the drain, then shows its
//!   progress until it settles (no session moved or failed to move for `--settle`
//!   seconds), it ends (undrained, expired) or `--wait` runs out.
//! - `undrain UPSTREAM`: ends the drain, with its final counts.
//!
//! The URL comes from `--url` / `MCP_AFFINITY_CONTROL_URL`, else from `--listen` /
//! `MCP_AFFINITY_CONTROL_LISTEN` (its unspecified address `0.0.0.0` / `::` read as
//! loopback), so inside control's own container no flag is needed; the token from
//! `--token-file` / `MCP_AFFINITY_CONTROL_TOKEN_FILE` or `MCP_AFFINITY_CONTROL_TOKEN`, as
//! for serving. Every failure is one line on stderr and an exit code of [`exit`].

mod client;
pub mod format;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::config::Config;
pub use client::{Client, CliError};

/// Exit codes of the operator commands.
pub mod exit {
    /// Done (for `drain --wait`: the drain settled or ended).
    pub const OK: i32 = 0;
    /// Any other failure: control answered an unexpected error (its store unavailable,
    /// 5xx), `status` found control not ready.
    pub const FAILURE: i32 = 1;
    /// Wrong usage: bad flags (clap), an invalid upstream or session id (400).
    pub const USAGE: i32 = 2;
    /// Control cannot be reached (connection refused, timeout, DNS).
    pub const UNREACHABLE: i32 = 3;
    /// Control refused the token (401/403), or none was given.
    pub const UNAUTHORIZED: i32 = 4;
    /// No such session; `undrain` of an upstream that is not draining.
    pub const NOT_FOUND: i32 = 5;
    /// `drain --wait`: the wait ran out while sessions were still moving.
    pub const NOT_SETTLED: i32 = 6;
}

/// Where control is (every operator command takes it).
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Base URL of the control service's API. Default: http:// and --listen
    /// (MCP_AFFINITY_CONTROL_LISTEN, default 127.0.0.1:9901), its unspecified address
    /// (0.0.0.0, ::) read as loopback.
    #[arg(long, env = "MCP_AFFINITY_CONTROL_URL", value_name = "URL")]
    pub url: Option<String>,
}

/// Operator commands (run against a running control service).
#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Control's health, readiness (its store), a few metrics and the draining upstreams
    /// with their progress. Exit 1 when control is up but not ready.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Session records.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Drains an upstream (ip:port), then shows its progress until it settles — no
    /// unfinished task left on it (MCP 2026-07-28 tasks cannot move) and no session moved
    /// (or failed to move) for --settle seconds —, ends, or --wait runs out (exit 6).
    /// Sessions move at their next request; idle ones stay until the pod is gone and are
    /// recovered then, so control cannot say how many remain. A pod's `preStop` hook can
    /// run this to wait for its tasks.
    Drain {
        /// The upstream host, ip:port as Envoy reports it (10.0.0.7:8080, [fd00::7]:8080).
        upstream: String,
        /// Longest time to watch the drain, in seconds; 0 = start it and return.
        #[arg(long, default_value_t = 120, value_name = "SECS")]
        wait: u64,
        /// The drain counts as settled after this many seconds without a session moved or
        /// failed to move (filters poll the draining list about once a second).
        #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        settle: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Ends the drain of an upstream (ip:port) and prints its final counts. Exit 5 when it
    /// is not draining.
    Undrain {
        /// The upstream host, ip:port.
        upstream: String,
        #[command(flatten)]
        target: Target,
    },
}

/// `sessions …`.
#[derive(Subcommand, Clone, Debug)]
pub enum SessionsCommand {
    /// One session's record: pin, generation, protocol version, client, times.
    Get {
        /// The client's Mcp-Session-Id.
        id: String,
        /// Print the record as control answers it (JSON) instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

impl Command {
    fn target(&self) -> &Target {
        match self {
            Command::Status { target } | Command::Drain { target, .. } | Command::Undrain { target, .. } => target,
            Command::Sessions(SessionsCommand::Get { target, .. }) => target,
        }
    }
}

/// The base URL: `--url`, else `http://` + `--listen` with an unspecified address read as
/// loopback.
pub fn base_url(target: &Target, listen: SocketAddr) -> String {
    match &target.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let mut addr = listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
            }
            format!("http://{addr}")
        }
    }
}

/// The token of `--token-file` or `--token` (`MCP_AFFINITY_CONTROL_TOKEN`), if any.
fn token(config: &Config) -> Result<Option<String>, CliError> {
    match (&config.token_file, &config.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| CliError::new(exit::USAGE, format!("cannot read token file {}: {e}", path.display()))),
        (None, Some(t)) => Ok(Some(t.trim().to_string())),
        (None, None) => Ok(None),
    }
}

/// Runs `command`; the exit code. Failures are printed to stderr as one line.
pub async fn run(config: &Config, command: &Command) -> i32 {
    match run_inner(config, command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.message);
            e.code
        }
    }
}

async fn run_inner(config: &Config, command: &Command) -> Result<i32, CliError> {
    let client = Client::new(base_url(command.target(), config.listen), token(config)?)?;
    match command {
        Command::Status { .. } => status(&client).await,
        Command::Sessions(SessionsCommand::Get { id, json, .. }) => {
            let (record, raw) = client.session(id).await?;
            if *json {
                println!("{raw}");
            } else {
                print!("{}", format::record(&record, format::now_ms()));
            }
            Ok(exit::OK)
        }
        Command::Drain { upstream, wait, settle, .. } => {
            drain(&client, upstream, Duration::from_secs(*wait), Duration::from_secs(*settle)).await
        }
        Command::Undrain { upstream, .. } => {
            // The counts before the drain ends (best effort: the list may fail or miss it).
            let before = client.draining().await.ok().and_then(|l| l.draining.into_iter().find(|d| same_upstream(&d.upstream, upstream)));
            client.undrain(upstream).await?;
            match before {
                Some(d) => println!(
                    "{}: undrained after {} (moved {}, failed {})",
                    d.upstream,
                    format::duration_ms(format::now_ms().saturating_sub(d.since_ms)),
                    d.moved,
                    d.failed
                ),
                None => println!("{upstream}: undrained"),
            }
            Ok(exit::OK)
        }
    }
}

/// `upstream` as given equals the stored canonical form `stored`.
fn same_upstream(stored: &str, given: &str) -> bool {
    stored == given || given.parse::<SocketAddr>().is_ok_and(|a| a.to_string() == stored)
}

async fn status(client: &Client) -> Result<i32, CliError> {
    client.healthz().await?;
    println!("control     {}: up", client.base());
    let ready = client.readyz().await?;
    let mut code = exit::OK;
    match &ready {
        Ok(()) => println!("store       ready"),
        Err(why) => {
            println!("store       NOT READY: {why}");
            code = exit::FAILURE;
        }
    }
    // Metrics are best effort (an older control, a proxy that hides them).
    if let Ok(text) = client.metrics().await {
        print!("{}", format::metrics_summary(&format::parse_metrics(&text)));
    }
    match client.draining().await {
        Ok(list) => print!("{}", format::draining(&list.draining, format::now_ms())),
        // Without the store the list cannot be read; the line above says why.
        Err(e) if ready.is_err() && e.code == exit::FAILURE => println!("draining    unknown ({})", e.message),
        Err(e) => return Err(e),
    }
    Ok(code)
}

/// How often `drain` reads the draining list.
const POLL: Duration = Duration::from_millis(500);

/// How often `drain` prints a line while nothing changes.
const HEARTBEAT: Duration = Duration::from_secs(5);

async fn drain(client: &Client, upstream: &str, wait: Duration, settle: Duration) -> Result<i32, CliError> {
    let before = client.draining().await?;
    let already = before.draining.iter().any(|d| same_upstream(&d.upstream, upstream));
    let drain = client.drain(upstream).await?;
    let now = format::now_ms();
    if already {
        println!(
            "{}: already draining (source {}, for {}): moved {}, failed {}",
            drain.upstream,
            drain.source.as_str(),
            format::duration_ms(now.saturating_sub(drain.since_ms)),
            drain.moved,
            drain.failed
        );
    } else {
        println!("{}: draining (sessions move to other pods at their next request)", drain.upstream);
    }
    if wait.is_zero() {
        return Ok(exit::OK);
    }
    let start = Instant::now();
    let mut counts = (drain.moved, drain.failed, drain.tasks);
    let (mut last_change, mut last_line) = (start, start);
    let mut trouble: Option<String> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let list = match client.draining().await {
            Ok(list) => list,
            // Control restarting or its store failing must not end the watch (a preStop
            // hook would let the pod stop early): said once, retried until --wait ends.
            Err(e) if e.code == exit::UNREACHABLE || e.code == exit::FAILURE => {
                if trouble.as_ref() != Some(&e.message) {
                    println!("  cannot read the draining list ({}); retrying", e.message);
                    trouble = Some(e.message);
                }
                if start.elapsed() >= wait {
                    println!("{}: not settled within --wait {}s: control did not answer", drain.upstream, wait.as_secs());
                    return Ok(exit::NOT_SETTLED);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        trouble = None;
        let Some(d) = list.draining.into_iter().find(|d| d.upstream == drain.upstream) else {
            println!("{}: no longer draining (undrained, or the drain expired): moved {}, failed {}", drain.upstream, counts.0, counts.1);
            return Ok(exit::OK);
        };
        let now = Instant::now();
        if (d.moved, d.failed, d.tasks) != counts {
            counts = (d.moved, d.failed, d.tasks);
            last_change = now;
        }
        if d.tasks == 0 && now.duration_since(last_change) >= settle {
            println!(
                "{}: settled, no move for {}s: moved {}, failed {}{}",
                d.upstream,
                settle.as_secs(),
                d.moved,
                d.failed,
                format::last_move(&d, format::now_ms())
            );
            return Ok(exit::OK);
        }
        if now.duration_since(start) >= wait {
            println!(
                "{}: not settled within --wait {}s: moved {}, failed {}{}{}",
                d.upstream,
                wait.as_secs(),
                d.moved,
                d.failed,
                format::tasks(&d),
                format::last_move(&d, format::now_ms())
            );
            return Ok(exit::NOT_SETTLED);
        }
        if last_change == now || now.duration_since(last_line) >= HEARTBEAT {
            last_line = now;
            println!("  moved {}, failed {}{}{}", d.moved, d.failed, format::tasks(&d), format::last_move(&d, format::now_ms()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_listen() {
        let none = Target { url: None };
        assert_eq!(base_url(&none, "127.0.0.1:9901".parse().unwrap()), "http://127.0.0.1:9901");
        assert_eq!(base_url(&none, "0.0.0.0:9901".parse().unwrap()), "http://127.0.0.1:9901");
        assert_eq!(base_url(&none, "[::]:9901".parse().unwrap()), "http://[::1]:9901");
        assert_eq!(base_url(&Target { url: Some("http://c:1/".into()) }, "0.0.0.0:1".parse().unwrap()), "http://c:1");
    }

    #[test]
    fn upstreams_compare_in_canonical_form() {
        assert!(same_upstream("10.0.0.7:8080", "10.0.0.7:8080"));
        assert!(same_upstream("[fd00::7]:8080", "[fd00:0::7]:8080"));
        assert!(!same_upstream("10.0.0.7:8080", "10.0.0.8:8080"));
    }
}
