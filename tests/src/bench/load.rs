//! Load through one config: wrk (one thread, closed loop) driven with the scripts of
//! `bench/lua/`, its `BENCH …` result line parsed, and the proxy's CPU time and memory read
//! from `/proc`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::envoy::workspace_root;

/// A wrk script of `bench/lua/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// `steady.lua`: `tools/call` with the session id given after `--`.
    Steady,
    /// `initialize.lua`: `initialize` without a session id; `-- N` stops after N answers.
    Initialize,
}

impl Script {
    /// The script's path.
    pub fn path(self) -> PathBuf {
        workspace_root().join(match self {
            Script::Steady => "bench/lua/steady.lua",
            Script::Initialize => "bench/lua/initialize.lua",
        })
    }
}

/// The `BENCH requests=… duration_us=… p50_us=… p99_us=… status_errors=… socket_errors=…`
/// line every script prints (`bench/lua/report.lua`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WrkResult {
    /// Requests answered (counted).
    pub requests: u64,
    /// wrk's measuring time, µs.
    pub duration_us: u64,
    /// p50 latency, µs.
    pub p50_us: u64,
    /// p99 latency, µs.
    pub p99_us: u64,
    /// Non-2xx answers.
    pub status_errors: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
}

impl WrkResult {
    /// The last `BENCH` line of wrk's output. Errors when there is none or a field is
    /// missing or not a number.
    pub fn parse(output: &str) -> Result<WrkResult> {
        let line = output.lines().rev().find(|l| l.starts_with("BENCH ")).context("no BENCH line in wrk's output")?;
        let field = |name: &str| -> Result<u64> {
            let v = line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).with_context(|| format!("no {name} in {line:?}"))?;
            v.parse().with_context(|| format!("{name}={v} in {line:?}"))
        };
        Ok(WrkResult {
            requests: field("requests")?,
            duration_us: field("duration_us")?,
            p50_us: field("p50_us")?,
            p99_us: field("p99_us")?,
            status_errors: field("status_errors")?,
            socket_errors: field("socket_errors")?,
        })
    }

    /// requests / duration, per second (0 for a zero duration).
    pub fn req_s(&self) -> f64 {
        if self.duration_us == 0 { 0.0 } else { self.requests as f64 / (self.duration_us as f64 / 1e6) }
    }
}

/// One wrk run: `wrk -t1 -c<connections> -d<seconds>s --latency -s <script> <url> [-- args]`,
/// its whole output written to `out`. Bounded (seconds + 30 s, then wrk is killed). Errors
/// when wrk cannot run or prints no result.
pub async fn wrk(url: &str, script: Script, connections: u32, seconds: u64, args: &[String], out: &Path) -> Result<WrkResult> {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script.path())
        .arg(url)
        .kill_on_drop(true);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let run = tokio::time::timeout(Duration::from_secs(seconds + 30), cmd.output()).await;
    let output = match run {
        Ok(o) => o.context("run wrk")?,
        Err(_) => bail!("wrk did not finish within {} s ({url})", seconds + 30),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    std::fs::write(out, &text).with_context(|| format!("write {}", out.display()))?;
    WrkResult::parse(&text).with_context(|| format!("wrk through {url}: {}", text.trim()))
}

/// CPU time of every thread of process `pid`, ns (the scheduler's accounting in
/// `/proc/PID/task/*/schedstat`, not 10 ms ticks). Threads that exit between listing and
/// reading are skipped.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `VmRSS` of process `pid`, kB. Errors when the process is gone.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_bench_line() {
        let out = "Running 1s test\nBENCH requests=1 duration_us=1 p50_us=1 p99_us=1 status_errors=0 socket_errors=0\n  Latency ...\n\
                   BENCH requests=15000 duration_us=2000000 p50_us=950 p99_us=2100 status_errors=2 socket_errors=3\n";
        let r = WrkResult::parse(out).unwrap();
        assert_eq!(r, WrkResult { requests: 15000, duration_us: 2_000_000, p50_us: 950, p99_us: 2100, status_errors: 2, socket_errors: 3 });
        assert_eq!(r.req_s(), 7500.0);
        assert!(WrkResult::parse("no result\n").is_err());
        assert!(WrkResult::parse("BENCH requests=1 duration_us=x p50_us=1 p99_us=1 status_errors=0 socket_errors=0").is_err());
        assert!(WrkResult::parse("BENCH requests=1 p50_us=1 p99_us=1 status_errors=0 socket_errors=0").is_err());
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_ns(me) > 0);
        assert!(rss_kb(me).unwrap() > 0);
        assert_eq!(cpu_ns(u32::MAX), 0);
    }
}
