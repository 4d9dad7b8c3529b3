//! The instruction phase: each Envoy config in turn, a fresh Envoy of the same bootstrap
//! (new ports) under callgrind, a session opened and warmed up, the idle rate measured,
//! then a fixed number of steady requests, of MCP 2026-07-28 requests without session,
//! and/or of `initialize` counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::callgrind::{self, Counter};
use super::configs::{self, Config, Wiring};
use super::fleet::envoy_options;
use super::run::{check_routing, log, open_session};
use super::sequential;
use super::settings::{INSTR_IDLE_SECS, INSTR_INIT_SETTLE, INSTR_INIT_WARMUP, INSTR_WARMUP, Settings};
use crate::fixtures::mesh::{Proxy, ProxyOptions};

/// One count: instructions per request (or per initialize), the idle rate subtracted and
/// the load window it was subtracted over.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Count {
    /// Instructions per request, every thread of Envoy, idle subtracted.
    pub per_request: f64,
    /// Envoy's idle instructions per second.
    pub idle_per_second: f64,
    /// Seconds the counted requests took (plus the settle time for initializes).
    pub load_seconds: f64,
}

/// Counts of every config: steady requests, 2026-era requests, and initializes.
#[derive(Default)]
pub struct Counts {
    /// Per steady request, by config.
    pub steady: BTreeMap<Config, Count>,
    /// Per MCP 2026-07-28 request without session (`tools/list`), by config.
    pub stateless: BTreeMap<Config, Count>,
    /// Per initialize, by config.
    pub initialize: BTreeMap<Config, Count>,
}

/// Runs `f` on a blocking thread (sequential requests).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("blocking task")?
}

/// What every count of a run shares.
pub struct Phase<'a> {
    /// The settings.
    pub s: &'a Settings,
    /// What the Envoys are wired to (pods, control, modules).
    pub w: &'a Wiring,
    /// The Envoy ELF run under valgrind.
    pub elf: &'a Path,
    /// Where the callgrind dumps go.
    pub run_dir: &'a Path,
}

