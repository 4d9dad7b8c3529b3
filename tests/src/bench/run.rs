//! The timed phases: sessions opened and pinning checked through every config, then
//! interleaved rounds of wrk (steady; with `BENCH_SCALE`: populating the second instances,
//! the same-time A/B and the initialize path), every sample kept per phase and config.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::configs::{Config, INITIALIZE, SCALED, STEADY};
use super::fleet::Fleet;
use super::load::{self, Script};
use super::sequential::{self, INITIALIZE as INIT_BODY, INITIALIZED, STEADY as CALL_BODY};
use super::settings::{BASE_SESSIONS, Settings, Store};
use super::stats::Sample;

/// `[date] message` on stderr: progress.
pub fn log(msg: impl std::fmt::Display) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    eprintln!("[{:02}:{:02}:{:02}] {msg}", t / 3600, t / 60 % 60, t % 60);
}

/// A session opened through a config: its id and the pod that issued it.
#[derive(Clone, Debug)]
pub struct Session {
    /// `Mcp-Session-Id`.
    pub id: String,
    /// `x-pod` of the answer to `initialize`.
    pub pod: String,
}

/// `initialize` then `notifications/initialized` through `url`, each on a new connection
/// with `timeout`. Errors unless both answer 200 and the first carries a session id.
pub fn open_session(label: &str, url: &str, timeout: Duration) -> Result<Session> {
    let a = sequential::post_once(url, INIT_BODY, None, timeout).with_context(|| format!("{label}: initialize"))?;
    let (200, Some(id)) = (a.status, a.session) else { bail!("{label}: initialize answered {}, no session id", a.status) };
    let n = sequential::post_once(url, INITIALIZED, Some(&id), timeout)?;
    ensure!(n.status == 200, "{label}: notifications/initialized answered {}", n.status);
    Ok(Session { id, pod: a.pod.unwrap_or_else(|| "-".into()) })
}

/// Whether answers from `pods` are routed as `cfg` must route a session issued by `issuer`.
/// Errors saying how they were not.
pub fn check_routing(cfg: Config, baseline_pods: usize, issuer: &str, pods: &[String]) -> Result<()> {
    match cfg.pinning(baseline_pods) {
        None => Ok(()),
        Some(false) => {
            ensure!(pods.iter().all(|p| *p == pods[0]), "{}: answered by pods {}: expected one pod", cfg.label(), pods.join(","));
            Ok(())
        }
        Some(true) => {
            ensure!(pods.iter().all(|p| p == issuer), "{}: session from pod {issuer} answered by pods {}: not pinned", cfg.label(), pods.join(","));
            Ok(())
        }
    }
}

/// Every sample of the run: phase → config → one per round.
pub type Samples = BTreeMap<&'static str, BTreeMap<Config, Vec<Sample>>>;

/// The timed part of a run.
pub struct Timed<'a> {
    /// The settings.
    pub s: &'a Settings,
    /// The processes measured.
    pub fleet: &'a Fleet,
    /// Where raw wrk output goes.
    pub run_dir: &'a Path,
    /// The measured session of each config.
    pub sessions: BTreeMap<Config, Session>,
    /// Every sample, by phase and config.
    pub samples: Samples,
    /// Sessions created in each second instance while populating.
    pub created: BTreeMap<Config, u64>,
    /// Memory before/after populating, kB (`rss_before`, `rss_after` by config; control).
    pub rss: BTreeMap<Config, (u64, u64)>,
    /// Control's memory around populating.
    pub memory: Option<Memory>,
}

/// Control's memory (and Redis') before and after the sessions were created.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Memory {
    /// Control's VmRSS before populating, kB.
    pub control_rss_kb_before: u64,
    /// Control's VmRSS after, kB.
    pub control_rss_kb_after: u64,
    /// Records control holds afterwards (store_records, or Redis' DBSIZE).
    pub control_records: u64,
    /// Fewer records than sessions created through affinity+control (2nd).
    pub control_records_lost: bool,
    /// Redis' `used_memory` before, bytes (Redis store only).
    pub redis_used_memory_before: Option<u64>,
    /// Redis' `used_memory` after, bytes.
    pub redis_used_memory_after: Option<u64>,
    /// Redis' `DBSIZE` after.
    pub redis_keys: Option<u64>,
    /// `MEMORY USAGE` of one session key, bytes.
    pub redis_memory_usage_one_key: Option<u64>,
}

