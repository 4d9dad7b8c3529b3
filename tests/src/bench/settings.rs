//! The bench's settings, from the environment (`make bench-envoy` passes them through), and
//! the time budget that bounds a run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

/// Steady requests sent before the counted ones, under callgrind.
pub const INSTR_WARMUP: u64 = 300;
/// Idle window under callgrind, s: 3 × Envoy's stats flush interval (5 s), so that it holds
/// whole flushes, and 15 of the filter's one-second ticks (a tick more or less at its edges
/// moves the idle rate by 1/15).
pub const INSTR_IDLE_SECS: u64 = 15;
/// `initialize` requests sent before the counted ones, under callgrind.
pub const INSTR_INIT_WARMUP: u64 = 100;
/// Seconds after each batch of `initialize`, so that the records the filter sends to
/// control on its timer after the answers are inside the window.
pub const INSTR_INIT_SETTLE: u64 = 1;
/// Sessions each proxy holds before the steady phase (the measured one included).
pub const BASE_SESSIONS: u64 = 10;

/// Control's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// Control's in-process store.
    Memory,
    /// Its own `redis-server` on a free port.
    Redis,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Memory => "memory",
            Store::Redis => "redis",
        })
    }
}

/// Every knob of a run. Environment variables (defaults in parentheses):
/// `BENCH_SECONDS` (5) per config per round, `BENCH_ROUNDS` (5), `BENCH_CONNECTIONS` (16),
/// `BENCH_WARMUP` (1) s per config, `BENCH_SCALE` (0), `BENCH_INIT_CONNECTIONS` (1),
/// `BENCH_INIT_ROUNDS` (`BENCH_ROUNDS`), `BENCH_INIT_SECONDS` (`BENCH_SECONDS`),
/// `BENCH_CONTROL_STORE` (memory | redis), `BENCH_BASELINE_PODS` (1 | 2),
/// `BENCH_RESULTS` (bench/results), `BENCH_KEEP` (keep the run directory),
/// `BENCH_INSTRUCTIONS` (1), `BENCH_INSTR_REQUESTS` (3000), `BENCH_INSTR_INIT` (300; 0: no
/// initialize count), `BENCH_INSTR_SS` (1: the stateful-session bootstrap's counts).
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Seconds per config per round.
    pub seconds: u64,
    /// Rounds of the steady phase.
    pub rounds: u32,
    /// wrk connections of the steady phase.
    pub connections: u32,
    /// Warm-up per config, s.
    pub warmup_seconds: u64,
    /// Sessions added to each second instance (0: no scale phases).
    pub scale: u64,
    /// wrk connections of the initialize phase.
    pub init_connections: u32,
    /// Rounds of the initialize phase.
    pub init_rounds: u32,
    /// Seconds per config per round of the initialize phase.
    pub init_seconds: u64,
    /// Control's store.
    pub control_store: Store,
    /// Pods behind plain and empty (1 or 2).
    pub baseline_pods: usize,
    /// Directory of the JSON results.
    #[serde(skip)]
    pub results: PathBuf,
    /// Keep the run directory.
    #[serde(skip)]
    pub keep: bool,
    /// Run the instruction phase.
    pub instructions: bool,
    /// Steady requests counted under callgrind.
    pub instr_requests: u64,
    /// Initializes counted under callgrind (0: none).
    pub instr_init: u64,
    /// Count the stateful-session bootstrap's configs too.
    pub instr_ss: bool,
}

/// A number from the environment variable `name`, `default` when unset or empty.
fn num<T: std::str::FromStr>(env: &impl Fn(&str) -> Option<String>, name: &str, default: T) -> Result<T> {
    match env(name).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.trim().parse().ok().with_context(|| format!("{name}={v} is not a number")),
    }
}

impl Settings {
    /// From the process environment.
    pub fn from_env() -> Result<Settings> {
        Settings::from(&|k: &str| std::env::var(k).ok())
    }