/// Counts `cfg`: `steady` requests (after [`INSTR_WARMUP`]) and then as many 2026-era
/// requests (after as many warm-up ones), and/or, with `init`, `initialize` (after
/// [`INSTR_INIT_WARMUP`]), into `into`. Errors when Envoy does not start under callgrind, a
/// request fails or is routed wrong, or a dump is missing.
pub async fn count(p: &Phase<'_>, cfg: Config, steady: bool, init: bool, into: &mut Counts) -> Result<()> {
    let Phase { s, w, elf, run_dir } = *p;
    let (bootstrap, render) = configs::render(cfg, w, true).context("not an Envoy config")?;
    let prefix = run_dir.join(format!("cg-{cfg:?}"));
    let options = ProxyOptions { command: Some(callgrind::command(elf, &prefix)), ready_timeout: Some(Duration::from_secs(240)), ..envoy_options() };
    let label = cfg.label();
    let proxy = tokio::task::block_in_place(|| Proxy::start_rendered(&bootstrap, &render, options)).with_context(|| format!("{label} under callgrind"))?;
    let url = proxy.url();
    let mut counter = Counter::new(proxy.pid().context("Envoy is not running")?, &prefix);
    let session = {
        let (l, u) = (format!("{label} under callgrind"), url.clone());
        blocking(move || open_session(&l, &u, Duration::from_secs(60))).await?
    };
    let steady_run = |n: u64| {
        let (u, id, pod, bp) = (url.clone(), session.id.clone(), session.pod.clone(), s.baseline_pods);
        blocking(move || {
            let run = sequential::steady(&u, &id, n)?;
            check_routing(cfg, bp, &pod, &run.pods).with_context(|| format!("{} under callgrind", cfg.label()))?;
            Ok(run)
        })
    };
    let init_run = |n: u64| {
        let u = url.clone();
        blocking(move || sequential::initialize(&u, n))
    };
    if steady {
        steady_run(INSTR_WARMUP).await?;
    } else {
        init_run(INSTR_INIT_WARMUP).await?;
        tokio::time::sleep(Duration::from_secs(INSTR_INIT_SETTLE)).await;
    }
    counter.zero()?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(INSTR_IDLE_SECS)).await;
    let idle_secs = t0.elapsed().as_secs_f64();
    let idle = callgrind::idle_rate(counter.dump()?, idle_secs);
    if steady {
        counter.zero()?;
        let t = Instant::now();
        steady_run(s.instr_requests).await?;
        let load = t.elapsed().as_secs_f64();
        let total = counter.dump()?;
        let c = Count { per_request: callgrind::per_request(total, idle, load, s.instr_requests), idle_per_second: idle, load_seconds: load };
        log(format!(
            "instructions: {label:<17} {:.0}/request ({} requests in {load:.2}s; idle {idle:.0}/s subtracted: {:.0}/request)",
            c.per_request,
            s.instr_requests,
            idle * load / s.instr_requests as f64
        ));
        into.steady.insert(cfg, c);
        let stateless_run = |n: u64| {
            let u = url.clone();
            blocking(move || sequential::stateless(&u, n))
        };
        stateless_run(INSTR_WARMUP).await?;
        counter.zero()?;
        let t = Instant::now();
        stateless_run(s.instr_requests).await?;
        let load = t.elapsed().as_secs_f64();
        let c = Count { per_request: callgrind::per_request(counter.dump()?, idle, load, s.instr_requests), idle_per_second: idle, load_seconds: load };
        log(format!("instructions: {label:<17} {:.0}/2026-era request ({} requests in {load:.2}s)", c.per_request, s.instr_requests));
        into.stateless.insert(cfg, c);
    }
    if init {
        if steady {
            init_run(INSTR_INIT_WARMUP).await?;
            tokio::time::sleep(Duration::from_secs(INSTR_INIT_SETTLE)).await;
        }
        counter.zero()?;
        let t = Instant::now();
        let run = init_run(s.instr_init).await?;
        tokio::time::sleep(Duration::from_secs(INSTR_INIT_SETTLE)).await;
        let load = t.elapsed().as_secs_f64();
        let total = counter.dump()?;
        let c = Count { per_request: callgrind::per_request(total, idle, load, s.instr_init), idle_per_second: idle, load_seconds: load };
        log(format!("instructions: {label:<17} {:.0}/initialize ({run}; idle {idle:.0}/s subtracted over {load:.2}s)", c.per_request));
        into.initialize.insert(cfg, c);
    }
    drop(proxy);
    Ok(())
}

/// The whole phase: the stateful-session bootstrap's configs (`BENCH_INSTR_SS`), then
/// `envoy/envoy.yaml`'s, then plain over two pods for the initialize count's baseline (the
/// plain Envoy itself when `BENCH_BASELINE_PODS=2`).
pub async fn run(s: &Settings, w: &Wiring, elf: &Path, run_dir: &Path) -> Result<Counts> {
    let phase = Phase { s, w, elf, run_dir };
    let mut counts = Counts::default();
    let want_init = |cfg: Config| s.instr_init > 0 && (configs::INSTR_INIT.contains(&cfg) || (cfg == Config::Plain && s.baseline_pods == 2));
    let ss: &[Config] = if s.instr_ss { &configs::INSTR_SS } else { &[] };
    for &cfg in ss.iter().chain(&configs::INSTR) {
        count(&phase, cfg, true, want_init(cfg), &mut counts).await?;
    }
    if s.instr_init > 0 {
        if s.baseline_pods == 2 {
            let plain = counts.initialize[&Config::Plain];
            counts.initialize.insert(Config::Plain2, plain);
        } else {
            count(&phase, Config::Plain2, false, true, &mut counts).await?;
        }
    }
    Ok(counts)
}
