//! `make bench-envoy`: the steady request of one pinned MCP session (`tools/call` with
//! `Mcp-Session-Id`) through real Envoy side by side — plain, an empty wasm filter,
//! empty+pin, mcp-affinity with and without control — and HAProxy and the pod directly, in
//! interleaved rounds with medians (bench/README.md is the method); then the instructions
//! Envoy executes per request under callgrind; with `BENCH_SCALE` N live sessions, the
//! initialize path and memory per session.
//!
//! - [`settings`]: the environment knobs and the run's time budget.
//! - [`configs`]: the configs, their labels and their Envoy bootstraps.
//! - [`fleet`]: pods, control, Redis, the Envoys and HAProxy of the timed phases.
//! - [`load`]: wrk and `/proc` (CPU time, RSS).
//! - [`sequential`]: a fixed number of requests on one connection.
//! - [`run`]: sessions and the timed phases.
//! - [`callgrind`], [`instructions`]: the instruction counts.
//! - [`stats`]: medians and paired comparisons.
//! - [`report`], [`json`], [`tables`]: the results, the JSON written, the tables printed.

#![warn(missing_docs)]

pub mod callgrind;
pub mod configs;
pub mod fleet;
pub mod instructions;
pub mod json;
pub mod load;
pub mod report;
pub mod run;
pub mod sequential;
pub mod settings;
pub mod stats;
pub mod tables;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use configs::{Config, SCALED, STEADY};
use fleet::Fleet;
use report::{Machine, Outcome, Versions};
use run::{Timed, log};
use settings::Settings;

/// Whether `tool` is an executable on `PATH`.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The UTC time now as `YYYYMMDDTHHMMSSZ` (control's UTC formatting, without separators).
fn stamp() -> String {
    use mcp_affinity_control::cli::format::{now_ms, utc};
    utc(now_ms()).replace(['-', ':'], "")
}

/// Checks what the run needs before starting anything: the tools, Envoy, and (for the
/// instruction phase) valgrind and the Envoy ELF, returned.
fn preflight(s: &Settings) -> Result<(PathBuf, Option<PathBuf>)> {
    for t in ["wrk", "haproxy"] {
        ensure!(on_path(t), "{t} is not installed: `make bench-envoy` installs it");
    }
    if s.control_store == settings::Store::Redis {
        ensure!(on_path("redis-server"), "BENCH_CONTROL_STORE=redis needs redis-server (`make setup-redis`)");
    }
    fleet::modules()?;
    let envoy = crate::envoy::envoy_binary()?;
    let ok = std::process::Command::new(&envoy).arg("--version").output().is_ok_and(|o| o.status.success());
    ensure!(ok, "Envoy at {} does not run: `make setup-envoy` or ENVOY=/path", envoy.display());
    let elf = if s.instructions {
        for t in ["valgrind", "callgrind_control"] {
            ensure!(on_path(t), "{t} is not installed: `make bench-envoy` installs valgrind (or BENCH_INSTRUCTIONS=0)");
        }
        Some(callgrind::envoy_elf(&envoy)?)
    } else {
        None
    };
    Ok((envoy, elf))
}

/// One whole run: processes started, phases measured, tables printed, JSON written (its
/// path returned). Errors on any failure; a run in which a request failed is an error
/// after the results are written ("these numbers are not valid").
pub async fn run(s: Settings, run_dir: &Path) -> Result<PathBuf> {
    let (envoy, elf) = preflight(&s)?;
    let mut machine = Machine::start();
    let mut versions = Versions::of(&envoy);
    let stamp = stamp();
    log(format!("machine: {} cores, {}; Envoy {}, HAProxy {}, wrk {}", machine.nproc, machine.cpu, versions.envoy, versions.haproxy, versions.wrk));
    log(format!("load average at start: {}; rustc processes running: {}", machine.load_average_start, machine.rustc_processes_start));
    log(format!(
        "settings: {}s x {} rounds x {} configs, {} connections, warm-up {}s; scale {}; control store {}; pods behind plain/empty {}; run dir {}",
        s.seconds,
        s.rounds,
        STEADY.len(),
        s.connections,
        s.warmup_seconds,
        s.scale,
        s.control_store,
        s.baseline_pods,
        run_dir.display()
    ));

    let mut envoys = vec![Config::Plain, Config::Empty, Config::Pin, Config::Affinity, Config::Control];
    let mut haproxies = vec![Config::Haproxy];
    if s.scale > 0 {
        envoys.extend([Config::Plain2, Config::AffinityBig, Config::ControlBig]);
        haproxies.push(Config::HaproxyBig);
    }
    let fleet = tokio::task::block_in_place(|| Fleet::start(&s, &envoys, &haproxies, run_dir))?;
    log(format!("started: pods {} {}, control {}, {} Envoys, {} HAProxy", fleet.wiring.pods[0], fleet.wiring.pods[1], fleet.control.addr, envoys.len(), haproxies.len()));

    let mut measured: Vec<Config> = STEADY.to_vec();
    if s.scale > 0 {
        measured.extend(SCALED.map(Config::second));
        measured.push(Config::Plain2);
    }
    let mut timed = tokio::task::block_in_place(|| Timed::open_sessions(&s, &fleet, run_dir, &measured))?;
    timed.steady().await?;
    if s.scale > 0 {
        timed.scale().await?;
    }
    let counts = match &elf {
        Some(elf) => {
            versions.valgrind = callgrind::valgrind_version();
            log(format!("instructions: each Envoy config in turn under valgrind {} --tool=callgrind ({})", versions.valgrind, elf.display()));
            Some(instructions::run(&s, &fleet.wiring, elf, run_dir).await?)
        }
        None => None,
    };
    machine.end();
    let outcome = Outcome {
        stamp,
        settings: s.clone(),
        machine,
        versions,
        samples: std::mem::take(&mut timed.samples),
        counts,
        created: std::mem::take(&mut timed.created),
        rss: std::mem::take(&mut timed.rss),
        memory: timed.memory.take(),
    };
    drop(timed);
    drop(fleet);
    print!("{}", outcome.tables());
    std::fs::create_dir_all(&s.results).with_context(|| format!("create {}", s.results.display()))?;
    let path = s.results.join(format!("envoy-{}.json", outcome.stamp));
    std::fs::write(&path, serde_json::to_string_pretty(&outcome.json())? + "\n").with_context(|| format!("write {}", path.display()))?;
    println!("\nresults: {}", path.display());
    if outcome.errors() {
        bail!("some requests failed (errors column): these numbers are not valid");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamp_shape() {
        let s = super::stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[8..9] == "T", "{s}");
    }
}
