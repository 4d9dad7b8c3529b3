//! `mcp-affinity-envoy-bench` (`make bench-envoy`): mcp-affinity on real Envoy side by side
//! with plain Envoy, an empty wasm filter, HAProxy and the pod itself; instructions per
//! request under callgrind. See `mcp_affinity_harness::bench` and bench/README.md; settings
//! from the environment ([`mcp_affinity_harness::bench::settings::Settings`]).
//!
//! The whole run is bounded by a budget computed from the settings; on expiry, Ctrl-C or
//! SIGTERM every process it started is stopped by pid (the fixtures' `Drop`). The run
//! directory (rendered bootstraps' logs, HAProxy configs, raw wrk output, callgrind dumps)
//! is kept when the run fails or with `BENCH_KEEP=1`.

use std::process::ExitCode;

use mcp_affinity_harness::bench::{self, settings::Settings};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (budget, keep) = (settings.budget(), settings.keep);
    let run_dir = std::env::temp_dir().join(format!("mcp-affinity-bench.{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        eprintln!("bench: create {}: {e}", run_dir.display());
        return ExitCode::FAILURE;
    }
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // Dropping the run's future (budget over, or a signal) drops every fixture: each stops
    // its process by pid.
    let outcome = tokio::select! {
        r = tokio::time::timeout(budget, bench::run(settings, &run_dir)) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("over the time budget of {} s", budget.as_secs())),
        },
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    let failed = outcome.is_err();
    if let Err(e) = &outcome {
        eprintln!("bench: {e:#}");
    }
    if failed || keep {
        eprintln!("bench: run directory kept: {} (logs, configs, raw wrk output, callgrind dumps)", run_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