    /// From `env` (a variable's value by name). Errors on a value that is not a number, out
    /// of range, or not one of the choices.
    pub fn from(env: &impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let seconds = num(env, "BENCH_SECONDS", 5)?;
        let rounds = num(env, "BENCH_ROUNDS", 5)?;
        let flag = |name: &str, default: bool| -> Result<bool> {
            match num(env, name, u8::from(default))? {
                0 => Ok(false),
                1 => Ok(true),
                v => bail!("{name}={v}: 0 or 1"),
            }
        };
        let s = Settings {
            seconds,
            rounds,
            connections: num(env, "BENCH_CONNECTIONS", 16)?,
            warmup_seconds: num(env, "BENCH_WARMUP", 1)?,
            scale: num(env, "BENCH_SCALE", 0)?,
            init_connections: num(env, "BENCH_INIT_CONNECTIONS", 1)?,
            init_rounds: num(env, "BENCH_INIT_ROUNDS", rounds)?,
            init_seconds: num(env, "BENCH_INIT_SECONDS", seconds)?,
            control_store: match env("BENCH_CONTROL_STORE").filter(|v| !v.is_empty()).as_deref() {
                None | Some("memory") => Store::Memory,
                Some("redis") => Store::Redis,
                Some(v) => bail!("BENCH_CONTROL_STORE={v}: memory or redis"),
            },
            baseline_pods: num(env, "BENCH_BASELINE_PODS", 1)?,
            results: env("BENCH_RESULTS").filter(|v| !v.is_empty()).map_or_else(|| crate::envoy::workspace_root().join("bench/results"), PathBuf::from),
            keep: env("BENCH_KEEP").is_some_and(|v| !v.is_empty() && v != "0"),
            instructions: flag("BENCH_INSTRUCTIONS", true)?,
            instr_requests: num(env, "BENCH_INSTR_REQUESTS", 3000)?,
            instr_init: num(env, "BENCH_INSTR_INIT", 300)?,
            instr_ss: flag("BENCH_INSTR_SS", true)?,
        };
        ensure!(
            s.seconds >= 1 && s.rounds >= 1 && s.connections >= 1 && s.init_connections >= 1 && s.init_rounds >= 1 && s.init_seconds >= 1,
            "seconds, rounds and connections must be >= 1"
        );
        ensure!(s.instr_requests >= 1, "BENCH_INSTR_REQUESTS must be >= 1");
        ensure!(matches!(s.baseline_pods, 1 | 2), "BENCH_BASELINE_PODS must be 1 or 2");
        Ok(s)
    }

    /// The longest a run may take: starting and measuring are predictable; populating needs
    /// N/1000 s per proxy at worst; an Envoy under callgrind takes 40–100 s to start and
    /// serves ≥ 20 requests/s, ≥ 5 initializes/s.
    pub fn budget(&self) -> Duration {
        let (w, r, s) = (self.warmup_seconds, u64::from(self.rounds), self.seconds);
        let mut b = 240 + 7 * (w + 5) + r * 7 * (s + 5);
        if self.scale > 0 {
            b += 3 * (self.scale / 250 + 60) + 9 * (w + 5) + r * 6 * (s + 5) + u64::from(self.init_rounds) * 8 * (self.init_seconds + 5);
        }
        if self.instructions {
            let envoys = 7 + if self.instr_ss { 5 } else { 0 };
            b += envoys * (180 + INSTR_IDLE_SECS) + envoys * (INSTR_WARMUP + self.instr_requests) / 20 + 3 * (INSTR_INIT_WARMUP + self.instr_init) / 5;
        }
        Duration::from_secs(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Settings> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from(&|k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn defaults_and_overrides() {
        let d = with(&[]).unwrap();
        assert_eq!((d.seconds, d.rounds, d.connections, d.init_rounds, d.init_seconds), (5, 5, 16, 5, 5));
        assert_eq!((d.instructions, d.instr_requests, d.instr_init, d.instr_ss, d.baseline_pods), (true, 3000, 300, true, 1));
        assert_eq!(d.control_store, Store::Memory);
        let s = with(&[("BENCH_SECONDS", "2"), ("BENCH_ROUNDS", "3"), ("BENCH_INSTRUCTIONS", "0"), ("BENCH_CONTROL_STORE", "redis"), ("BENCH_SCALE", "")]).unwrap();
        assert_eq!((s.seconds, s.rounds, s.init_seconds, s.init_rounds, s.instructions, s.scale), (2, 3, 2, 3, false, 0));
        assert_eq!(s.control_store, Store::Redis);
        assert!(s.budget() < d.budget());
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [("BENCH_SECONDS", "x"), ("BENCH_SECONDS", "0"), ("BENCH_BASELINE_PODS", "3"), ("BENCH_CONTROL_STORE", "disk"), ("BENCH_INSTRUCTIONS", "2"), ("BENCH_ROUNDS", "-1")] {
            assert!(with(&[bad]).is_err(), "{bad:?}");
        }
    }
}