impl<'a> Timed<'a> {
    /// Opens the measured session through each config (and `BASE_SESSIONS` − 1 more),
    /// checking that four `tools/call` are routed as the config must route them.
    pub fn open_sessions(s: &'a Settings, fleet: &'a Fleet, run_dir: &'a Path, configs: &[Config]) -> Result<Timed<'a>> {
        let mut sessions = BTreeMap::new();
        let timeout = Duration::from_secs(5);
        for &cfg in configs {
            let url = &fleet.get(cfg).url;
            let session = open_session(cfg.label(), url, timeout)?;
            if cfg == Config::Plain2 {
                log(format!("{:<23} initialize answered by {} (session {}): the initialize phase's baseline", cfg.label(), session.pod, session.id));
                sessions.insert(cfg, session);
                continue;
            }
            let mut pods = Vec::new();
            for _ in 0..4 {
                let a = sequential::post_once(url, CALL_BODY, Some(&session.id), timeout)?;
                ensure!(a.status == 200, "{}: tools/call with the session answered {}", cfg.label(), a.status);
                pods.push(a.pod.unwrap_or_else(|| "-".into()));
            }
            check_routing(cfg, s.baseline_pods, &session.pod, &pods)?;
            for _ in 1..BASE_SESSIONS {
                sequential::post_once(url, INIT_BODY, None, timeout)?;
            }
            log(format!("{:<23} session {} on {}; tools/call answered by {}", cfg.label(), session.id, session.pod, pods.join(" ")));
            sessions.insert(cfg, session);
        }
        Ok(Timed { s, fleet, run_dir, sessions, samples: Samples::new(), created: BTreeMap::new(), rss: BTreeMap::new(), memory: None })
    }

    /// One wrk run of `script` through `cfg`, recorded as `round` of `phase`.
    pub async fn measure(&mut self, phase: &'static str, cfg: Config, round: u32, script: Script, connections: u32, seconds: u64) -> Result<()> {
        let instance = self.fleet.get(cfg);
        let args = match script {
            Script::Steady => vec![self.sessions.get(&cfg).context("no session")?.id.clone()],
            Script::Initialize => vec![],
        };
        let out = self.run_dir.join(format!("wrk-{phase}-{}-{round}.txt", cfg.label().replace([' ', '(', ')', ','], "")));
        let c0 = instance.pid.map(load::cpu_ns);
        let r = load::wrk(&instance.url, script, connections, seconds, &args, &out).await.with_context(|| format!("{} (phase {phase})", cfg.label()))?;
        let cpu_ns = instance.pid.map(load::cpu_ns).zip(c0).map(|(c1, c0)| c1.saturating_sub(c0));
        let sample = Sample {
            round,
            req_s: r.req_s(),
            p50_us: r.p50_us as f64,
            p99_us: r.p99_us as f64,
            proxy_cpu_us_per_req: cpu_ns.filter(|_| r.requests > 0).map(|ns| ns as f64 / 1000.0 / r.requests as f64),
            errors: r.status_errors + r.socket_errors,
        };
        self.samples.entry(phase).or_default().entry(cfg).or_default().push(sample);
        Ok(())
    }

    fn round_done(&self, phase: &str, round: u32, of: u32) {
        let line: Vec<String> = self.samples.get(phase).into_iter().flatten().filter_map(|(c, v)| v.iter().find(|s| s.round == round).map(|s| format!("{} {:.0}/s", c.label(), s.req_s))).collect();
        log(format!("phase {phase}: round {round}/{of} done ({})", line.join("  ")));
    }

    /// `rounds` interleaved rounds over `configs` (round r starts at the r-th config).
    pub async fn phase(&mut self, phase: &'static str, script: Script, connections: u32, rounds: u32, seconds: u64, configs: &[Config]) -> Result<()> {
        for r in 1..=rounds {
            for i in 0..configs.len() {
                let cfg = configs[(r as usize - 1 + i) % configs.len()];
                self.measure(phase, cfg, r, script, connections, seconds).await?;
            }
            self.round_done(phase, r, rounds);
        }
        Ok(())
    }

    /// Warm-up: `BENCH_WARMUP` s of the steady request through each of `configs`.
    pub async fn warm_up(&mut self, phase: &'static str, configs: &[Config]) -> Result<()> {
        if self.s.warmup_seconds == 0 {
            return Ok(());
        }
        for &cfg in configs {
            self.measure(phase, cfg, 0, Script::Steady, self.s.connections, self.s.warmup_seconds).await?;
        }
        Ok(())
    }

    /// The steady phase over [`STEADY`], after a warm-up (second instances included).
    pub async fn steady(&mut self) -> Result<()> {
        let mut warm: Vec<Config> = STEADY.to_vec();
        if self.s.scale > 0 {
            warm.extend(SCALED.map(Config::second));
        }
        self.warm_up("warmup", &warm).await?;
        log("warm-up done");
        let s = self.s;
        self.phase("steady", Script::Steady, s.connections, s.rounds, s.seconds, &STEADY).await
    }

    /// `n` initializes through `cfg` (wrk stops after n answers; the pods' session count is
    /// watched too): the sessions created.
    async fn populate(&mut self, cfg: Config, n: u64) -> Result<u64> {
        let before = self.fleet.pod_sessions()?;
        let cap = n / 250 + 60;
        let out = self.run_dir.join(format!("populate-{}.txt", cfg.label().replace([' ', '(', ')', ','], "")));
        let url = self.fleet.get(cfg).url.clone();
        let t0 = Instant::now();
        let mut wrk = tokio::process::Command::new("wrk")
            .args(["-t1", &format!("-c{}", self.s.connections), &format!("-d{cap}s"), "-s"])
            .arg(Script::Initialize.path())
            .args([url.as_str(), "--", &n.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("run wrk")?;
        let pid = wrk.id();
        let deadline = Instant::now() + Duration::from_secs(cap + 30);
        loop {
            if wrk.try_wait()?.is_some() || self.fleet.pod_sessions()? - before >= n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(pid) = pid {
            let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
        }
        let output = tokio::time::timeout(Duration::from_secs(30), wrk.wait_with_output()).await.context("wrk did not stop")??;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        std::fs::write(&out, &text)?;
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let created = self.fleet.pod_sessions()? - before;
        match load::WrkResult::parse(&text) {
            Ok(r) if r.status_errors == 0 && r.socket_errors == 0 => {}
            other => log(format!("warning: populate through {}: {other:?}", cfg.label())),
        }
        log(format!("{:<23} {created} sessions created in {secs:.1}s ({:.0}/s)", cfg.label(), created as f64 / secs));
        Ok(created)
    }

    /// With `BENCH_SCALE` = N: N sessions through each second instance (memory before and
    /// after), control's records checked, then the same-time A/B ("scaled") and the
    /// initialize phase.
    pub async fn scale(&mut self) -> Result<()> {
        let s = self.s;
        log(format!("scale: creating {} sessions through the second instance of each of: affinity, affinity+control, haproxy", s.scale));
        let control_pid = self.fleet.control.pid().context("control is not running")?;
        let control_before = load::rss_kb(control_pid)?;
        let redis_mem = |f: &Fleet| -> Option<u64> {
            let info = f.redis.as_ref()?.query(&["INFO", "memory"]).ok()?;
            crate::fixtures::redis::info_field(info.text()?, "used_memory")?.parse().ok()
        };
        let redis_before = redis_mem(self.fleet);
        for cfg in SCALED.map(Config::second) {
            let pid = self.fleet.get(cfg).pid.context("no pid")?;
            let before = load::rss_kb(pid)?;
            let created = self.populate(cfg, s.scale).await?;
            self.rss.insert(cfg, (before, load::rss_kb(pid)?));
            self.created.insert(cfg, created);
            if let Some(admin) = self.fleet.get(cfg).admin {
                log(format!("{:<23} filter sessions_pinned={}", cfg.label(), crate::envoy::filter_metric(admin, "sessions_pinned").await?));
            }
        }
        // Control must hold a record of every session created through affinity+control (2nd):
        // the filter sends them on a timer, after the answers.
        let want = self.created[&Config::ControlBig];
        let mut held = 0;
        for _ in 0..50 {
            held = control_records(self.fleet).await;
            if held >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if held < want {
            log(format!("warning: control holds {held} records for {want} sessions created through affinity+control (2nd): records were lost"));
        }
        let mut memory = Memory {
            control_rss_kb_before: control_before,
            control_rss_kb_after: load::rss_kb(control_pid)?,
            control_records: held,
            control_records_lost: held < want,
            redis_used_memory_before: redis_before,
            redis_used_memory_after: redis_mem(self.fleet),
            ..Memory::default()
        };
        if let (Store::Redis, Some(redis)) = (s.control_store, &self.fleet.redis) {
            memory.redis_keys = redis.query(&["DBSIZE"])?.int().map(|v| v as u64);
            // This Redis holds only session records.
            let key = redis.query(&["RANDOMKEY"])?.text().map(str::to_string).context("RANDOMKEY")?;
            memory.redis_memory_usage_one_key = redis.query(&["MEMORY", "USAGE", &key])?.int().map(|v| v as u64);
            if let Some(record) = redis.query(&["GET", &key])?.text() {
                std::fs::write(self.run_dir.join("redis-one-record.json"), record)?;
            }
        }
        self.memory = Some(memory);
        // The measured sessions are still pinned to the pod that issued them.
        for cfg in SCALED.into_iter().chain(SCALED.map(Config::second)) {
            let a = sequential::post_once(&self.fleet.get(cfg).url, CALL_BODY, Some(&self.sessions[&cfg].id), Duration::from_secs(5))?;
            ensure!(a.status == 200, "{}: the measured session answered {} after populating", cfg.label(), a.status);
        }
        let both: Vec<Config> = SCALED.into_iter().chain(SCALED.map(Config::second)).collect();
        self.warm_up("warmup-scaled", &both).await?;
        log(format!("scaled: {BASE_SESSIONS} vs {BASE_SESSIONS} + {} sessions, both instances of each config in every round", s.scale));
        // Round r starts at the r-th pair; which instance of a pair goes first alternates.
        for r in 1..=s.rounds {
            for i in 0..SCALED.len() {
                let j = (r as usize - 1 + i) % SCALED.len();
                let cfg = SCALED[j];
                let order = if (r as usize + j) % 2 == 1 { [cfg.second(), cfg] } else { [cfg, cfg.second()] };
                for c in order {
                    self.measure("scaled", c, r, Script::Steady, s.connections, s.seconds).await?;
                }
            }
            self.round_done("scaled", r, s.rounds);
        }
        log(format!("initialize path: {} connection(s), {} rounds x {}s, baseline plain (2 pods)", s.init_connections, s.init_rounds, s.init_seconds));
        self.phase("initialize", Script::Initialize, s.init_connections, s.init_rounds, s.init_seconds, &INITIALIZE).await
    }
}

/// Session records control holds: Redis' `DBSIZE` (that Redis holds only them), else
/// control's `store_records` metric; 0 when unreadable.
async fn control_records(f: &Fleet) -> u64 {
    match &f.redis {
        Some(r) => r.query(&["DBSIZE"]).ok().and_then(|v| v.int()).unwrap_or(0) as u64,
        None => f.control.metric("store_records", "").await.unwrap_or(0.0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_checks() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_routing(Config::Affinity, 1, "2", &p(&["2", "2"])).is_ok());
        assert!(check_routing(Config::Affinity, 1, "2", &p(&["2", "1"])).is_err());
        assert!(check_routing(Config::Pin, 1, "2", &p(&["1", "1"])).is_ok(), "empty+pin: pod 1 whoever issued it");
        assert!(check_routing(Config::Plain, 1, "1", &p(&["1", "2"])).is_err());
        assert!(check_routing(Config::Plain, 2, "1", &p(&["1", "2"])).is_ok(), "round robin expected");
    }
}
